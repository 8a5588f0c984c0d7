"""Atomic writes, stable hashing and manifests: the bookkeeping every stage shares.

Every output is written under a temporary name in its final directory and renamed into place, so a stage killed at
any moment leaves either the old file or the new one, never half of one. Every stage records exactly one manifest row
per input id with `status` in {ok, skipped, failed}, a machine-readable `reason` and a human `error` message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
STATUSES = (OK, SKIPPED, FAILED)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so tools infer the format); rename it into place on success.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_stale_temps(directory: str | Path) -> int:
    """Remove temporary files left by a killed run (`.name.xxxx.tmp.ext`). Returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for tmp in directory.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink()
            removed += 1
    return removed


def stable_hash(text: str, length: int = 16) -> str:
    """Hex digest that is the same on every machine and Python run (unlike `hash()`)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def shard_of(item_id: str, num_shards: int) -> int:
    """Shard index of an id: stable hash modulo the shard count."""
    return int(stable_hash(item_id, 16), 16) % num_shards


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def params_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object (a params section, say) with sorted keys."""
    return stable_hash(json.dumps(obj, sort_keys=True, default=_json_default), length)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: str | Path, rows: Iterable[dict], columns: list[str] | None = None) -> pd.DataFrame:
    """Write manifest rows atomically as Parquet (or CSV when the path ends in .csv). Returns the frame."""
    frame = pd.DataFrame(list(rows), columns=columns)
    if columns is not None:
        frame = frame[columns]
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return frame


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"id": str})
    return pd.read_parquet(path)


def summarize(rows: Iterable[dict]) -> str:
    """One line per status and reason, e.g. ``ok 38 | skipped 1 (no_audio 1) | failed 1 (corrupt 1)``."""
    rows = list(rows)
    parts = []
    for status in STATUSES:
        of_status = [r for r in rows if r.get("status") == status]
        if not of_status:
            continue
        reasons = Counter(r.get("reason") or "" for r in of_status if r.get("reason"))
        detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        parts.append(f"{status} {len(of_status)}" + (f" ({detail})" if detail else ""))
    return " | ".join(parts) if parts else "no rows"
