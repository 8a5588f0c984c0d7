"""`v2m summary`, the last thing `make demo` prints: what exists, with counts by status."""

import pandas as pd

from pipeline import summary


def test_summary_lists_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert summary.lines() == ["nothing produced yet: run `make demo` (or `dvc repro`)"]
    (tmp_path / "data/manifests").mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "split": ["train", "test"]}).to_csv("data/manifests/synth.csv", index=False)
    (tmp_path / "data/ingest").mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "status": ["ok", "failed"], "reason": ["", "corrupt"]}).to_parquet(
        "data/ingest/manifest.parquet")
    text = "\n".join(summary.lines())
    assert "2 SynthV2M clips (test 1, train 1)" in text
    assert "ingest   ok 1 | failed 1 (corrupt 1)" in text
