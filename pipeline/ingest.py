"""ingest: manifest CSV -> {out}/clips/{id}.mp4, {out}/audio/{id}.wav, {out}/manifest.parquet. Params: base, ingest.

For every input row: fetch the source (yt-dlp for URLs, see pipeline/download.py), probe it, cut `base.clip_seconds`
from `start_s` by re-encoding (exact duration, not keyframe-snapped), at constant `base.fps`, scaled so the short side
is `ingest.short_side`, rotation applied; the audio is downmixed by FFmpeg's standard matrix (a 5.1 centre channel is
kept) and resampled to `base.sample_rate`. One decode writes both outputs (`pipeline.media.normalise_video`, which
generation uses too).

Bad input never stops the batch: every input ends in exactly one manifest row, status ok / skipped / failed with a
reason (no_audio, silent_audio, too_short, start_past_end, corrupt, missing, bad_row, duplicate_id, output_error, the
download reasons). `bad_row`: an id that is not a safe file name, an empty source, a `start_s` that is not a finite
number >= 0, a URL that is not http(s). `output_error`: the source was fine but writing its outputs failed (disk full,
files removed under the run); retried on the next run, like the transient download reasons. Each finished id gets a
small record in {out}/rows/ written after its media, so a rerun does no work for ids whose source and params are
unchanged, and a killed run resumes where it stopped. The exit status is non-zero only when the failed fraction exceeds
`ingest.max_fail_ratio`.

The records hold nothing machine-local (DVC hashes them, and a teammate's rebuild must match): a source's size and
mtime, used to skip re-hashing it, live in a side cache beside the out dir, `{out}/../.cache/{out name}/`, which
neither DVC nor git tracks. So does the lock that keeps a second run off the same out dir (`manifest.owned_out_dir`).

The out dir must be new, empty, or an earlier ingest's (`manifest.parquet` or `rows/` in it): a folder of other files is
refused. Outputs of ids no longer in the manifest are removed, but only those the stage recorded making; a manifest
with no usable rows removes nothing unless `--prune-all` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import download
from pipeline.config import BaseConfig, IngestConfig, load_params, to_dict
from pipeline.manifest import INGEST_COLUMNS, label_columns, owned_out_dir, prune
from pipeline.media import (
    MediaError,
    load_audio,
    normalise_video,
    probe,
    rms_db,
    stored_frame_count,
    tool_versions,
    write_wav,
)
from pipeline.shards import (
    FAILED,
    OK,
    SKIPPED,
    TEMP_RE,
    atomic_path,
    atomic_write_json,
    clean_stale_temps,
    params_hash,
    report_rows,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "source")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}$")
RETRY_ON_RERUN = download.TRANSIENT_REASONS | {"error", "output_error"}
TEMP_IN_ERROR = re.compile(r"/\.[^/\s]+\.[a-z0-9_]{8}\.tmp\.")  # an error message that names one of our temp files
URL_SCHEMES = ("http://", "https://")  # what yt-dlp is asked to fetch; file://, ftp:// ... are bad rows


class Skip(Exception):
    def __init__(self, status: str, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


class OutputError(Exception):
    """Writing or re-reading an id's own outputs failed: not the source's fault, so the row is retried on rerun."""

    reason = "output_error"


def read_input_manifest(path: str | Path) -> pd.DataFrame:
    """Read `id,source,start_s,split[,caption][,license][,labels...]`; missing optional columns get defaults."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"id": str, "source": str, "split": str}, keep_default_na=False)
    except FileNotFoundError:
        raise SystemExit(f"ingest: {path}: no such manifest") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SystemExit(f"ingest: {path}: not a readable CSV manifest ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise SystemExit(f"ingest: {path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")
    if "start_s" not in frame.columns:
        frame["start_s"] = 0.0
    if "split" not in frame.columns:
        frame["split"] = "train"
    return frame


def item_params(base: BaseConfig, cfg: IngestConfig) -> dict:
    """The params that change an ingested clip (not paths, workers or the failure threshold)."""
    keep = ("short_side", "audio_channels", "require_audio", "skip_silent", "silence_db", "min_duration_s",
            "video_crf", "video_preset")
    return {"base": to_dict(base), "ingest": {k: getattr(cfg, k) for k in keep}}


class Ingester:
    def __init__(self, base: BaseConfig, cfg: IngestConfig, out_dir: Path, manifest_dir: Path):
        self.base, self.cfg, self.out = base, cfg, out_dir
        self.manifest_dir = manifest_dir
        self.phash = params_hash(item_params(base, cfg))
        for sub in ("clips", "audio", "rows"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir / sub)

    def record_path(self, item_id: str) -> Path:
        return self.out / "rows" / f"{item_id}.json"

    def stat_path(self, item_id: str) -> Path:
        """Side cache of the source's [size, mtime_ns] when it was hashed: machine-local, so not in the record."""
        return self.out.parent / ".cache" / self.out.name / f"{item_id}.stat.json"

    def _remember_stat(self, item_id: str, src: Path) -> None:
        stat = src.stat()
        atomic_write_json(self.stat_path(item_id), [stat.st_size, stat.st_mtime_ns])

    def _same_stat(self, item_id: str, src: Path) -> bool:
        try:
            stat = src.stat()
            return json.loads(self.stat_path(item_id).read_text()) == [stat.st_size, stat.st_mtime_ns]
        except (OSError, ValueError):
            return False

    def resolve(self, source: str) -> Path:
        """Local sources: as given (relative to the working directory), else relative to the manifest's folder."""
        path = Path(source).expanduser()
        if not path.is_absolute() and not path.exists() and (self.manifest_dir / path).exists():
            path = self.manifest_dir / path
        return path

    def previous(self, row: dict) -> dict | None:
        """The record of an earlier run for the same id, source, start and params, if still valid."""
        path = self.record_path(row["id"])
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        same = rec.get("params_hash") == self.phash and rec.get("source") == row["source"]
        same = same and math.isclose(float(rec.get("start_s") or 0), row["start_s"])
        if not same or (rec["status"] == FAILED and rec.get("reason") in RETRY_ON_RERUN):
            return None
        if rec["status"] == FAILED and TEMP_IN_ERROR.search(rec.get("error") or ""):
            return None  # an older run's "corrupt" that was about its own temp file (see OutputError): retried
        if not download.is_url(row["source"]):
            src = self.resolve(row["source"])
            if not src.exists():
                return rec if rec.get("reason") == "missing" else None
            if not self._same_stat(row["id"], src):
                if sha256_file(src) != rec.get("source_sha256"):
                    return None
                self._remember_stat(row["id"], src)
        if rec["status"] == OK and not (Path(rec["clip_path"]).exists() and Path(rec["audio_path"]).exists()):
            return None
        return rec

    def process(self, row: dict) -> dict:
        """Ingest one input row; always returns its manifest record (never raises for bad media)."""
        if (rec := self.previous(row)) is not None:
            rec["_reused"] = True
            return rec
        rec = {"id": row["id"], "split": row["split"], "source": row["source"], "start_s": row["start_s"],
               "params_hash": self.phash, "attempts": 0, "tool_versions": json.dumps(tool_versions())}
        try:
            rec.update(self._ingest(row, rec))
            rec.update(status=OK, reason="", error="")
        except Skip as exc:
            rec.update(status=exc.status, reason=exc.reason, error=str(exc))
        except download.DownloadFailed as exc:
            status = SKIPPED if exc.reason in download.SKIP_REASONS else FAILED
            rec.update(status=status, reason=exc.reason, error=exc.message[:500], attempts=exc.attempts)
        except MediaError as exc:
            rec.update(status=FAILED, reason=exc.reason, error=str(exc)[:500])
        except OutputError as exc:
            rec.update(status=FAILED, reason=exc.reason, error=str(exc)[:500])
        except OSError as exc:
            if not (exc.filename and TEMP_RE.match(Path(str(exc.filename)).name)):
                log.exception("%s: unexpected error", row["id"])
                rec.update(status=FAILED, reason="error", error=f"{type(exc).__name__}: {exc}"[:500])
            else:  # a temp file of ours vanished (removed under the run): the outputs, not the source
                rec.update(status=FAILED, reason=OutputError.reason,
                           error=f"{row['source']}: writing its outputs in {self.out} failed ({exc.strerror}); "
                           "retried on the next run"[:500])
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch; recorded, and retried on rerun
            log.exception("%s: unexpected error", row["id"])
            rec.update(status=FAILED, reason="error", error=f"{type(exc).__name__}: {exc}"[:500])
        atomic_write_json(self.record_path(row["id"]), rec)
        return rec

    def _ingest(self, row: dict, rec: dict) -> dict:
        base, cfg = self.base, self.cfg
        start_s = float(row["start_s"])
        if download.is_url(row["source"]):
            fetched = download.download(row["source"], row["id"], start_s, base.clip_seconds, cfg.download)
            rec["attempts"] = fetched.attempts
            src, start_s = fetched.path, max(0.0, start_s - fetched.section_start_s)
        else:
            src = self.resolve(row["source"])
            if not src.exists():
                raise Skip(FAILED, "missing", f"{src}: no such file")
        rec.update(source_sha256=sha256_file(src))
        self._remember_stat(row["id"], src)
        info = probe(src)
        rec.update(source_duration_s=round(info.duration_s, 4), has_audio=info.has_audio)
        if not info.has_video:
            raise Skip(SKIPPED, "no_video", f"{src}: no video stream")
        if cfg.require_audio and not info.has_audio:
            raise Skip(SKIPPED, "no_audio", f"{src}: no audio stream")
        available = info.duration_s - start_s
        if available <= 0:
            raise Skip(SKIPPED, "start_past_end", f"{src}: start_s {start_s} is past the end ({info.duration_s:.2f} s)")
        if available < cfg.min_duration_s:
            raise Skip(SKIPPED, "too_short", f"{src}: {available:.2f} s after start_s < min_duration_s")
        n_frames = max(1, int(math.floor(min(base.clip_seconds, available) * base.fps + 1e-6)))
        duration = n_frames / base.fps
        clip_path = self.out / "clips" / f"{row['id']}.mp4"
        audio_path = self.out / "audio" / f"{row['id']}.wav"
        with atomic_path(clip_path) as tmp_clip, atomic_path(audio_path) as tmp_wav:
            try:
                normalise_video(src, tmp_clip, n_frames, base.fps, cfg.short_side, cfg.video_crf, cfg.video_preset,
                                start_s, tmp_wav if info.has_audio else None, base.sample_rate, cfg.audio_channels)
            except MediaError:
                if tmp_clip.exists() and (tmp_wav.exists() or not info.has_audio):
                    raise  # about the source
                raise OutputError(f"{src}: its outputs in {self.out} were removed while ffmpeg wrote them (another "
                                  "process in this folder?); retried on the next run") from None
            try:  # reading back what ffmpeg wrote: a failure here is about our outputs, not the source
                out = probe(tmp_clip)
                got = stored_frame_count(tmp_clip)
                audio = load_audio(tmp_wav, mono=False)[0] if info.has_audio else None
            except (MediaError, OSError, av.error.FFmpegError, IndexError) as exc:
                raise OutputError(f"{src}: its normalised clip in {self.out} could not be read back "
                                  f"({_why(exc)}); retried on the next run") from None
            if got < n_frames - 1:
                raise MediaError(src, f"decoded only {got / base.fps:.2f} s of the expected {duration:.2f} s "
                                 "(truncated or damaged file)")
            level = -200.0
            if info.has_audio:
                audio = _exact_length(audio, int(round(got / base.fps * base.sample_rate)))
                write_wav(tmp_wav, audio, base.sample_rate)
                level = rms_db(audio)
                silent = level < cfg.silence_db
                if silent and cfg.skip_silent:
                    raise Skip(SKIPPED, "silent_audio", f"{src}: audio RMS {level:.1f} dBFS < {cfg.silence_db}")
        return dict(clip_path=str(clip_path), audio_path=str(audio_path) if info.has_audio else "",
                    duration_s=round(got / base.fps, 6), n_frames=got, fps=base.fps, width=out.display_width,
                    height=out.display_height, audio_rms_db=round(level, 2), silent=bool(level < cfg.silence_db))


def _why(exc: Exception) -> str:
    """An exception in a few words, without the temp file's name."""
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__


def _exact_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim or zero-pad [C, N] audio to exactly n_samples, so audio and video durations agree to the sample."""
    if audio.shape[1] >= n_samples:
        return audio[:, :n_samples]
    return np.pad(audio, ((0, 0), (0, n_samples - audio.shape[1])))


def validate_rows(frame: pd.DataFrame) -> list[tuple[dict, dict | None]]:
    """Pair each input row with a pre-made failure record (bad id, duplicate) or None when it can be processed."""
    seen: set[str] = set()
    out = []
    for raw in frame.to_dict("records"):
        row = {**raw, "id": str(raw.get("id", "")).strip(), "source": str(raw.get("source", "")).strip()}
        row["split"] = str(row.get("split") or "train")
        bad = None
        start = raw.get("start_s")
        try:
            row["start_s"] = 0.0 if start is None or start == "" else float(start)
        except (TypeError, ValueError):
            row["start_s"] = math.nan
        if not (math.isfinite(row["start_s"]) and row["start_s"] >= 0):
            bad = ("bad_row", f"start_s {start!r}: must be a finite number of seconds >= 0")
            row["start_s"] = 0.0
        if not ID_RE.match(row["id"]):
            bad = ("bad_row", f"id {row['id']!r}: use letters, digits, '_', '-', '.', '=' (max 128)")
        elif not row["source"]:
            bad = ("bad_row", "empty source")
        elif download.is_url(row["source"]) and not row["source"].lower().startswith(URL_SCHEMES):
            bad = ("bad_row", f"source {row['source'][:200]!r}: only http(s) URLs are downloaded; give a local file "
                   "as a path")
        elif row["id"] in seen:
            bad = ("duplicate_id", f"id {row['id']!r} appears more than once; only the first is ingested")
        seen.add(row["id"])
        failure = None
        if bad:
            failure = {"id": row["id"], "split": row["split"], "source": row["source"], "start_s": row["start_s"],
                       "status": FAILED, "reason": bad[0], "error": bad[1]}
        out.append((row, failure))
    return out


def run(manifest: Path, out_dir: Path, base: BaseConfig, cfg: IngestConfig,
        prune_all: bool = False) -> tuple[pd.DataFrame, int]:
    """Ingest every row of `manifest`; returns (the written manifest frame, number of items actually processed).
    `prune_all`: a manifest with no usable rows empties out_dir (else it is refused)."""
    frame = read_input_manifest(manifest)
    with owned_out_dir(out_dir, "ingest"):
        return _run_locked(manifest, frame, out_dir, base, cfg, prune_all)


def _run_locked(manifest: Path, frame: pd.DataFrame, out_dir: Path, base: BaseConfig, cfg: IngestConfig,
                prune_all: bool) -> tuple[pd.DataFrame, int]:
    extra = label_columns(frame, INGEST_COLUMNS)
    ingester = Ingester(base, cfg, out_dir, manifest.parent)
    pairs = validate_rows(frame)
    todo = [row for row, failure in pairs if failure is None]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(todo), desc="ingest", unit="clip", disable=None)
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for rec in pool.map(ingester.process, todo):
            results[rec["id"]] = rec
            bar.update()
            bar.set_postfix_str(rec["status"] if rec["status"] == OK else f"{rec['status']}:{rec['reason']}")
    bar.close()
    rows = []
    for row, failure in pairs:
        rec = failure or results[row["id"]]
        # the split is the input manifest's now: a reused record keeps the one of the run that made it
        rows.append({**{c: row.get(c) for c in extra}, **{k: v for k, v in rec.items() if not k.startswith("_")},
                     "split": row["split"]})
    processed = sum(1 for r in results.values() if not r.get("_reused"))
    log.debug("%d of %d items reused from an earlier run", len(results) - processed, len(results))
    keep = {r["id"] for r, f in pairs if f is None}
    if removed := prune(out_dir, ("clips/{id}.mp4", "audio/{id}.wav"), keep, "ingest", manifest, prune_all):
        log.info("removed %d outputs of ids no longer in the manifest", removed)
    written = write_manifest(out_dir / "manifest.parquet", rows, columns=INGEST_COLUMNS + extra)
    return written, processed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--manifest", help="input manifest CSV (default: ingest.manifest)")
    parser.add_argument("--out", help="output folder (default: ingest.out_dir)")
    parser.add_argument("--prune-all", action="store_true", help="let a manifest with no usable rows remove every "
                        "earlier output (refused without it)")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    manifest = Path(args.manifest or params.ingest.manifest)
    out_dir = Path(args.out or params.ingest.out_dir)
    frame, processed = run(manifest, out_dir, params.base, params.ingest, args.prune_all)
    print(f"ingest: {len(frame)} rows, {processed} processed, the rest unchanged since the last run -> {out_dir}")
    return report_rows("ingest", frame, params.ingest.max_fail_ratio, show=lambda rec: rec["status"] != OK)


if __name__ == "__main__":
    sys.exit(main())
