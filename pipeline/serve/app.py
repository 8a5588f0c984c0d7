"""`v2m serve`: the web app. The creator page (upload a video -> the scored mp4) and the listening test (blinded
pairwise comparisons, pipeline/human_eval.py), one Starlette process with a job queue in front of the inference
library and SQLite (WAL) for all state.

    v2m serve [--host 127.0.0.1] [--port 8000] [--params params.yaml] [--db PATH]

Params: serve (host, port, data_dir, db_path, models_dir, limits, workers, queue_size), serve.study, generate (how the
music is sampled), base.seed (the page's default seed). Loopback by default: only this machine can connect.

Security: request bodies over the limit are refused from their Content-Length, before the body is read, and cut off
if they grow past it without one; uploads are stored under random names inside serve.data_dir and checked by probing
their content; job and rater URLs carry unguessable tokens (blinded media URLs name an item, never a system); every
SQL statement takes parameters; no debug mode; templates autoescape; a Content-Security-Policy allows this origin
only (no CDN, no inline script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pipeline import human_eval
from pipeline.config import ConfigError, Params, load_params
from pipeline.serve.db import CHOICES, CRITERIA, Database
from pipeline.serve.jobs import JobQueue, UploadError, list_models

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
FORM_LIMIT = 64 * 1024  # bytes of any request body but an upload (answers are a few hundred)
MULTIPART_SLACK = 64 * 1024  # an upload's form fields and boundaries beyond the file itself
CRITERIA_TEXT = {
    "quality": ("Audio quality", "Which sounds cleaner, with fewer glitches, noise or distortion?"),
    "musicality": ("Musicality", "Which is more musical: melody, harmony and rhythm that make sense?"),
    "alignment": ("Fit to the video", "Which follows what happens in the video (its motion, cuts and mood) better?"),
    "overall": ("Overall", "Which would you rather have under this video?"),
}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; "
                                 b"script-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # rater and job tokens are in URLs: never sent elsewhere
    (b"x-frame-options", b"DENY"),
]


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: request body limits (checked before the body is read) and security headers."""

    def __init__(self, app, upload_limit: int):
        self.app, self.upload_limit = app, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/api/jobs" else FORM_LIMIT
        started = refused = False

        async def guarded_send(message):
            nonlocal started
            if refused and message["type"].startswith("http.response"):
                return  # the 413 is out: what the app tries to send after it (its 500) is dropped
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(guarded_send, limit)
        received = 0

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # no Content-Length (chunked), or a body longer than it said
                    if not started:
                        await self._refuse(guarded_send, limit)
                    refused = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass  # answered 413 above

    async def _refuse(self, send, limit: int) -> None:
        if limit > FORM_LIMIT:
            message = f"the file is larger than the limit of {(limit - MULTIPART_SLACK) / 1e6:g} MB"
        else:
            message = f"the request is larger than the limit of {limit // 1024} kB"
        response = JSONResponse({"error": message}, 413, headers={"connection": "close"})
        await response({"type": "http"}, None, send)


class App:
    """The routes and what they share: params, the database, the job queue, the templates."""

    def __init__(self, params: Params):
        self.params, self.cfg = params, params.serve
        self.db = Database(self.cfg.db_path)
        self.models = list_models(self.cfg.models_dir)
        self.jobs = JobQueue(self.db, params, self.models)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    # -- creator page ------------------------------------------------------------------------------------------------

    def job_json(self, row: dict) -> dict:
        out = {k: row[k] for k in ("token", "status", "step", "progress", "model", "seed", "prompt", "original_name",
                                   "duration_s", "error", "created_at")}
        if row["status"] == "queued":
            out["ahead"] = self.jobs.position(row["token"])
        if row["status"] == "done":
            out["video"] = f"/jobs/{row['token']}/video.mp4"
            out["download"] = f"/jobs/{row['token']}/video.mp4?download=1"
        if row["started_at"]:
            out["seconds"] = round((row["finished_at"] or time.time()) - row["started_at"], 1)
        return out

    def recent_jobs(self) -> list[dict]:
        rows = self.db.all("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (self.cfg.recent_jobs,))
        return [self.job_json(row) for row in rows]

    async def creator(self, request: Request) -> Response:
        default = self.params.generate.model
        default = default.removeprefix(self.cfg.models_dir.rstrip("/") + "/")
        return self.templates.TemplateResponse(request, "creator.html", {
            "models": self.models, "default_model": default, "seed": self.params.base.seed,
            "max_mb": self.cfg.max_upload_mb, "max_seconds": self.cfg.max_video_seconds,
            "jobs_json": json.dumps(await run_in_threadpool(self.recent_jobs))})

    async def list_jobs(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.recent_jobs))

    async def create_job(self, request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=8)
        except MultiPartException as exc:
            return JSONResponse({"error": f"a broken upload form ({exc.message})"}, 400)
        try:
            upload = form.get("video")
            if not isinstance(upload, UploadFile) or not upload.filename:
                return JSONResponse({"error": "choose a video file to upload"}, 400)
            seed_text = str(form.get("seed") or self.params.base.seed).strip()
            if not seed_text.isdigit():
                return JSONResponse({"error": "the seed must be a whole number from 0 to 2147483647"}, 400)
            prompt = str(form.get("prompt") or "").strip()[:500]
            model = str(form.get("model") or (self.models[0].name if self.models else ""))
            token = await run_in_threadpool(self.jobs.submit, upload.file, upload.filename, model, int(seed_text),
                                            prompt or None)
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        finally:
            await form.close()
        row = await run_in_threadpool(self.db.one, "SELECT * FROM jobs WHERE token = ?", (token,))
        return JSONResponse(self.job_json(row), 202)

    async def job(self, request: Request) -> Response:
        row = await run_in_threadpool(self.db.one, "SELECT * FROM jobs WHERE token = ?",
                                      (request.path_params["token"],))
        if row is None:
            return JSONResponse({"error": "no such job"}, 404)
        return JSONResponse(self.job_json(row))

    async def job_video(self, request: Request) -> Response:
        row = await run_in_threadpool(self.db.one, "SELECT * FROM jobs WHERE token = ? AND status = 'done'",
                                      (request.path_params["token"],))
        if row is None or not (self.jobs.outputs / row["output"]).is_file():
            raise HTTPException(404, "no such video")
        name = f"{Path(row['original_name']).stem or 'video'}_v2m.mp4"
        inline = "download" not in request.query_params
        return FileResponse(self.jobs.outputs / row["output"], media_type="video/mp4", filename=name,
                            content_disposition_type="inline" if inline else "attachment")

    # -- listening test ----------------------------------------------------------------------------------------------

    def _rater(self, token: str) -> dict:
        rater = self.db.one("SELECT r.*, e.name AS experiment, e.generated_dir FROM raters r JOIN experiments e "
                            "ON e.id = r.experiment_id WHERE r.token = ?", (token,))
        if rater is None:
            raise HTTPException(404, "this link is not valid (ask for a new one)")
        return rater

    async def join(self, request: Request) -> Response:
        def make() -> str:
            try:
                exp = human_eval.get_experiment(self.db, join_token=request.path_params["token"])
            except human_eval.StudyError:
                raise HTTPException(404, "this study link is not valid") from None
            return human_eval.add_rater(self.db, exp)

        token = await run_in_threadpool(make)
        return RedirectResponse(f"/listen/{token}", 303)

    def _next(self, token: str) -> tuple[dict, dict | None, int, int]:
        rater = self._rater(token)
        items = self.db.all("SELECT i.id, i.position, a.item_id AS answered FROM items i LEFT JOIN answers a "
                            "ON a.item_id = i.id WHERE i.rater_id = ? ORDER BY i.position", (rater["id"],))
        done = sum(row["answered"] is not None for row in items)
        pending = [row for row in items if row["answered"] is None]
        if not pending and rater["finished_at"] is None:
            self.db.execute("UPDATE raters SET finished_at = ? WHERE id = ? AND finished_at IS NULL",
                            (time.time(), rater["id"]))
        return rater, pending[0] if pending else None, done, len(items)

    async def listen(self, request: Request) -> Response:
        token = request.path_params["token"]
        rater, item, done, total = await run_in_threadpool(self._next, token)
        context = {"token": token, "done": done, "total": total, "item": item, "criteria": CRITERIA_TEXT,
                   "choices": CHOICES}
        return self.templates.TemplateResponse(request, "listen.html" if item else "listen_done.html", context)

    async def pause(self, request: Request) -> Response:
        token = request.path_params["token"]
        rater, item, done, total = await run_in_threadpool(self._next, token)
        return self.templates.TemplateResponse(request, "listen_pause.html",
                                               {"token": token, "done": done, "total": total,
                                                "link": str(request.url_for("listen", token=token))})

    async def media(self, request: Request) -> Response:
        token, side = request.path_params["token"], request.path_params["side"]
        if side not in ("A", "B"):
            raise HTTPException(404)

        def find() -> Path:
            rater = self._rater(token)
            item = self.db.one("SELECT * FROM items WHERE id = ? AND rater_id = ?",
                               (request.path_params["item"], rater["id"]))
            if item is None:
                raise HTTPException(404, "no such item")
            root = Path(rater["generated_dir"]).resolve()
            path = (root / item[f"system_{side.lower()}"] / f"{item['clip']}.mp4").resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise HTTPException(404, "this render is missing")
            return path

        # no file name in the headers: it would name the system
        return FileResponse(await run_in_threadpool(find), media_type="video/mp4",
                            headers={"cache-control": "private, max-age=3600"})

    async def answer(self, request: Request) -> Response:
        token = request.path_params["token"]
        form = await request.form(max_files=0, max_fields=16)
        wants_json = "application/json" in request.headers.get("accept", "")
        try:
            values = _answer_values(form)
            await run_in_threadpool(self._store_answer, token, values)
        except ValueError as exc:
            if wants_json:
                return JSONResponse({"error": str(exc)}, 400)
            return self.templates.TemplateResponse(request, "message.html", {"title": "Please answer every question",
                                                                             "message": str(exc),
                                                                             "back": f"/listen/{token}"}, 400)
        if wants_json:
            return JSONResponse({"ok": True}, 200)
        return RedirectResponse(f"/listen/{token}", 303)

    def _store_answer(self, token: str, values: dict) -> None:
        rater = self._rater(token)
        with self.db.write() as conn:
            item = conn.execute("SELECT id FROM items WHERE id = ? AND rater_id = ?",
                                (values["item"], rater["id"])).fetchone()
            if item is None:
                raise HTTPException(404, "no such item")
            conn.execute(f"INSERT INTO answers (item_id, {', '.join(CRITERIA)}, mos_a, mos_b, seconds, answered_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item_id) DO UPDATE SET "
                         + ", ".join(f"{c} = excluded.{c}" for c in (*CRITERIA, "mos_a", "mos_b", "seconds",
                                                                     "answered_at")),
                         (values["item"], *(values[c] for c in CRITERIA), values["mos_a"], values["mos_b"],
                          values["seconds"], time.time()))

    # -- the app -----------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.jobs.start()
        log.info("models offered: %s", ", ".join(m.name for m in self.models) or "none (train one first)")
        try:
            yield
        finally:
            self.jobs.stop()

    def asgi(self):
        routes = [
            Route("/", self.creator),
            Route("/api/jobs", self.list_jobs, methods=["GET"]),
            Route("/api/jobs", self.create_job, methods=["POST"]),
            Route("/api/jobs/{token}", self.job),
            Route("/jobs/{token}/video.mp4", self.job_video),
            Route("/study/{token}", self.join),
            Route("/listen/{token}", self.listen, name="listen"),
            Route("/listen/{token}/pause", self.pause),
            Route("/listen/{token}/answer", self.answer, methods=["POST"]),
            Route("/listen/{token}/media/{item:int}/{side}", self.media),
            Route("/healthz", lambda request: JSONResponse({"ok": True})),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
        app = Starlette(debug=False, routes=routes, lifespan=self.lifespan,
                        exception_handlers={HTTPException: self.http_error})
        return Guard(app, int(self.cfg.max_upload_mb * 1e6) + MULTIPART_SLACK)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, exc.status_code)
        return self.templates.TemplateResponse(request, "message.html", {"title": f"Error {exc.status_code}",
                                                                         "message": exc.detail, "back": None},
                                               exc.status_code)


def _answer_values(form) -> dict:
    """The fields of an answer, checked: one of A/B/tie per criterion, optional MOS 1-5 per version."""
    item = str(form.get("item", ""))
    if not item.isdigit():
        raise ValueError("the answer names no item")
    values: dict = {"item": int(item)}
    missing = [CRITERIA_TEXT[c][0] for c in CRITERIA if form.get(c) not in CHOICES]
    if missing:
        raise ValueError(f"choose A, B or no difference for: {', '.join(missing)}")
    values.update({c: form.get(c) for c in CRITERIA})
    for side in ("a", "b"):
        text = str(form.get(f"mos_{side}") or "")
        if text and text not in ("1", "2", "3", "4", "5"):
            raise ValueError("a rating from 1 to 5, or none")
        values[f"mos_{side}"] = int(text) if text else None
    try:
        values["seconds"] = max(0.0, min(float(form.get("seconds") or 0), 86400.0))
    except ValueError:
        values["seconds"] = None
    return values


def create_app(params: Params):
    """The ASGI app for `params` (what `v2m serve` runs; tests start it on 127.0.0.1)."""
    return App(params).asgi()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m serve", description="the creator page and the listening test")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument("--db", help="SQLite file (default: serve.db_path)")
    args = parser.parse_args(argv)
    import dataclasses

    import uvicorn

    params = load_params(args.params, missing_ok=True)
    serve = dataclasses.replace(params.serve, **{k: v for k, v in {"host": args.host, "port": args.port,
                                                                    "db_path": args.db}.items() if v is not None})
    params = dataclasses.replace(params, serve=serve)
    if serve.max_upload_mb <= 0 or serve.max_video_seconds <= 0 or serve.workers < 1 or serve.queue_size < 1:
        raise ConfigError(f"{args.params}: serve limits, workers and queue_size must be positive")
    app = create_app(params)
    print(f"v2m serve: http://{serve.host}:{serve.port}/  (creator page; listening tests at /study/TOKEN)",
          flush=True)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", access_log=False,
                proxy_headers=False, server_header=False)
    return 0
