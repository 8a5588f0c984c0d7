"""The contract between the stages' manifests: label pass-through, upstream hashes, skipped rows, pruning."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.manifest import INGEST_COLUMNS, label_columns, prune, read_upstream, skipped_upstream, upstream_hash
from pipeline.shards import stable_hash, write_manifest


def test_labels_hashes_and_skipped_rows(tmp_path):
    frame = pd.DataFrame(columns=[*INGEST_COLUMNS[:5], "caption", "tempo_bpm"])
    assert label_columns(frame, INGEST_COLUMNS) == ["caption", "tempo_bpm"]
    row = {"source_sha256": "abc", "params_hash": "p1", "clip_path": "c.mp4", "audio_path": "a.wav"}
    # the hash recorded in every separate/embed output: changing its formula would recompute everything
    assert upstream_hash(row, "clip_path") == stable_hash(json.dumps(["abc", "p1", "c.mp4"]))
    assert upstream_hash(row, "clip_path") != upstream_hash(row, "audio_path")
    assert skipped_upstream({"status": "failed", "reason": "corrupt"}, "ingest") == {
        "status": "skipped", "reason": "upstream_failed", "error": "ingest: corrupt"}
    with pytest.raises(SystemExit, match=r"embed: .*no such manifest \(run `v2m ingest` first\)"):
        read_upstream(tmp_path / "missing.parquet", "embed", "ingest")
    write_manifest(tmp_path / "m.parquet", [{"id": "a", "status": "ok"}])
    assert list(read_upstream(tmp_path / "m.parquet", "embed", "ingest")["id"]) == ["a"]


def test_prune_removes_only_recorded_ids_and_never_all_without_the_flag(tmp_path):
    for name in ("clips/a.mp4", "clips/b.mp4", "clips/c.mp4", "rows/a.json", "rows/b.json", "keep.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert prune(tmp_path, ("clips/{id}.mp4",), {"a"}, "ingest", "m.csv") == 1  # c has no record: not ours
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")) == [
        "clips/a.mp4", "clips/c.mp4", "keep.txt", "rows/a.json"]
    with pytest.raises(SystemExit, match=r"ingest: m\.csv: no usable rows; refusing to remove the outputs of all 1"):
        prune(tmp_path, ("clips/{id}.mp4",), set(), "ingest", "m.csv")
    assert (tmp_path / "clips" / "a.mp4").exists()
    assert prune(tmp_path, ("clips/{id}.mp4",), set(), "ingest", "m.csv", allow_empty=True) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")) == ["clips/c.mp4", "keep.txt"]
