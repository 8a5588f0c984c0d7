"""Atomic writes, stable hashing and manifests: the bookkeeping every stage shares.

Every output is written under a temporary name in its final directory and renamed into place, so a stage killed at
any moment leaves either the old file or the new one, never half of one; the file gets the mode any new file gets
(0666 less the umask), as if it had been opened directly. `out_dir_lock` keeps a second run off a folder a run is
writing. Every stage records exactly one manifest row per input id with `status` in {ok, skipped, failed}, a
machine-readable `reason` and a human `error` message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

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
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a shared folder needs what the umask allows
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


class Busy(SystemExit):
    """Another run holds the output folder's lock."""


@contextlib.contextmanager
def out_dir_lock(out_dir: str | Path, stage: str) -> Iterator[None]:
    """An exclusive lock on a stage's output folder for the whole run, so two runs never interleave their writes (or
    clean up each other's temp files). The lock file lives in the side cache `{out}/../.cache/{out name}/` (machine-
    local, tracked by neither DVC nor git) and is keyed by the folder's real path, so a link to it locks the same
    folder. A second run exits at once with one line naming the folder (and the pid holding it); the kernel drops the
    lock when its holder exits, however it exits (SIGKILL included), so no stale lock survives a crash."""
    real = Path(out_dir).resolve()
    lock = real.parent / ".cache" / real.name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(f"{stage}: {out_dir} is in use by another run (pid {holder}); wait for it to finish or use "
                       "another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """torch.save, atomically and byte-reproducibly: saved to a file, torch names the zip's root folder after the
    (random) temp file, so two saves of the same object differed in their bytes; through memory it is "archive"."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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


TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")  # what atomic_path's mkstemp makes


def clean_stale_temps(directory: str | Path) -> int:
    """Remove temporary files left by a killed run (`atomic_path`'s `.name.xxxxxxxx.tmp.ext`, nothing else). Returns
    how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for tmp in directory.glob(".*.tmp*"):
        if tmp.is_file() and TEMP_RE.match(tmp.name):
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
        return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
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


def report_rows(stage: str, frame: pd.DataFrame, max_fail_ratio: float,
                show: Callable[[dict], bool] = lambda rec: rec["status"] == FAILED,
                label: Callable[[dict], str] = lambda rec: rec["id"], suffix: str = "") -> int:
    """A stage's closing report: the summary line, one line per row `show` picks (failed ones by default), and the
    exit status: 1 (with a line on stderr) when more than `max_fail_ratio` of the rows failed, else 0."""
    rows = frame.to_dict("records")
    print(f"{stage}: {summarize(rows)}{suffix}")
    for rec in rows:
        if show(rec):
            print(f"  {rec['status']:<7} {label(rec)}: {rec['reason']}: {rec['error']}")
    n_failed = sum(rec["status"] == FAILED for rec in rows)
    ratio = n_failed / max(1, len(rows))
    if ratio > max_fail_ratio:
        print(f"{stage}: {n_failed}/{len(rows)} failed ({ratio:.0%}) > max_fail_ratio {max_fail_ratio:.0%}",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Feature shards: data/features/{stream}/{shard:05d}.npy + .index.parquet + .done.json (written last).
# Shared by every stage that caches per-item arrays (embed, tokenize), so incremental reruns and scale-out behave
# the same everywhere.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One input of a sharded stage: its id, a hash of its source (so a changed source is recomputed), a payload."""

    id: str
    source_hash: str
    payload: Any = None


class FeatureStore:
    """Per-item arrays [n_i, ...] concatenated along axis 0 into `num_shards` shards; shard = stable_hash(id) % n.

    Files per shard: `{shard:05d}.npy` (the arrays), `{shard:05d}.index.parquet` (id, offset, n_frames, source_hash,
    encoder_hash and any per-item metadata such as fps) and `{shard:05d}.done.json`, written last: a shard without its
    done file is incomplete and is ignored by readers and rebuilt by writers.
    """

    def __init__(self, root: str | Path, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.root = Path(root)
        self.num_shards = num_shards

    def path(self, shard: int, kind: str) -> Path:
        suffix = {"array": ".npy", "index": ".index.parquet", "done": ".done.json"}[kind]
        return self.root / f"{shard_name(shard)}{suffix}"

    def done(self, shard: int) -> dict | None:
        try:
            return json.loads(self.path(shard, "done").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def index(self, shard: int) -> pd.DataFrame | None:
        """The index of a complete shard, else None."""
        done = self.done(shard)
        if done is None or not self.path(shard, "index").exists():
            return None
        index = pd.read_parquet(self.path(shard, "index"))
        return index if len(index) == done.get("num_items", -1) else None

    def array(self, shard: int) -> np.ndarray:
        return np.load(self.path(shard, "array"), mmap_mode="r")

    def load(self, ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays by id, read through memory maps (a shard is never loaded whole). Unknown ids raise KeyError."""
        wanted = None if ids is None else set(ids)
        shards = range(self.num_shards) if wanted is None else sorted({shard_of(i, self.num_shards) for i in wanted})
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            index = self.index(shard)
            if index is None:
                continue
            data = self.array(shard)
            for rec in index.itertuples(index=False):
                if wanted is None or rec.id in wanted:
                    out[rec.id] = data[rec.offset : rec.offset + rec.n_frames]
        if wanted is not None and (missing := wanted - set(out)):
            raise KeyError(f"{self.root}: no features for {len(missing)} id(s), e.g. {sorted(missing)[:3]}")
        return out

    def metadata(self) -> pd.DataFrame:
        """All complete shards' index rows, one per item."""
        frames = [idx.assign(shard=s) for s in range(self.num_shards) if (idx := self.index(s)) is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "shard"])

    def update(
        self,
        items: list[Item],
        encoder_hash: str,
        compute: Callable[[Item], tuple[np.ndarray, dict]],
        rank: int = 0,
        world: int = 1,
        progress: str | None = None,
    ) -> list[dict]:
        """Bring this rank's shards up to date with `items`; returns one row per item of this rank.

        Only ids that are new, whose `source_hash` changed, or whose shard was written with another `encoder_hash` are
        computed; the others are copied from the existing shard. A shard whose ids, hashes and failures are all
        unchanged is not rewritten. `compute(item)` returns (array [n, ...], metadata dict); an exception becomes a
        failed row (remembered with its source hash, so an unchanged bad input is not retried on every run).

        Row keys: id, shard, status (ok / failed), reason, error, n_frames, computed (bool).
        """
        by_shard: dict[int, list[Item]] = {}
        for item in items:
            by_shard.setdefault(shard_of(item.id, self.num_shards), []).append(item)
        mine = [s for s in range(self.num_shards) if s % world == rank]
        self._check_layout(rank)
        todo = {s: self._plan(s, by_shard.get(s, []), encoder_hash) for s in mine}
        n_compute = sum(len(plan) for plan in todo.values() if plan is not None)
        bar = tqdm(total=n_compute, desc=progress or str(self.root), unit="item", disable=None if progress else True)
        rows: list[dict] = []
        for shard in mine:
            shard_items = sorted(by_shard.get(shard, []), key=lambda it: it.id)
            if todo[shard] is None:  # up to date (or nothing there and nothing wanted)
                rows += [{**r, "computed": False} for r in (self.done(shard) or {"rows": []})["rows"]]
                continue
            if not shard_items:
                for kind in ("done", "index", "array"):
                    self.path(shard, kind).unlink(missing_ok=True)
                continue
            rows += self._rewrite(shard, shard_items, todo[shard], encoder_hash, compute, bar)
        bar.close()
        return rows

    def _plan(self, shard: int, items: list[Item], encoder_hash: str) -> set[str] | None:
        """Ids of `shard` to compute (an empty set still rewrites the shard), or None when it is up to date."""
        done, index = self.done(shard), self.index(shard)
        if done is None or index is None:
            leftovers = any(self.path(shard, kind).exists() for kind in ("array", "index"))
            return {it.id for it in items} if items or leftovers else None
        same_encoder = done.get("encoder_hash") == encoder_hash
        have = {r.id: r.source_hash for r in index.itertuples(index=False)} if same_encoder else {}
        failed = {i: f["source_hash"] for i, f in done.get("failed", {}).items()} if same_encoder else {}
        wanted = {it.id: it.source_hash for it in items}
        compute = {i for i, h in wanted.items() if have.get(i) != h and failed.get(i) != h}
        return None if not compute and wanted == {**have, **failed} else compute

    def _check_layout(self, rank: int) -> None:
        """Record the shard count in store.json; after a change of count, rank 0 removes shards beyond it."""
        layout = self.root / "store.json"
        previous = json.loads(layout.read_text()).get("num_shards") if layout.exists() else None
        if previous == self.num_shards:
            return
        if rank == 0:
            for path in self.root.glob("[0-9]" * 5 + ".*"):
                if int(path.name[:5]) >= self.num_shards:
                    path.unlink()
            atomic_write_json(layout, {"num_shards": self.num_shards})

    def _rewrite(self, shard, items, compute_ids, encoder_hash, compute, bar) -> list[dict]:
        index = self.index(shard)
        old = self.array(shard) if index is not None and len(index) else None
        old_rows = {} if index is None else {r["id"]: r for r in index.to_dict("records")}
        prev_failed = (self.done(shard) or {}).get("failed", {})
        arrays, meta, rows, failed = [], [], [], {}
        offset = 0
        for item in items:
            if item.id not in compute_ids and item.id in prev_failed:
                failed[item.id] = prev_failed[item.id]
                rows.append({"id": item.id, "shard": shard, "status": FAILED, "reason": failed[item.id]["reason"],
                             "error": failed[item.id]["error"], "n_frames": 0, "computed": False})
                continue
            if item.id in compute_ids:
                try:
                    array, extra = compute(item)
                except Exception as exc:  # noqa: BLE001 - recorded as a failed row; the batch goes on
                    reason = getattr(exc, "reason", None) or "error"
                    failed[item.id] = {"source_hash": item.source_hash, "reason": reason,
                                       "error": str(exc)[:500]}
                    rows.append({"id": item.id, "shard": shard, "status": FAILED, "reason": reason,
                                 "error": str(exc)[:500], "n_frames": 0, "computed": True})
                    bar.update()
                    continue
                bar.update()
                computed = True
            else:
                rec = old_rows[item.id]
                array = np.asarray(old[rec["offset"] : rec["offset"] + rec["n_frames"]])
                extra = {k: v for k, v in rec.items() if k not in ("id", "offset", "n_frames", "source_hash",
                                                                   "encoder_hash")}
                computed = False
            array = np.asarray(array)
            arrays.append(array)
            meta.append({"id": item.id, "offset": offset, "n_frames": len(array), "source_hash": item.source_hash,
                         "encoder_hash": encoder_hash, **extra})
            rows.append({"id": item.id, "shard": shard, "status": OK, "reason": "", "error": "",
                         "n_frames": len(array), "computed": computed})
            offset += len(array)
        data = np.concatenate(arrays, axis=0) if arrays else np.zeros((0,), np.float32)
        del old  # release the memory map before the file is replaced
        self.path(shard, "done").unlink(missing_ok=True)  # the shard is incomplete from here until the end
        with atomic_path(self.path(shard, "array")) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, data)
        write_manifest(self.path(shard, "index"), meta, columns=list(meta[0]) if meta else
                       ["id", "offset", "n_frames", "source_hash", "encoder_hash"])
        atomic_write_json(self.path(shard, "done"), {"encoder_hash": encoder_hash, "num_items": len(meta),
                                                      "failed": failed, "rows": [
                                                          {k: v for k, v in r.items() if k != "computed"}
                                                          for r in rows]})
        return rows


def load_features(root: str | Path, ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays by id from a feature folder (memory-mapped); the shard count is read from the folder."""
    root = Path(root)
    shards = sorted(root.glob("*.done.json"))
    if not shards:
        raise FileNotFoundError(f"{root}: no complete feature shards")
    layout = root / "store.json"
    num_shards = json.loads(layout.read_text())["num_shards"] if layout.exists() else int(shards[-1].name[:5]) + 1
    return FeatureStore(root, num_shards).load(ids)
