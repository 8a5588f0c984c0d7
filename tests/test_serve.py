"""pipeline/serve over HTTP on 127.0.0.1 (uvicorn in a thread, the real inference path, the fixture's trained model):
bad uploads refused with a message and nothing left, size limits before the body is read, unguessable and blinded
links, and concurrency (20 answers at once, 3 uploads at once: nothing lost). Browser tests: test_serve_browser.py."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from pipeline import human_eval
from pipeline.media import probe, video_duration
from pipeline.serve.db import Database
from tests.conftest import REPO, ffmpeg, make_video
from tests.serving import files_under, make_renders, request, running, save_artifact, serve_params, upload, wait_job

REAL_CLIP = "videos_with_music/tears_of_steel_2s.webm"  # 2 s, VP8 + Vorbis: re-encoded to H.264 for the mp4


@pytest.fixture(scope="module")
def app(trained_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    params = serve_params(trained_project, root, max_upload_mb=1.0, max_video_seconds=10.0, queue_size=4)
    renders = make_renders(root / "generated", clips=6)
    db = Database(params.serve.db_path)
    from dataclasses import replace

    exp = human_eval.create_experiment(db, "study", replace(params.serve.study, generated_dir=str(renders),
                                                            systems=("full", "no_motion", "reference")))
    with running(params) as base:
        yield {"base": base, "db": db, "params": params, "experiment": exp, "root": root}


def uploads_left(app) -> list[str]:
    return files_under(app["root"] / "serve" / "uploads")


def test_bad_uploads_get_one_clear_message_and_leave_nothing(app, tmp_path, shared_data):
    base = app["base"]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 20)
    audio = tmp_path / "song.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(audio))
    long = make_video(tmp_path / "long.mp4", seconds=12.0, size="64x48", rate="5", audio=None)
    cases = [
        (b"", "empty.mp4", 400, "the file is empty (0 bytes)"),
        (text.read_bytes(), "notes.mp4", 400, "not a video file v2m can read"),
        (audio.read_bytes(), "song.mp4", 400, "no video stream"),
        (long.read_bytes(), "long.mp4", 400, "longer than the limit of 10 s"),
    ]  # too big: the next test (the server answers before the body is sent)
    for data, name, status, message in cases:
        got, answer = upload(base, data, name, {"seed": "1"})
        assert (got, message in answer.get("error", "")) == (status, True), (name, got, answer)
        assert "\n" not in answer["error"]
    assert upload(base, (shared_data / REAL_CLIP).read_bytes(), "x.webm", {"model": "../etc/passwd"})[1]["error"] \
        .startswith("unknown model")
    assert upload(base, (shared_data / REAL_CLIP).read_bytes(), "x.webm", {"seed": "-3"})[1]["error"] \
        .startswith("the seed must be")
    assert uploads_left(app) == []
    assert app["db"].all("SELECT * FROM jobs WHERE original_name IN ('empty.mp4', 'notes.mp4', 'song.mp4', "
                         "'long.mp4')") == []
    assert request(base, "GET", "/healthz")[0] == 200  # still serving


def test_size_limit_is_enforced_before_the_body_is_read(app, shared_data):
    host, port = urllib.parse.urlsplit(app["base"]).hostname, urllib.parse.urlsplit(app["base"]).port
    big = (shared_data / "videos_with_music/sintel_excerpt_26s.mp4").stat().st_size  # 3.9 MB > the 1 MB limit
    for length in (big + 300, 1_000_000_000):  # headers only, as a client that waits for "100 Continue" sends them
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)
            reply = read_all(sock)
        assert reply.startswith("HTTP/1.1 413") and "the file is larger than the limit of 1 MB" in reply
    # without a Content-Length (chunked), the body is cut off once it passes the limit
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        head = b'--b\r\nContent-Disposition: form-data; name="video"; filename="x.mp4"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"x" * 65536
        try:
            for _ in range(40):  # 2.6 MB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server may close while we send
        reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    status, _, body = request(app["base"], "POST", "/listen/x/answer", b"a=" + b"1" * 70000,
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413 and json.loads(body)["error"] == "the request is larger than the limit of 64 kB"
    assert uploads_left(app) == []


def test_three_concurrent_uploads_all_come_back_scored(app, shared_data):
    base, data = app["base"], (shared_data / REAL_CLIP).read_bytes()
    results, barrier = [None] * 3, threading.Barrier(3)

    def send(i):
        barrier.wait()
        t0 = time.perf_counter()
        results[i] = (*upload(base, data, f"clip{i}.webm", {"seed": str(i), "prompt": "calm piano" if i else ""}),
                      time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [r[0] for r in results] == [202] * 3, results
    jobs = [wait_job(base, r[1]["token"]) for r in results]
    total = time.perf_counter() - t0
    assert [j["status"] for j in jobs] == ["done"] * 3, jobs
    src_duration, fps = video_duration(shared_data / REAL_CLIP)
    outputs = []
    for job in jobs:
        status, headers, body = request(base, "GET", job["download"])
        assert status == 200 and headers["content-type"] == "video/mp4" and "attachment" in headers[
            "content-disposition"]
        path = app["root"] / f"{job['token']}.mp4"
        path.write_bytes(body)
        info = probe(path)
        assert info.has_video and info.has_audio and info.video_codec == "h264" and info.audio_codec == "aac"
        assert abs(video_duration(path)[0] - src_duration) <= 1 / fps + 1e-6
        outputs.append(body)
    assert len(set(outputs)) == 3  # three seeds, three prompts: three different pieces
    rows = app["db"].all("SELECT * FROM jobs WHERE original_name LIKE 'clip_.webm' ORDER BY id")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}
    assert uploads_left(app) == []  # uploads are not kept past their job
    assert sorted(files_under(app["root"] / "serve" / "outputs")) == sorted(f"{j['token']}.mp4" for j in jobs)
    figures = {"uploads": 3, "accepted_s": [round(r[2], 3) for r in results], "all_done_s": round(total, 1),
               "per_job_s": [j["seconds"] for j in jobs], "workers": app["params"].serve.workers}
    print("load test, 3 concurrent uploads:", json.dumps(figures))
    _record("uploads", figures)


def test_twenty_concurrent_answers_lose_nothing(app):
    base, exp, db = app["base"], app["experiment"], app["db"]
    tokens = []
    for _ in range(4):  # four raters arrive through the study link
        status, headers, _ = request(base, "GET", f"/study/{exp['join_token']}")
        assert status == 303
        tokens.append(headers["location"].rsplit("/", 1)[1])
    items = {t: db.all("SELECT i.id FROM items i JOIN raters r ON r.id = i.rater_id WHERE r.token = ? "
                       "ORDER BY position", (t,))[:5] for t in tokens}
    posts = [(t, item["id"], choice) for t in tokens for item, choice in zip(items[t], "AB" * 3, strict=False)]
    assert len(posts) == 20
    barrier, statuses, times = threading.Barrier(20), [None] * 20, [0.0] * 20

    def send(i, token, item, choice):
        body = urllib.parse.urlencode({"item": item, "quality": choice, "musicality": "tie", "alignment": choice,
                                       "overall": choice, "mos_a": "4", "seconds": "12.5"}).encode()
        barrier.wait()
        t0 = time.perf_counter()
        statuses[i] = request(base, "POST", f"/listen/{token}/answer", body,
                              {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})[0]
        times[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=send, args=(i, *p)) for i, p in enumerate(posts)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert statuses == [200] * 20
    with sqlite3.connect(db.path) as conn:
        rows = conn.execute(f"SELECT item_id, quality, musicality, alignment, overall, mos_a, mos_b FROM answers "
                            f"WHERE item_id IN ({','.join('?' * 20)})", [p[1] for p in posts]).fetchall()
    assert sorted(rows) == sorted((item, c, "tie", c, c, 4, None) for _, item, c in posts)
    figures = {"answers": 20, "all_ok": True, "max_s": round(max(times), 3), "median_s": round(sorted(times)[10], 3)}
    print("load test, 20 concurrent answers:", json.dumps(figures))
    _record("answers", figures)


def test_links_are_unguessable_and_the_versions_blinded(app):
    base, exp, db = app["base"], app["experiment"], app["db"]
    assert request(base, "GET", "/study/not-a-token")[0] == 404
    assert request(base, "GET", "/listen/not-a-token")[0] == 404
    token = request(base, "GET", f"/study/{exp['join_token']}")[1]["location"].rsplit("/", 1)[1]
    other = request(base, "GET", f"/study/{exp['join_token']}")[1]["location"].rsplit("/", 1)[1]
    status, headers, page = request(base, "GET", f"/listen/{token}")
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
    html = page.decode()
    for system in ("full", "no_motion", "reference", "random"):
        assert system not in html  # the page never names what plays
    item = db.one("SELECT i.id FROM items i JOIN raters r ON r.id = i.rater_id WHERE r.token = ? ORDER BY position",
                  (token,))["id"]
    status, headers, body = request(base, "GET", f"/listen/{token}/media/{item}/A")
    assert status == 200 and headers["content-type"] == "video/mp4" and "content-disposition" not in headers
    assert body[4:8] == b"ftyp"
    assert request(base, "GET", f"/listen/{other}/media/{item}/A")[0] == 404  # another rater's item
    assert request(base, "GET", f"/listen/{token}/media/{item}/C")[0] == 404
    bad = urllib.parse.urlencode({"item": item, "quality": "A"}).encode()
    status, _, body = request(base, "POST", f"/listen/{token}/answer", bad,
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "Musicality" in body.decode()
    assert db.one("SELECT * FROM answers WHERE item_id = ?", (item,)) is None


def test_v2m_serve_listens_on_loopback_only(trained_project, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(trained_project["params"].read_text() + f"serve:\n  data_dir: {tmp_path}/serve\n"
                      f"  db_path: {tmp_path}/serve/db.sqlite\n  models_dir: {tmp_path}/none\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--params", str(params), "--port",
                             str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, page = request(f"http://127.0.0.1:{port}", "GET", "/", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert status == 200 and "No trained model found" in page.decode()
        assert listening_addresses(port) == ["127.0.0.1"]
    finally:
        proc.terminate()
        proc.wait(30)
    assert (tmp_path / "serve" / "db.sqlite").exists()


def read_all(sock: socket.socket) -> str:
    """What the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass  # the server closed on a body it did not read: what it sent before is still here
    return b"".join(chunks).decode()


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket listening on `port` (/proc/net/tcp; tcp6 too, where any would show as ::)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else "::")
    return found


def _record(name: str, figures: dict) -> None:
    """Keep the load figures beside the screenshots (reports/screenshots/load_test.json)."""
    from tests.serving import ARTIFACTS

    path = ARTIFACTS / "load_test.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    save_artifact("load_test.json", json.dumps(data, indent=2) + "\n")


def test_jobs_a_stopped_server_left_are_failed_and_their_files_removed(trained_project, tmp_path):
    from pipeline.serve.jobs import JobQueue

    params = serve_params(trained_project, tmp_path)
    db = Database(params.serve.db_path)
    uploads = tmp_path / "serve" / "uploads"
    uploads.mkdir(parents=True)
    for token, status in (("t1", "queued"), ("t2", "running")):
        db.execute("INSERT INTO jobs (token, status, model, seed, original_name, size_bytes, created_at) "
                   "VALUES (?, ?, 'full/v2m.pt', 0, 'a.mp4', 1, 0)", (token, status))
        (uploads / f"{token}.video").write_bytes(b"x")
    (uploads / "t3.part").write_bytes(b"half an upload")
    queue = JobQueue(db, params, [])
    queue.start()
    queue.stop()
    rows = db.all("SELECT status, error FROM jobs ORDER BY token")
    assert [r["status"] for r in rows] == ["failed", "failed"] and "upload again" in rows[0]["error"]
    assert files_under(uploads) == []
