"""The fault-and-abuse suite for the data stages (issue 18): what a hostile or a careless user did to ingest, separate
and the download cache, each case reproducing the attack or the mistake on real media. generate's cases are in
tests/test_generate.py (they need its trained model); the SIGKILL matrix of the heavy stages is marked slow.

    data loss      a header-only manifest, an --out that is a user's folder, a manifest that drops ids
    concurrency    two ingests on one out dir (locked), temp files deleted under a running ingest (retried)
    wrong data     the download cache and an id that prefixes another's file name
    bad numbers    start_s negative, NaN, inf, text; import-v2m's NaN start
    sources        file:// and other schemes yt-dlp would be asked to fetch
    file modes     outputs follow the umask (shared folders, SLURM, the team workflow)
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import download, ingest, separate, v2m_ids
from pipeline.config import BaseConfig, DownloadConfig, IngestConfig, Params, SeparateConfig, to_dict
from pipeline.shards import atomic_write_bytes, out_dir_lock, sha256_file
from tests.conftest import make_video

BASE = BaseConfig(seed=0, clip_seconds=2.0, fps=10, sample_rate=16000)
CFG = IngestConfig(short_side=64, workers=2, max_fail_ratio=1.0)


def manifest(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows, columns=["id", "source", "start_s", "split"]).to_csv(path, index=False)
    return path


def row(item_id: str, source, start_s=0.0) -> dict:
    return {"id": item_id, "source": str(source), "start_s": start_s, "split": "train"}


def tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("videos")
    return [make_video(root / f"v{i}.mp4", seconds=3, size="96x64", audio=f"sine=frequency={300 + 100 * i}")
            for i in range(4)]


# ---------------------------------------------------------------------------------------------------- data loss


def test_header_only_manifest_deletes_nothing(tmp_path, videos):
    out = tmp_path / "out"
    ingest.run(manifest(tmp_path / "m.csv", [row(f"v{i}", v) for i, v in enumerate(videos[:2])]), out, BASE, CFG)
    before = tree(out)
    with pytest.raises(SystemExit, match=r"empty\.csv: no usable rows.*refusing to remove"):
        ingest.run(manifest(tmp_path / "empty.csv", []), out, BASE, CFG)
    assert tree(out) == before
    # with the explicit flag, the folder follows the (empty) manifest
    frame, _ = ingest.run(tmp_path / "empty.csv", out, BASE, CFG, prune_all=True)
    assert len(frame) == 0 and not list((out / "clips").iterdir()) and not list((out / "rows").iterdir())


def test_out_dir_of_user_files_is_refused_and_untouched(tmp_path, videos):
    user = tmp_path / "Videos"
    (user / "clips").mkdir(parents=True)
    (user / "clips" / "holiday.mp4").write_bytes(videos[0].read_bytes())
    (user / "clips" / ".draft.tmp.mp4").write_bytes(b"a user's own temp-looking file")
    before = tree(user)
    with pytest.raises(SystemExit, match=r"Videos: not a v2m ingest output folder"):
        ingest.run(manifest(tmp_path / "m.csv", [row("v0", videos[1])]), user, BASE, CFG)
    assert tree(user) == before


def test_prune_removes_only_what_the_stage_made(tmp_path, videos):
    out = tmp_path / "out"
    ingest.run(manifest(tmp_path / "m.csv", [row("v0", videos[0]), row("v1", videos[1])]), out, BASE, CFG)
    (out / "clips" / "mine.mp4").write_bytes(b"not made by ingest")  # no record: never removed
    ingest.run(manifest(tmp_path / "m.csv", [row("v0", videos[0])]), out, BASE, CFG)
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["mine.mp4", "v0.mp4"]
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["v0.wav"]
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["v0.json"]


def test_separate_on_an_empty_upstream_or_a_user_folder_deletes_nothing(tmp_path, videos):
    ingest.run(manifest(tmp_path / "m.csv", [row("v0", videos[0])]), tmp_path / "ingest", BASE, CFG)
    music = tmp_path / "music"
    frame, _ = separate.run(tmp_path / "ingest" / "manifest.parquet", music, BASE, SeparateConfig())
    assert list(frame["status"]) == ["ok"]
    before = tree(music)
    ingest.run(manifest(tmp_path / "empty.csv", []), tmp_path / "ingest", BASE, CFG, prune_all=True)
    with pytest.raises(SystemExit, match="no usable rows.*refusing to remove"):
        separate.run(tmp_path / "ingest" / "manifest.parquet", music, BASE, SeparateConfig())
    assert tree(music) == before
    user = tmp_path / "Music"
    user.mkdir()
    (user / "song.wav").write_bytes(b"RIFF a user's song")
    with pytest.raises(SystemExit, match="Music: not a v2m separate output folder"):
        separate.run(tmp_path / "ingest" / "manifest.parquet", user, BASE, SeparateConfig())
    assert (user / "song.wav").read_bytes() == b"RIFF a user's song"


# ---------------------------------------------------------------------------------------------------- concurrency


def test_second_ingest_on_a_busy_out_dir_is_refused_in_one_line(tmp_path, videos):
    """The lock is the kernel's (flock): held here as a running ingest holds it, a second ingest stops at once."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(Params(base=BASE, ingest=IngestConfig(short_side=64, workers=1)))))
    m = manifest(tmp_path / "m.csv", [row(f"v{i}", v) for i, v in enumerate(videos)])
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--params", str(params), "--manifest", str(m),
           "--out", str(tmp_path / "out")]
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with out_dir_lock(tmp_path / "out", "ingest"):
        for out in ("out", "link"):  # the same folder through a link is the same lock
            busy = subprocess.run([*cmd[:-1], str(tmp_path / out)], capture_output=True, text=True)
            assert busy.returncode == 1 and f"is in use by another run (pid {os.getpid()})" in busy.stderr
            assert len(busy.stderr.strip().splitlines()) == 1  # one line, no traceback
        assert not any((tmp_path / "out").iterdir())
    assert subprocess.run(cmd, capture_output=True).returncode == 0  # released: the next run goes ahead
    assert list(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["status"]) == ["ok"] * 4


@pytest.mark.slow
def test_two_ingests_at_once_on_one_out_dir(tmp_path, videos):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(Params(base=BASE, ingest=IngestConfig(short_side=64, workers=1)))))
    many = [make_video(tmp_path / f"w{i}.mp4", seconds=3, size="96x64") for i in range(12)]
    m = manifest(tmp_path / "m.csv", [row(f"w{i}", v) for i, v in enumerate(many)])
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--params", str(params), "--manifest", str(m),
           "--out", str(tmp_path / "out")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "out" / "rows").glob("*.json")):
        time.sleep(0.01)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 1 and "is in use by another run" in second.stderr, second.stderr
    assert list(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["status"]) == ["ok"] * 12


def test_temps_deleted_under_a_running_ingest_are_retried_not_corrupt(tmp_path, videos):
    """What a second run on the same folder did before the lock: delete the first one's temp files at its start."""
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.csv", [row(f"v{i}", v) for i, v in enumerate(videos)])
    stop = threading.Event()

    def vandal():
        while not stop.is_set():
            for sub in ("clips", "audio"):
                for tmp in (out / sub).glob(".*.tmp*"):
                    tmp.unlink(missing_ok=True)

    thread = threading.Thread(target=vandal, daemon=True)
    (out / "clips").mkdir(parents=True)
    (out / "audio").mkdir()
    thread.start()
    try:
        frame, _ = ingest.run(m, out, BASE, IngestConfig(short_side=64, workers=1, max_fail_ratio=1.0))
    finally:
        stop.set()
        thread.join()
    failed = frame[frame["status"] != "ok"]
    assert len(failed), "the vandal thread should have broken some items"
    assert set(failed["reason"]) <= ingest.RETRY_ON_RERUN, failed[["id", "reason", "error"]].to_string()
    for error in failed["error"]:
        assert ".tmp" not in error  # the message names the source or the output, not a temp file
    frame, processed = ingest.run(m, out, BASE, CFG)
    assert list(frame["status"]) == ["ok"] * 4 and processed == len(failed)


def test_hostile_manifest_rows_are_bad_rows_and_nothing_escapes_the_out_dir(tmp_path, videos):
    """Ids that are paths or options, sources that are options or odd schemes, a BOM, a huge caption: each row gets
    its row, the good one is ingested, and nothing is written outside the out dir."""
    hostile_ids = ["../escape", "a/b", "/abs", "-rf", "--exec=touch pwned", ".hidden", "x" * 200, "nul\x00byte",
                   "new\nline", ""]
    rows = [row(i, videos[0]) for i in hostile_ids]
    rows += [row("opt", "-i"), row("opt2", "--version"), row("blank", "  "), row("good", videos[1])]
    frame = pd.DataFrame(rows, columns=["id", "source", "start_s", "split"]).assign(caption="c" * 100_000)
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + frame.to_csv(index=False).encode())  # a BOM, as Excel writes
    (tmp_path / "sandbox").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    frame, _ = ingest.run(path, tmp_path / "sandbox" / "out", BASE, CFG)
    assert len(frame) == len(rows)
    assert dict(zip(frame["id"], frame["status"], strict=True))["good"] == "ok"
    bad = frame[frame["id"] != "good"]
    assert set(bad["status"]) == {"failed"} and set(bad["reason"]) <= {"bad_row", "missing"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not Path("pwned").exists()
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == [".cache", "out"]  # + the side cache
    assert sorted(p.name for p in (tmp_path / "sandbox" / "out" / "clips").iterdir()) == ["good.mp4"]


def test_a_corrupt_row_that_was_about_a_temp_file_is_retried(tmp_path, videos):
    """What an earlier version recorded when another run deleted its temp file: `corrupt`, which then stuck."""
    out, m = tmp_path / "out", manifest(tmp_path / "m.csv", [row("v0", videos[0])])
    ingest.run(m, out, BASE, CFG)
    record = json.loads((out / "rows" / "v0.json").read_text())
    record.update(status="failed", reason="corrupt", error=f"{videos[0]}: ffmpeg failed: Unable to re-open "
                  f"{out}/clips/.v0.9lloyta0.tmp.mp4 output file for shifting data")
    (out / "rows" / "v0.json").write_text(json.dumps(record))
    frame, processed = ingest.run(m, out, BASE, CFG)
    assert processed == 1 and list(frame["status"]) == ["ok"]


# ---------------------------------------------------------------------------------------------------- wrong data


def test_download_cache_matches_the_exact_id(tmp_path, videos):
    from tests.test_download import Server

    (tmp_path / "srv").mkdir()
    srv = Server(make_video(tmp_path / "srv" / "video.mp4", seconds=2, extra=["-movflags", "+faststart"]))
    try:
        cfg = DownloadConfig(dir=str(tmp_path / "dl"), retries=0, sleep_between_s=0.0, sleep_requests_s=0.0)
        dest = download.download_dir(cfg, 0.0, 2.0)
        dest.mkdir(parents=True)
        (dest / "foo.bar.mp4").write_bytes(videos[0].read_bytes())  # another id's video
        got = download.download(f"{srv.url}/v.mp4", "foo", 0.0, 2.0, cfg)
    finally:
        srv.close()
    assert got.path.name.startswith("foo.") and got.path.stem == "foo" and got.attempts == 1
    assert sha256_file(got.path) != sha256_file(videos[0])


# ---------------------------------------------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("start", ["-5", "nan", "inf", "-inf", "1e400", "abc"])
def test_bad_start_is_a_bad_row(tmp_path, videos, start):
    path = tmp_path / "m.csv"
    path.write_text(f"id,source,start_s,split\nx,{videos[0]},{start},train\nok,{videos[1]},0,train\n")
    frame, _ = ingest.run(path, tmp_path / "out", BASE, CFG)
    frame = frame.set_index("id")
    assert (frame.loc["x", "status"], frame.loc["x", "reason"]) == ("failed", "bad_row")
    assert "start_s" in frame.loc["x", "error"]
    assert frame.loc["ok", "status"] == "ok"
    assert not (tmp_path / "out" / "clips" / "x.mp4").exists()


def test_import_v2m_refuses_nan_and_negative_starts(tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("video_id,start\ndQw4w9WgXcQ,nan\nabcdefghijk,-3\nABCDEFGHIJK,12.5\n")
    rows, problems = v2m_ids.convert([ids], None)
    assert [r["start_s"] for r in rows] == [12.5]
    assert len(problems) == 2 and all("start time" in p for p in problems)


# ---------------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://127.0.0.1:9/x.mp4", "FILE:///tmp/x.mp4"])
def test_non_http_url_is_one_failed_row_and_not_retried(tmp_path, source, caplog):
    path = manifest(tmp_path / "m.csv", [row("x", source)])
    cfg = IngestConfig(short_side=64, max_fail_ratio=1.0,
                       download=DownloadConfig(dir=str(tmp_path / "dl"), retries=3, backoff_s=5.0))
    t0 = time.perf_counter()
    frame, _ = ingest.run(path, tmp_path / "out", BASE, cfg)
    assert time.perf_counter() - t0 < 5  # no backoff, no retries
    rec = frame.iloc[0]
    assert (rec["status"], rec["reason"]) == ("failed", "bad_row") and "http" in rec["error"]
    assert "Traceback" not in caplog.text
    _, processed = ingest.run(path, tmp_path / "out", BASE, cfg)
    assert processed == 0


# ---------------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, videos, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        ingest.run(manifest(tmp_path / "m.csv", [row("v0", videos[0])]), tmp_path / "out", BASE, CFG)
    finally:
        os.umask(old)
    files = [tmp_path / "a.bin", *(p for p in (tmp_path / "out").rglob("*") if p.is_file())]
    assert len(files) >= 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ---------------------------------------------------------------------------------------------------- SIGKILL matrix
# The default suite kills ingest (tests/test_ingest.py), embed (tests/test_embed.py), train (tests/test_train.py) and
# generate (tests/test_generate.py) once each; here: more kill points, and tokenize.


def kill_when(cmd: list[str], ready, timeout: float = 120.0, cwd: Path | None = None) -> bool:
    """Start cmd, SIGKILL its process group once ready() holds; False when it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=cwd)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished


@pytest.mark.slow
@pytest.mark.parametrize("point", ["first_temp", "three_rows", "seven_rows"])
def test_ingest_killed_at_any_point_resumes_to_the_same_bytes(tmp_path, point):
    sources = [make_video(tmp_path / f"s{i}.mp4", seconds=3, size="96x64", audio=f"sine=frequency={200 + 40 * i}")
               for i in range(8)]
    m = manifest(tmp_path / "m.csv", [row(f"s{i}", s) for i, s in enumerate(sources)])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(Params(base=BASE, ingest=IngestConfig(short_side=64, workers=1)))))
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--params", str(params), "--manifest", str(m), "--out",
           "out"]  # relative, as in dvc.yaml: the records name their outputs by it
    killed, clean = tmp_path / "killed" / "out", tmp_path / "clean" / "out"
    killed.parent.mkdir()
    clean.parent.mkdir()
    ready = {"first_temp": lambda: any((killed / "clips").glob(".*.tmp*")) if (killed / "clips").is_dir() else False,
             "three_rows": lambda: len(list((killed / "rows").glob("*.json"))) >= 3,
             "seven_rows": lambda: len(list((killed / "rows").glob("*.json"))) >= 7}[point]
    assert kill_when(cmd, ready, cwd=killed.parent), "the run finished before it could be killed"
    assert not (killed / "manifest.parquet").exists()
    assert subprocess.run(cmd, capture_output=True, cwd=killed.parent).returncode == 0
    assert subprocess.run(cmd, capture_output=True, cwd=clean.parent).returncode == 0
    assert tree(killed) == tree(clean)  # every file, the records and manifest included: no temp left


@pytest.mark.slow
@pytest.mark.parametrize("point", ["codec_fitted", "one_shard"])
def test_tokenize_killed_then_rerun_gives_the_same_tokens(tmp_path, point, monkeypatch):
    from tests.test_tokenize import make_music, write_params

    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", "--params", "params.yaml"]
    for name in ("clean", "killed"):  # relative paths, as in dvc.yaml: manifests and done files name them
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        make_music(Path("music"))
        write_params(Path("."), max_fail_ratio=1.0)
    root = tmp_path / "killed"
    ready = {"codec_fitted": lambda: any((root / "models").rglob("*.json")) if (root / "models").is_dir() else False,
             "one_shard": lambda: any((root / "tokens").rglob("*.done.json")) if (root / "tokens").is_dir()
             else False}[point]
    assert kill_when(cmd, ready, cwd=root), "the run finished before it could be killed"
    for name in ("killed", "clean"):
        assert subprocess.run(cmd, capture_output=True, cwd=tmp_path / name).returncode == 0
    for sub in ("tokens", "models"):
        assert tree(tmp_path / "killed" / sub) == tree(tmp_path / "clean" / sub)
