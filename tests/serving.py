"""Helpers of the web app tests (tests/test_serve*.py): the app on 127.0.0.1 in a thread, renders to compare, and the
folder where the tests leave what a person should look at (screenshots, load figures)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from pipeline.config import Params, load_params
from pipeline.serve.app import create_app
from tests.conftest import REPO, make_video

ARTIFACTS = REPO / "reports" / "screenshots"  # git-ignored; the browser tests' screenshots and the load figures
SYSTEMS = ("full", "no_motion", "retrieval", "reference", "random")  # the evaluate stage's folders


def make_renders(root: Path, clips: int, systems: tuple[str, ...] = SYSTEMS) -> Path:
    """{root}/{system}/{id}.mp4 as the generate stage lays them out: one real 2 s clip per system (its own tone,
    so the versions differ), linked under every id."""
    for k, system in enumerate(systems):
        folder = root / system
        folder.mkdir(parents=True, exist_ok=True)
        first = make_video(folder / "clip_000.mp4", seconds=2.0, size="160x120", rate="12",
                           audio=f"sine=frequency={220 * (k + 1)}")
        for i in range(1, clips):
            os.link(first, folder / f"clip_{i:03d}.mp4")
    return root


def serve_params(project: dict, root: Path, **serve: object) -> Params:
    """The trained fixture's params with the app's data, database and models under `root` and the model's folder."""
    params = load_params(project["params"])
    values = {"data_dir": str(root / "serve"), "db_path": str(root / "serve" / "v2m.sqlite"),
              "models_dir": str(project["model"].parents[1]), "host": "127.0.0.1", **serve}
    return dataclasses.replace(params, serve=dataclasses.replace(params.serve, **values))


@contextmanager
def running(params: Params):
    """The app served by uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(params), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
    """One HTTP request to the test server (127.0.0.1 only) -> (status, headers, body); redirects not followed."""
    url = urllib.parse.urlsplit(base)
    assert url.hostname == "127.0.0.1"
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def upload(base: str, data: bytes, filename: str = "clip.mp4", fields: dict | None = None) -> tuple[int, dict]:
    """POST /api/jobs as a browser's form would (multipart) -> (status, JSON answer)."""
    boundary = uuid.uuid4().hex
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n').encode()
             for k, v in (fields or {}).items()]
    parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, answer = request(base, "POST", "/api/jobs", body,
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(answer)


def wait_job(base: str, token: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = json.loads(request(base, "GET", f"/api/jobs/{token}")[2])
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {token} did not finish in {timeout} s")


def save_artifact(name: str, data: bytes | str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def files_under(src: Path) -> list[str]:
    """Names of the files under `src` (for 'nothing was left behind' checks)."""
    return sorted(p.name for p in src.rglob("*") if p.is_file()) if src.exists() else []

