"""scripts/chroma_ceiling.py on real SynthV2M music: the reference's argmax chroma follows the chord root, and a
progression-blind guess can do no better than the actual progression."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from pipeline.config import BaseConfig, SynthConfig, params_from_dict, to_dict
from pipeline.media import write_wav
from pipeline.synth import make_spec, render_audio
from tests.conftest import load_script


def test_reference_follows_the_chord_root_and_the_blind_guess_is_lower(tmp_path):
    base, synth = BaseConfig(clip_seconds=6.0), SynthConfig()
    music = tmp_path / "music"
    music.mkdir()
    rows = []
    for i in range(4):
        spec = make_spec(base.seed, i, synth, base)
        path = music / f"synth_{i:05d}.wav"
        write_wav(path, render_audio(spec, 32000), 32000)
        rows.append({"id": spec.id, "split": "test", "status": "ok", "music_path": str(path)})
    pd.DataFrame(rows).to_parquet(music / "manifest.parquet")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(params_from_dict(
        {"base": {"clip_seconds": 6.0}, "separate": {"out_dir": str(music)}}))))
    out = tmp_path / "ceiling.json"
    assert load_script("chroma_ceiling").main(["--params", str(params), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_clips"] == 4 and result["frames"] > 150
    assert result["reference_on_chord_root"] >= 0.6
    assert result["reference_on_chord_root"] >= result["most_likely_progression"] >= result["tonic_throughout"] - 0.05
    with pytest.raises(SystemExit, match="no ok val clips"):
        load_script("chroma_ceiling").main(["--params", str(params), "--split", "val", "--out", str(out)])
