"""Remote sources: yt-dlp's real code path against an HTTP server on loopback (the network is the only thing faked)."""

from __future__ import annotations

import collections
import http.server
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from pipeline import download, ingest
from pipeline.config import BaseConfig, DownloadConfig, IngestConfig
from pipeline.media import probe
from tests.conftest import make_video


class Server:
    """Serves one video under any path; /gone* -> 404, /limited* -> 429, /flaky* -> 503 for the first 2 requests."""

    def __init__(self, video: Path):
        self.hits: collections.Counter = collections.Counter()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(video.parent), **kwargs)

            def route(self) -> bool:
                server.hits[self.path] += 1
                if self.path.startswith("/gone"):
                    self.send_error(404)
                elif self.path.startswith("/limited"):
                    self.send_error(429)
                elif self.path.startswith("/flaky") and server.hits[self.path] <= 2:
                    self.send_error(503)
                else:
                    self.path = "/" + video.name
                    return True
                return False

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.route():
                    super().do_GET()

            def do_HEAD(self):  # noqa: N802
                if self.route():
                    super().do_HEAD()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    srv = Server(make_video(tmp_path / "srv" / "video.mp4", seconds=4, extra=["-movflags", "+faststart"]))
    yield srv
    srv.close()


def config(tmp_path: Path, **kw) -> IngestConfig:
    dl = DownloadConfig(dir=str(tmp_path / "downloads"), retries=2, backoff_s=0.01, sleep_between_s=0.0,
                        sleep_requests_s=0.0, socket_timeout_s=10.0, **kw)
    return IngestConfig(short_side=64, download=dl, max_fail_ratio=1.0)


BASE = BaseConfig(clip_seconds=1.5, fps=10, sample_rate=16000)


def test_ingest_from_urls_classifies_and_retries(tmp_path, server):
    rows = [{"id": "flaky", "source": f"{server.url}/flaky.mp4", "start_s": 0.5, "split": "train"},
            {"id": "gone", "source": f"{server.url}/gone.mp4", "start_s": 0, "split": "train"},
            {"id": "limited", "source": f"{server.url}/limited.mp4", "start_s": 0, "split": "train"}]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    frame, _ = ingest.run(manifest, tmp_path / "out", BASE, config(tmp_path))
    frame = frame.set_index("id")
    assert (frame.loc["flaky", "status"], frame.loc["flaky", "attempts"]) == ("ok", 3)
    assert frame.loc["flaky", "duration_s"] == pytest.approx(1.5)
    assert (frame.loc["gone", "status"], frame.loc["gone", "reason"], frame.loc["gone", "attempts"]) == \
        ("skipped", "unavailable", 1)
    assert (frame.loc["limited", "status"], frame.loc["limited", "reason"]) == ("failed", "rate_limited")
    assert frame.loc["limited", "attempts"] == 3 and server.hits["/limited.mp4"] == 3
    assert "429" in frame.loc["limited", "error"]


def test_section_download_is_exact_and_cached_by_params(tmp_path, server):
    cfg = config(tmp_path).download
    got = download.download(f"{server.url}/v.mp4", "v", 1.0, 2.0, cfg)
    assert got.attempts == 1 and got.section_start_s == 1.0
    assert probe(got.path).duration_s == pytest.approx(2.0, abs=0.1)  # cut at start_s, not at a keyframe
    hits = sum(server.hits.values())
    again = download.download(f"{server.url}/v.mp4", "v", 1.0, 2.0, cfg)
    assert again.path == got.path and again.attempts == 0 and sum(server.hits.values()) == hits
    longer = download.download(f"{server.url}/v.mp4", "v", 1.0, 3.0, cfg)  # clip_seconds changed: new fetch
    assert longer.path.parent != got.path.parent and longer.attempts == 1
    assert (got.path.parent / "archive.txt").read_text().strip()  # yt-dlp's download archive is kept
    whole = download.download(f"{server.url}/v.mp4", "w", 1.0, 2.0,
                              DownloadConfig(**{**cfg.__dict__, "section_only": False}))
    assert whole.section_start_s == 0.0 and probe(whole.path).duration_s == pytest.approx(4.0, abs=0.1)
    shutil.rmtree(tmp_path / "downloads")


@pytest.mark.parametrize("message, reason", [
    ("[youtube] abc: Video unavailable. This video has been removed by the uploader", "unavailable"),
    ("[youtube] abc: Private video. Sign in if you've been granted access to this video", "private"),
    ("[youtube] abc: The uploader has not made this video available in your country", "geo_blocked"),
    ("[youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.", "age_restricted"),
    ("[youtube] abc: Unable to download API page: HTTP Error 429: Too Many Requests", "rate_limited"),
    ("[youtube] abc: Sign in to confirm you're not a bot. Use --cookies-from-browser", "rate_limited"),
    ("[youtube] abc: Unable to download webpage: <urlopen error [Errno -3] Temporary failure in name resolution>",
     "network"),
    ("[generic] x: Unable to download webpage: Failed to resolve 'example.org'", "network"),
    ("[youtube] abc: This live event will begin in 3 hours.", "live"),
    ("[youtube] abc: Requested format is not available", "download_error"),
])
def test_classify_yt_dlp_messages(message, reason):
    assert download.classify(message) == reason


def test_is_url():
    assert download.is_url("https://www.youtube.com/watch?v=abc")
    assert not download.is_url("data/raw/x.mp4") and not download.is_url("/abs/x.mp4")
