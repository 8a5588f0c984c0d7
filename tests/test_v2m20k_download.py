"""V2M-20K for real users: the published id list -> manifest -> ingest through yt-dlp, against a video host on loopback
(scripts/loopback_server.py) whose entries are served, missing (404), throttled (429, then served) and truncated.
Only the network is local: yt-dlp, ffmpeg and the ingest stage run for real."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import download, ingest, v2m_ids
from pipeline.config import BaseConfig, DownloadConfig, IngestConfig
from tests.conftest import load_script, make_video

loopback = load_script("loopback_server")

SERVED, MISSING, THROTTLED, TRUNCATED = "aaaaaaaaaa1", "bbbbbbbbbb2", "cccccccccc3", "dddddddddd4"
BASE = BaseConfig(clip_seconds=1.5, fps=10, sample_rate=16000)


@pytest.fixture
def host(tmp_path):
    folder = tmp_path / "host"
    folder.mkdir()
    for ytid in (SERVED, THROTTLED, TRUNCATED):  # mp4 with its index at the end: ffmpeg needs Range requests
        make_video(folder / f"{ytid}.mp4", seconds=4)
    faults = {f"/{THROTTLED}.mp4": "throttled", f"/{TRUNCATED}.mp4": "truncated"}
    with loopback.LoopbackServer(folder, faults=faults) as server:
        yield server


def ingest_cfg(tmp_path, section_only: bool = True) -> IngestConfig:
    dl = DownloadConfig(dir=str(tmp_path / "downloads"), retries=2, backoff_s=0.01, sleep_between_s=0.0,
                        sleep_requests_s=0.0, socket_timeout_s=10.0, section_only=section_only)
    return IngestConfig(short_side=64, download=dl, max_fail_ratio=1.0)


def matrix(frame: pd.DataFrame) -> dict[str, tuple]:
    return {row.id: (row.status, row.reason, int(row.attempts)) for row in frame.itertuples()}


@pytest.mark.parametrize("section_only", [True, False], ids=["section", "whole"])
def test_id_list_to_manifest_to_downloads_every_entry_one_row(tmp_path, host, section_only):
    # the published list: V2M-20k.txt, one id a line (Hugging Face dataset Zeyue7/V2M); one bad line
    ids = tmp_path / "V2M-20k.txt"
    ids.write_text(f"{SERVED}\n{MISSING}\n{THROTTLED}\n{TRUNCATED}\nnot-an-id\n")
    manifest = tmp_path / "v2m20k.csv"
    assert v2m_ids.main([str(ids), "--out", str(manifest), "--url-template", f"{host.url}/{{id}}.mp4"]) == 0
    cfg, out = ingest_cfg(tmp_path, section_only), tmp_path / "ingest"

    frame, _ = ingest.run(manifest, out, BASE, cfg)
    got = matrix(frame)
    assert len(frame) == 4  # one row per entry, the bad line reported by import-v2m instead
    assert got[f"yt_{SERVED}"] == ("ok", "", 1)
    assert got[f"yt_{MISSING}"] == ("skipped", "unavailable", 1)
    assert got[f"yt_{THROTTLED}"] == ("ok", "", 2)  # 429, backoff, then served
    assert got[f"yt_{TRUNCATED}"] == ("failed", "truncated", 3)  # cut off every time: retried, then a failed row
    rows = frame.set_index("id")
    assert "404" in rows.loc[f"yt_{MISSING}", "error"]
    assert rows.loc[f"yt_{SERVED}", "duration_s"] == pytest.approx(1.5)
    archive = next((tmp_path / "downloads").glob("*/archive.txt")).read_text()
    assert SERVED in archive and THROTTLED in archive and TRUNCATED not in archive  # yt-dlp's download archive

    # resumable: a rerun fetches nothing that is done, and tries the truncated entry again
    hits = dict(host.hits)
    host.httpd.faults.clear()  # the host works again
    again, _ = ingest.run(manifest, out, BASE, cfg)
    assert matrix(again)[f"yt_{TRUNCATED}"] == ("ok", "", 1)
    assert matrix(again)[f"yt_{MISSING}"] == ("skipped", "unavailable", 1)  # kept: retrying cannot help
    new = {path: n - hits.get(path, 0) for path, n in host.hits.items() if n != hits.get(path, 0)}
    assert set(new) == {f"/{TRUNCATED}.mp4"}, new


def test_hugging_face_parquet_list_and_bench_split(tmp_path):
    """The dataset viewer's parquet of a list (column `text`); V2M-bench is the test split."""
    pd.DataFrame({"text": [SERVED, THROTTLED, "short"]}).to_parquet(tmp_path / "V2M-bench.parquet")
    out = tmp_path / "m.csv"
    assert v2m_ids.main([str(tmp_path / "V2M-bench.parquet"), "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame["id"]) == [f"yt_{SERVED}", f"yt_{THROTTLED}"] and set(frame["split"]) == {"test"}
    assert frame.loc[0, "source"] == f"https://www.youtube.com/watch?v={SERVED}"
    assert v2m_ids.main([str(tmp_path / "V2M-bench.parquet"), "--out", str(out), "--url-template", "x"]) == 2


def test_cookies_proxy_and_rate_reach_yt_dlp(tmp_path, host, monkeypatch):
    cfg = ingest_cfg(tmp_path).download
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n")
    monkeypatch.setenv(download.COOKIES_ENV, str(cookies))
    monkeypatch.setenv(download.LIMIT_RATE_ENV, "500K")
    opts = download.ydl_options(cfg, tmp_path, "x", 0.0, 1.5)
    assert opts["cookiefile"] == str(cookies) and opts["ratelimit"] == 500 * 1024 and "proxy" not in opts
    monkeypatch.setenv(download.COOKIES_ENV, str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="absent.txt: no such cookies file"):
        download.ydl_options(cfg, tmp_path, "x", 0.0, 1.5)
    monkeypatch.delenv(download.COOKIES_ENV)
    # a proxy that refuses connections: yt-dlp really goes through it, so the served video cannot be fetched
    monkeypatch.setenv(download.PROXY_ENV, "http://127.0.0.1:9")
    with pytest.raises(download.DownloadFailed) as failed:
        download.download(f"{host.url}/{SERVED}.mp4", "p", 0.0, 1.5, cfg)
    assert failed.value.reason == "network" and failed.value.attempts == cfg.retries + 1
    assert not host.hits  # nothing reached the host
    monkeypatch.delenv(download.PROXY_ENV)
    assert download.download(f"{host.url}/{SERVED}.mp4", "p", 0.0, 1.5, cfg).attempts == 1


@pytest.mark.parametrize("message", ["[download] Got error: 19989 bytes read, 51734 more expected. Giving up",
                                     "ffmpeg exited with code 183"])
def test_truncated_downloads_are_transient(message):
    assert download.classify(message) == "truncated" and "truncated" in download.TRANSIENT_REASONS


def test_a_stream_cut_off_mid_section_is_truncated_not_a_short_clip(tmp_path):
    """ffmpeg ends a Matroska / WebM section whose connection is cut without an error: the section's length against the
    source's is what tells a cut-off download from a short video."""
    folder = tmp_path / "host"
    folder.mkdir()
    make_video(folder / "stream.mkv", seconds=4)
    cfg = ingest_cfg(tmp_path).download
    with loopback.LoopbackServer(folder, faults={"/stream.mkv": "truncated"}) as host:
        with pytest.raises(download.DownloadFailed) as cut:
            download.download(f"{host.url}/stream.mkv", "s", 0.0, 3.0, cfg)
        assert cut.value.reason == "truncated" and cut.value.attempts == cfg.retries + 1
        assert "the download was cut off" in cut.value.message and "stream.mkv" in cut.value.message
        assert not list((tmp_path / "downloads").glob("*/s.*"))  # nothing left that a rerun would take as done
        host.httpd.faults.clear()
        got = download.download(f"{host.url}/stream.mkv", "s", 0.0, 3.0, cfg)
        assert got.attempts == 1 and "stream" in (got.path.parent / "archive.txt").read_text()
