"""What the stages agree on about each other's manifests: the columns a stage writes that the next one reads, how a
downstream stage names an upstream item (its hash) and carries the upstream labels along, the row of an id that was
not ok upstream, and the pruning that keeps an output folder a function of its manifest.

pipeline/shards.py writes and reads the manifest files; this module is the contract between the stages, so that no
stage imports another to learn it.

    upstream = read_upstream(path, "separate", "ingest")         # SystemExit naming the stage to run first
    labels = label_columns(upstream, INGEST_COLUMNS)             # caption, tempo_bpm, beat_times, ... (SynthV2M)
    rec = {"id": ..., "split": ..., **skipped_upstream(row, "ingest")}   # when row["status"] != ok
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from pipeline.shards import SKIPPED, out_dir_lock, read_manifest, stable_hash

# data/ingest/manifest.parquet: these, then the input manifest's own columns (labels) in their order
INGEST_COLUMNS = [
    "id", "split", "status", "reason", "error", "source", "start_s", "clip_path", "audio_path", "duration_s",
    "n_frames", "fps", "width", "height", "has_audio", "audio_rms_db", "silent", "source_duration_s",
    "source_sha256", "attempts", "params_hash", "tool_versions",
]
# data/music/manifest.parquet (separate): these, then the ingest manifest's label columns
SEPARATE_COLUMNS = ["id", "split", "status", "reason", "error", "music_path", "duration_s", "sample_rate", "channels",
                    "device", "segment_s", "source_hash", "params_hash"]


def read_upstream(path: str | Path, stage: str, producer: str) -> pd.DataFrame:
    """The manifest `stage` reads; SystemExit naming `producer`, the stage to run first, when it is missing."""
    try:
        return read_manifest(path)
    except FileNotFoundError:
        raise SystemExit(f"{stage}: {path}: no such manifest (run `v2m {producer}` first)") from None


def label_columns(frame: pd.DataFrame, upstream_columns: list[str]) -> list[str]:
    """Pass-through columns of an upstream manifest: those its stage did not make (caption, tempo_bpm, beat_times,
    ... for SynthV2M), in their order."""
    return [c for c in frame.columns if c not in upstream_columns]


def upstream_hash(row: dict, path_column: str) -> str:
    """Identity of an ingested item: its source file and the ingest params that made it, and the path of the output
    a stage reads (`audio_path` or `clip_path`); no need to hash the output itself."""
    return stable_hash(json.dumps([row.get("source_sha256"), row.get("params_hash"), row.get(path_column)]))


def skipped_upstream(row: dict, upstream: str) -> dict:
    """Status, reason and error of an id that is not ok in the `upstream` stage's manifest."""
    return {"status": SKIPPED, "reason": f"upstream_{row['status']}", "error": f"{upstream}: {row['reason']}"}


def check_out_dir(out_dir: Path, stage: str) -> None:
    """Refuse to write into an existing folder that is not this stage's output: a non-empty folder without the
    stage's `manifest.parquet` or `rows/` records (a user's folder given as --out). SystemExit names the folder."""
    if not out_dir.is_dir() or (out_dir / "manifest.parquet").is_file() or (out_dir / "rows").is_dir():
        return
    if next((p for p in out_dir.rglob("*") if not p.is_dir()), None) is not None:  # stops at the first file
        raise SystemExit(f"{stage}: {out_dir}: not a v2m {stage} output folder (it holds files but no manifest.parquet "
                         "or rows/); give an empty or new folder as --out")


@contextlib.contextmanager
def owned_out_dir(out_dir: Path, stage: str) -> Iterator[Path]:
    """`check_out_dir`, create the folder, and hold its lock (`shards.out_dir_lock`) while inside: how ingest and
    separate take their output folder before they write or prune anything in it."""
    check_out_dir(out_dir, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir, stage):
        yield out_dir


def prune(out_dir: Path, layout: Iterable[str], keep: set[str], stage: str, source: str | Path,
          allow_empty: bool = False) -> int:
    """Remove the outputs of ids no longer wanted, so the folder stays a function of its inputs: only ids the stage
    itself recorded (`rows/{id}.json`, written after an id's outputs), and of those only the files of the stage's
    layout (`layout`: e.g. "clips/{id}.mp4"), then the record. A file without a record is never touched. An empty
    `keep` while records exist (a header-only manifest, an upstream with nothing usable) is refused with SystemExit
    unless `allow_empty`. Returns how many ids were removed."""
    stale = sorted(p for p in (out_dir / "rows").glob("*.json") if p.stem not in keep)
    if stale and not keep and not allow_empty:
        raise SystemExit(f"{stage}: {source}: no usable rows; refusing to remove the outputs of all {len(stale)} ids "
                         f"in {out_dir} (pass --prune-all to empty it)")
    for record in stale:
        for pattern in layout:
            (out_dir / pattern.format(id=record.stem)).unlink(missing_ok=True)
        record.unlink()
    return len(stale)
