"""A video host on 127.0.0.1 for yt-dlp: static files with Range requests, plus the faults real hosts have.

    python scripts/loopback_server.py DIR [--port 8791]      # serve DIR until Ctrl-C

`LoopbackServer(folder, port)` serves `folder` read-only in a thread (a context manager). Like a video host it
answers single-range `Range: bytes=a-b` requests (ffmpeg seeks into an mp4 whose index is at the end; yt-dlp fetches
sections). A path may start with one fault prefix, applied to the file after it:

- `/_throttled/PATH`: HTTP 429 (with Retry-After) to the first request for PATH, then the file: a rate limit that
  a polite retry gets through;
- `/_truncated/PATH`: announces the whole file's length and sends half of it, then closes the connection: a download
  cut off mid-file;
- anything not in `folder` is a 404, as a removed video is.

`faults={"/path": "throttled" | "truncated"}` gives a path a fault without a prefix (a manifest made from a URL
template). `hits[path]` counts the requests per path. Nothing here fakes yt-dlp: only the network is local.
"""

from __future__ import annotations

import argparse
import collections
import functools
import http.server
import sys
import threading
from pathlib import Path

THROTTLED, TRUNCATED = "/_throttled", "/_truncated"


class LoopbackServer:
    def __init__(self, folder: Path, port: int = 0, faults: dict[str, str] | None = None):
        self.hits: collections.Counter = collections.Counter()
        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.httpd.hits, self.httpd.faults = self.hits, {**(faults or {})}
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hits: collections.Counter
    faults: dict[str, str]

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError)):  # a client that hung up is normal
            super().handle_error(request, client_address)


class Handler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range requests (206 / 416) and the fault prefixes."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        self._limit = None
        self.server.hits[self.path] += 1
        fault = self.server.faults.get(self.path)
        if fault:
            self.path = {"throttled": THROTTLED, "truncated": TRUNCATED}[fault] + self.path
            self.server.hits[self.path] += 1
        if self.path.startswith(THROTTLED + "/"):
            self.path = self.path[len(THROTTLED):]
            if self.server.hits[THROTTLED + self.path] == 1:
                self.send_response(429)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        truncated = self.path.startswith(TRUNCATED + "/")
        if truncated:
            self.path = self.path[len(TRUNCATED):]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "File not found")
            return None
        size = path.stat().st_size
        start, end = 0, size - 1
        spec = self.headers.get("Range", "")
        ranged = spec.startswith("bytes=") and "," not in spec
        if ranged:
            first, _, last = spec[len("bytes="):].partition("-")
            try:
                start, end = (size - int(last), size - 1) if first == "" else (int(first),
                                                                              int(last) if last else size - 1)
            except ValueError:
                ranged, start, end = False, 0, size - 1
            if ranged and (start >= size or start < 0 or end < start):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            end = min(end, size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        length = end - start + 1
        self._limit = (length, max(0, min(length, size // 2 - start))) if truncated else (length, length)
        return f

    def copyfile(self, source, outputfile) -> None:
        _, send = self._limit
        while send > 0 and (chunk := source.read(min(1 << 16, send))):
            outputfile.write(chunk)
            send -= len(chunk)
        if self._limit[1] < self._limit[0]:  # truncated: hang up before the announced length
            self.close_connection = True
            try:
                outputfile.flush()
                self.connection.shutdown(2)
            except OSError:  # the client hung up first
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args(argv)
    with LoopbackServer(args.folder, args.port) as server:
        print(f"serving {args.folder} at {server.url} (Ctrl-C stops)")
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
