"""Atomic writes, stable hashing and the feature shard store shared by embed and tokenize."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.shards import (
    FeatureStore,
    Item,
    atomic_path,
    load_features,
    read_manifest,
    report_rows,
    sha256_file,
    shard_of,
    stable_hash,
    summarize,
    write_manifest,
)


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".txt" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_stable_hash_and_shard_are_fixed_values():
    assert stable_hash("abc") == "ba7816bf8f01cfea"  # sha256("abc"), the same on every machine
    assert [shard_of(f"id{i}", 4) for i in range(6)] == [shard_of(f"id{i}", 4) for i in range(6)]
    assert {shard_of(f"clip_{i:05d}", 8) for i in range(200)} == set(range(8))


def test_manifest_round_trip_and_summary(tmp_path):
    rows = [{"id": "a", "status": "ok", "reason": ""},
            {"id": "b", "status": "failed", "reason": "corrupt"},
            {"id": "c", "status": "skipped", "reason": "no_audio"},
            {"id": "d", "status": "failed", "reason": "corrupt"}]
    for name in ("m.parquet", "m.csv"):
        write_manifest(tmp_path / name, rows)
        assert read_manifest(tmp_path / name).to_dict("records") == rows
    assert summarize(rows) == "ok 1 | skipped 1 (no_audio 1) | failed 2 (corrupt 2)"
    assert len(sha256_file(tmp_path / "m.csv")) == 64


def test_report_rows_lists_the_chosen_rows_and_fails_above_the_ratio(capsys):
    import pandas as pd

    frame = pd.DataFrame([{"id": "a", "status": "ok", "reason": "", "error": ""},
                          {"id": "b", "status": "failed", "reason": "corrupt", "error": "bad header"},
                          {"id": "c", "status": "skipped", "reason": "no_audio", "error": ""}])
    assert report_rows("stage", frame, max_fail_ratio=0.5) == 0  # 1 of 3 failed
    out = capsys.readouterr()
    assert out.out.splitlines() == ["stage: ok 1 | skipped 1 (no_audio 1) | failed 1 (corrupt 1)",
                                    "  failed  b: corrupt: bad header"] and not out.err
    assert report_rows("stage", frame, 0.2, show=lambda rec: rec["status"] != "ok",
                       label=lambda rec: f"x/{rec['id']}") == 1
    out = capsys.readouterr()
    assert "  skipped x/c: no_audio: " in out.out.splitlines()
    assert out.err.strip() == "stage: 1/3 failed (33%) > max_fail_ratio 20%"


class Encoder:
    """A deterministic 'encoder' that counts its calls: features [n, 3] derived from the id and source hash."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, item: Item):
        self.calls.append(item.id)
        if item.id in self.fail:
            raise ValueError(f"{item.id}: cannot decode")
        seed = int(stable_hash(item.id + item.source_hash, 8), 16)
        n = 2 + seed % 5
        return np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32), {"fps": 8.0}


def items(n: int, changed: dict[str, str] | None = None) -> list[Item]:
    changed = changed or {}
    return [Item(f"v{i:03d}", changed.get(f"v{i:03d}", "h0")) for i in range(n)]


def snapshot(root):
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.iterdir())}


def test_feature_store_incremental_updates(tmp_path):
    store, enc = FeatureStore(tmp_path / "f", 4), Encoder()
    rows = store.update(items(40), "enc1", enc)
    assert len(rows) == 40 and len(enc.calls) == 40 and all(r["status"] == "ok" for r in rows)
    before = snapshot(store.root)

    enc.calls.clear()  # nothing changed: nothing computed, nothing rewritten
    rows = store.update(items(40), "enc1", enc)
    assert enc.calls == [] and not any(r["computed"] for r in rows) and snapshot(store.root) == before

    enc.calls.clear()  # one new video: one encoder call, only its shard rewritten
    store.update(items(41), "enc1", enc)
    assert enc.calls == ["v040"]
    after = snapshot(store.root)
    rewritten = {name[:5] for name in after if after[name] != before.get(name)} - {"store"}
    assert rewritten == {f"{shard_of('v040', 4):05d}"}

    enc.calls.clear()  # a changed source: that one only
    store.update(items(41, {"v007": "h1"}), "enc1", enc)
    assert enc.calls == ["v007"]

    enc.calls.clear()  # another encoder: everything
    store.update(items(41, {"v007": "h1"}), "enc2", enc)
    assert sorted(enc.calls) == [f"v{i:03d}" for i in range(41)]

    features = store.load(["v003", "v007"])
    expected, _ = Encoder()(Item("v007", "h1"))
    np.testing.assert_array_equal(features["v007"], expected)
    assert isinstance(features["v003"].base, np.memmap) or isinstance(features["v003"], np.memmap)
    assert set(load_features(store.root)) == {f"v{i:03d}" for i in range(41)}
    with pytest.raises(KeyError, match="no features"):
        store.load(["nope"])

    store.update(items(30), "enc2", enc)  # removed ids disappear from their shards
    assert set(store.metadata()["id"]) == {f"v{i:03d}" for i in range(30)}


def test_failures_are_rows_and_not_retried_until_the_source_changes(tmp_path):
    store, enc = FeatureStore(tmp_path / "f", 3), Encoder(fail={"v002"})
    rows = {r["id"]: r for r in store.update(items(6), "e", enc)}
    assert (rows["v002"]["status"], rows["v002"]["reason"]) == ("failed", "error")
    assert "cannot decode" in rows["v002"]["error"] and sum(r["status"] == "ok" for r in rows.values()) == 5
    enc.calls.clear()
    rows = {r["id"]: r for r in store.update(items(6), "e", enc)}
    assert enc.calls == [] and rows["v002"]["status"] == "failed"
    enc.calls.clear()
    store.update(items(6, {"v002": "fixed"}), "e", Encoder())
    assert "v002" in store.load(["v002"])


def test_ranks_write_exactly_the_shards_one_process_writes(tmp_path):
    single, split = FeatureStore(tmp_path / "one", 5), FeatureStore(tmp_path / "two", 5)
    single.update(items(23), "e", Encoder())
    calls = []
    for rank in (0, 1):
        enc = Encoder()
        split.update(items(23), "e", enc, rank=rank, world=2)
        calls.append(set(enc.calls))
    assert not calls[0] & calls[1] and len(calls[0] | calls[1]) == 23  # disjoint work
    names = sorted(p.name for p in single.root.iterdir())
    assert names == sorted(p.name for p in split.root.iterdir())
    for name in names:
        assert sha256_file(single.root / name) == sha256_file(split.root / name), name


def test_incomplete_shard_is_rebuilt(tmp_path):
    store, enc = FeatureStore(tmp_path / "f", 2), Encoder()
    store.update(items(10), "e", enc)
    victim = shard_of("v000", 2)
    store.path(victim, "done").unlink()  # as if killed while writing this shard
    assert store.index(victim) is None and "v000" not in store.load()  # readers ignore an incomplete shard
    enc.calls.clear()
    store.update(items(10), "e", enc)
    assert sorted(enc.calls) == sorted(i.id for i in items(10) if shard_of(i.id, 2) == victim)
    assert len(store.load()) == 10


def test_a_torch_checkpoint_saved_twice_is_the_same_bytes(tmp_path):
    """torch.save to a path names the zip's root folder after it, and atomic writes go through a random temp name:
    two saves of the same weights used to differ, so no rebuild reproduced a model's DVC hash."""
    import torch

    from pipeline.shards import atomic_torch_save

    state = {"model": torch.nn.Linear(4, 3).state_dict(), "step": 7}
    atomic_torch_save(tmp_path / "a.pt", state)
    atomic_torch_save(tmp_path / "b" / "v2m.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "v2m.pt").read_bytes()
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert not list(tmp_path.glob("**/.*tmp*"))  # no temp file left behind
