"""The creator page's job queue: uploads are checked, stored under random names and scored one (or `serve.workers`)
at a time by the inference library, while the web app keeps answering.

A job is a row of the jobs table (pipeline/serve/db.py); its upload is {data_dir}/uploads/{token}.video and its
result {data_dir}/outputs/{token}.mp4, both named by the job's random token, never by anything the request said.
Jobs that a stopped server left queued or running are marked failed at the next start and their uploads removed.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from pipeline import inference
from pipeline.config import Params
from pipeline.media import X264_ARGS, MediaError, probe, run_ffmpeg
from pipeline.serve.db import Database
from pipeline.shards import clean_stale_temps

log = logging.getLogger(__name__)
WEB_VIDEO_CODECS = {"h264", "vp9", "av1"}  # what browsers play inside mp4; others are re-encoded to H.264
COPY_CHUNK = 1 << 20


class UploadError(ValueError):
    """An upload that cannot become a job; its message is shown on the page as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelChoice:
    name: str  # what the page shows and sends back: the checkpoint's path under models_dir
    path: Path
    has_text: bool


def list_models(models_dir: str | Path) -> list[ModelChoice]:
    """Checkpoints under models_dir ({models_dir}/*.pt and {models_dir}/*/v2m.pt), readable ones only."""
    root = Path(models_dir)
    found = []
    for path in sorted({*root.glob("*.pt"), *root.glob("*/v2m.pt")}):
        try:  # weights_only: a checkpoint is data, as in inference.load_model
            config = torch.load(path, map_location="cpu", weights_only=True)["config"]
        except Exception as exc:  # noqa: BLE001 - an unreadable file is left off the list, with a log line
            log.warning("%s: not offered (%s: %s)", path, type(exc).__name__, str(exc).splitlines()[0][:200])
            continue
        found.append(ModelChoice(path.relative_to(root).as_posix(), path,
                                 bool((config.get("fusion") or {}).get("text_dim"))))
    return found


class JobQueue:
    """A bounded queue of generation jobs and the worker threads that run them."""

    def __init__(self, db: Database, params: Params, models: list[ModelChoice]):
        self.db, self.params, self.cfg = db, params, params.serve
        self.models = {m.name: m for m in models}
        self.uploads = Path(self.cfg.data_dir) / "uploads"
        self.outputs = Path(self.cfg.data_dir) / "outputs"
        self.queue: queue.Queue[str | None] = queue.Queue(maxsize=self.cfg.queue_size)
        self.lock = threading.Lock()
        self.local = threading.local()  # each worker holds its own models (generation is not shared across threads)
        self.threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        for path in self.uploads.glob("*.part"):
            path.unlink()  # what a killed server was receiving
        clean_stale_temps(self.outputs)  # and writing
        for job in self.db.all("SELECT token FROM jobs WHERE status IN ('queued', 'running')"):
            self._finish(job["token"], "failed", error="the server stopped before this job finished; upload again")
        for i in range(max(1, self.cfg.workers)):
            thread = threading.Thread(target=self._work, name=f"v2m-job-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        for _ in self.threads:
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                break
        for thread in self.threads:
            thread.join(timeout)

    # -- submitting ------------------------------------------------------------------------------------------------

    def submit(self, stream: BinaryIO, original_name: str, model: str, seed: int, prompt: str | None) -> str:
        """Check and store an upload, queue its job; returns the job token. Raises UploadError (nothing is left)."""
        choice = self.models.get(model)
        if choice is None:
            raise UploadError(f"unknown model {model!r}; choose one of the list")
        if prompt and not choice.has_text:
            raise UploadError(f"the model {model} was trained without text, so a text prompt cannot steer it; "
                              "leave the prompt empty or choose a model trained with text")
        if not 0 <= seed < 2**31:
            raise UploadError("the seed must be a whole number from 0 to 2147483647")
        token = secrets.token_urlsafe(12)
        part, final = self.uploads / f"{token}.part", self.uploads / f"{token}.video"
        try:
            size = self._store(stream, part)
            duration = self._check(part, size)
            os.replace(part, final)
            with self.lock:  # the queue is bounded: refuse rather than wait when it is full
                if self.queue.full():
                    raise UploadError(f"the queue is full ({self.cfg.queue_size} jobs waiting); try again in a "
                                      "few minutes", 503)
                self.db.execute("INSERT INTO jobs (token, status, step, model, seed, prompt, original_name, "
                                "size_bytes, duration_s, created_at) VALUES (?, 'queued', 'waiting', ?, ?, ?, ?, ?, "
                                "?, ?)", (token, model, seed, prompt or None, original_name[:200], size, duration,
                                          time.time()))
                self.queue.put_nowait(token)
        except BaseException:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return token

    def _store(self, stream: BinaryIO, part: Path) -> int:
        limit = int(self.cfg.max_upload_mb * 1e6)
        size = 0
        with open(part, "xb") as out:
            while chunk := stream.read(COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise UploadError(f"the file is larger than the limit of {self.cfg.max_upload_mb:g} MB", 413)
                out.write(chunk)
        if size == 0:
            raise UploadError("the file is empty (0 bytes)")
        return size

    def _check(self, path: Path, size: int) -> float:
        """Probe the content (the name and the browser's type are not trusted); returns the duration."""
        try:
            info = probe(path)
        except MediaError:
            raise UploadError("this is not a video file v2m can read (no known container or codec inside)") from None
        if not info.has_video:
            raise UploadError("this file has no video stream (an audio file?); upload a video")
        if not info.duration_s or not math.isfinite(info.duration_s):
            raise UploadError("this video's duration cannot be read (a damaged or unfinished file?)")
        if info.duration_s > self.cfg.max_video_seconds:
            raise UploadError(f"the video lasts {info.duration_s:.1f} s, longer than the limit of "
                              f"{self.cfg.max_video_seconds:g} s; cut it shorter")
        return float(info.duration_s)

    # -- running ---------------------------------------------------------------------------------------------------

    def position(self, token: str) -> int:
        """How many queued jobs are ahead of this one."""
        row = self.db.one("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND id < "
                          "(SELECT id FROM jobs WHERE token = ?)", (token,))
        return int(row["n"]) if row else 0

    def _progress(self, token: str, step: str, progress: float) -> None:
        self.db.execute("UPDATE jobs SET step = ?, progress = ? WHERE token = ?", (step, progress, token))

    def _finish(self, token: str, status: str, output: str | None = None, error: str | None = None) -> None:
        self.db.execute("UPDATE jobs SET status = ?, step = ?, progress = ?, output = ?, error = ?, finished_at = ? "
                        "WHERE token = ?", (status, status, 1.0 if status == "done" else 0.0, output, error,
                                            time.time(), token))
        (self.uploads / f"{token}.video").unlink(missing_ok=True)  # the upload is not kept past its job

    def _work(self) -> None:
        while (token := self.queue.get()) is not None:
            job = self.db.one("SELECT * FROM jobs WHERE token = ?", (token,))
            self.db.execute("UPDATE jobs SET status = 'running', step = 'loading the model', progress = 0.02, "
                            "started_at = ? WHERE token = ?", (time.time(), token))
            try:
                out = self.outputs / f"{token}.mp4"
                self._generate(job, self.uploads / f"{token}.video", out)
                self._finish(token, "done", output=out.name)
            except (inference.GenerateError, MediaError, UploadError) as exc:
                self._finish(token, "failed", error=str(exc).replace(str(self.uploads) + "/", ""))
            except Exception as exc:  # noqa: BLE001 - one job's failure never stops the worker
                log.exception("job %s failed", token)
                self._finish(token, "failed", error=f"generation failed ({type(exc).__name__}: {exc})")

    def _model(self, name: str) -> inference.Model:
        cache = self.local.__dict__.setdefault("models", {})
        if name not in cache:
            cache[name] = inference.load_model(self.models[name].path, self.params)
        return cache[name]

    def _generate(self, job: dict, src: Path, dest: Path) -> None:
        """The inference library's steps (as inference.generate_one runs them), with progress for the page."""
        token = job["token"]
        model = self._model(job["model"])
        cfg = model.params.generate
        text, timbre = inference.text_embedding(model, job["prompt"]), inference.prompt_timbre(model, job["prompt"])
        with tempfile.TemporaryDirectory(prefix="v2m-serve-") as scratch:
            self._progress(token, "reading the video: motion and image features", 0.1)
            feats = inference.video_features(model, src, Path(scratch))
            sr = model.codec.sample_rate
            n_samples = int(round(feats["duration_s"] * sr))
            n_frames = model.codec.num_frames(n_samples)
            self._progress(token, "writing the music", 0.4)
            windows = inference.generate_codes(model, feats, n_frames, cfg, job["seed"], text, progress=False,
                                               timbre=timbre)
            self._progress(token, "rendering the audio", 0.85)
            music = inference.decode_windows(model.codec, windows, n_samples)
            self._progress(token, "putting the music under the video", 0.95)
            video = src
            if feats["info"].video_codec not in WEB_VIDEO_CODECS | {"vp8"}:  # vp8: mux re-encodes it for mp4
                video = Path(scratch) / "video.mp4"
                run_ffmpeg(["-i", str(src), "-map", "0:v:0", *X264_ARGS, "-preset", "veryfast", "-crf", "18",
                            "-pix_fmt", "yuv420p", str(video)], src, reason="transcode")
            inference.mux(video, music[None], sr, dest)

