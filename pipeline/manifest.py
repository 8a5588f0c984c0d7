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

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pipeline.shards import SKIPPED, read_manifest, stable_hash

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


def prune(out_dir: Path, patterns: Iterable[str], keep: set[str]) -> int:
    """Remove the files matching `patterns` (globs under `out_dir`) whose stem is not in `keep`, so the folder is a
    function of its inputs. Returns how many were removed."""
    removed = 0
    for pattern in patterns:
        for path in out_dir.glob(pattern):
            if path.stem not in keep:
                path.unlink()
                removed += 1
    return removed
