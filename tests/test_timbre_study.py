"""scripts/timbre_study.py: the instrument probe of the cached features, and the other-instrument prompts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml

from pipeline.config import Params, to_dict
from pipeline.shards import FeatureStore, Item
from tests.conftest import load_script

INSTRUMENTS = ("piano", "organ", "pluck", "bell")


def test_probe_finds_the_instrument_where_the_features_carry_it(tmp_path, capsys):
    """CLIP rows that encode the instrument (plus noise) are probed right on held-out clips; flow rows of pure noise
    near chance: the probe measures what the features carry, nothing else."""
    script = load_script("timbre_study")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 3
    ids = [f"synth_{i:05d}" for i in range(80)]
    instrument = [INSTRUMENTS[i % 4] for i in range(80)]
    split = ["train"] * 60 + ["val"] * 10 + ["test"] * 10
    items = [Item(i, "h", k) for i, k in zip(ids, instrument, strict=True)]
    FeatureStore(tmp_path / "features/clip", 2).update(
        items, "enc", lambda it: (centres[INSTRUMENTS.index(it.payload)] + rng.normal(size=(5, 6)), {"fps": 2.0}))
    FeatureStore(tmp_path / "features/flow", 2).update(items, "enc", lambda it: (rng.normal(size=(20, 4)), {}))
    (tmp_path / "ingest").mkdir()
    pd.DataFrame({"id": ids, "split": split, "status": "ok", "instrument": instrument}).to_parquet(
        tmp_path / "ingest/manifest.parquet")
    params = to_dict(Params())
    params["embed"]["out_dir"], params["ingest"]["out_dir"] = str(tmp_path / "features"), str(tmp_path / "ingest")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert script.main(["probe", "--params", str(tmp_path / "params.yaml")]) == 0
    rows = {r["features"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["clip"]["train"] == 60 and rows["clip"]["held_out"] == 20
    assert min(rows["clip"]["accuracy_by_C"].values()) == 1.0
    assert max(rows["flow"]["accuracy_by_C"].values()) <= 0.6


def test_the_steering_prompt_names_another_instrument_fixed_per_clip():
    from pipeline.synth import INSTRUMENT_SHAPES

    script = load_script("timbre_study")
    assert script.INSTRUMENTS == tuple(INSTRUMENT_SHAPES)  # the script's list is SynthV2M's
    chosen = {i: script.other_instrument(f"synth_{i:05d}", INSTRUMENTS[i % 4]) for i in range(40)}
    assert all(chosen[i] != INSTRUMENTS[i % 4] and chosen[i] in INSTRUMENTS for i in chosen)
    assert len(set(chosen.values())) == 4  # the prompts spread over the instruments
    assert script.other_instrument("synth_00003", "bell") == chosen[3]  # a pure function of the id


def test_instrument_prior_counts_which_instrument_each_token_was_written_in():
    """log P(instrument | token) per codebook: a token written only in piano clips leans to piano, one written in
    piano and organ clips alike splits between them, one never written is uniform; each row is a distribution."""
    script = load_script("timbre_study")
    codes = {"a": np.array([[3, 0], [3, 1], [5, 1]]),  # (T, K): codebook 0 writes 3, 3, 5; codebook 1 0, 1, 1
             "b": np.array([[5, 1], [5, 1], [5, 2]])}
    table = script.instrument_prior(codes, {"a": "piano", "b": "organ"}, 2, 6)
    assert table.shape == (2, 6, 4)
    np.testing.assert_allclose(np.exp(table).sum(-1), 1.0)
    np.testing.assert_allclose(np.exp(table[0, 3]), [3 / 6, 1 / 6, 1 / 6, 1 / 6])  # two piano writes, add-one
    np.testing.assert_allclose(np.exp(table[0, 5]), [2 / 8, 4 / 8, 1 / 8, 1 / 8])  # one piano, three organ
    np.testing.assert_allclose(np.exp(table[1, 4]), [0.25] * 4)  # never written
    np.testing.assert_allclose(np.exp(table[1, 1]), [3 / 8, 3 / 8, 1 / 8, 1 / 8])  # two piano, two organ
