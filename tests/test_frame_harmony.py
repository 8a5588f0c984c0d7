"""scripts/frame_harmony.py on real SynthV2M music: the ground truth itself is mostly chord roots and never outside
the key; the same music a semitone up is mostly outside it."""

from __future__ import annotations

import json

import librosa
import pandas as pd
import pytest
import yaml

from pipeline.config import BaseConfig, SynthConfig, params_from_dict, to_dict
from pipeline.media import write_wav
from pipeline.synth import make_spec, render_audio
from tests.conftest import load_script


def test_ground_truth_is_on_the_roots_and_a_transposed_copy_is_outside_the_key(tmp_path, capsys):
    base, synth = BaseConfig(clip_seconds=6.0), SynthConfig()
    music, same, shifted = (tmp_path / name for name in ("music", "same", "shifted"))
    for folder in (music, same, shifted):
        folder.mkdir()
    rows = []
    for i in range(3):
        spec = make_spec(base.seed, i, synth, base)
        audio = render_audio(spec, 32000)
        for folder, y in ((music, audio), (same, audio),
                          (shifted, librosa.effects.pitch_shift(audio, sr=32000, n_steps=1))):
            write_wav(folder / f"{spec.id}.wav", y, 32000)
        rows.append({"id": spec.id, "music_path": str(music / f"{spec.id}.wav")})
    pd.DataFrame(rows).to_parquet(music / "manifest.parquet")
    write_wav(same / "synth_09999.wav", audio, 32000)  # no ground truth: skipped, and said so
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(params_from_dict(
        {"base": {"clip_seconds": 6.0}, "separate": {"out_dir": str(music)}}))))
    assert load_script("frame_harmony").main([str(same), str(shifted), "--params", str(params)]) == 0
    captured = capsys.readouterr()
    own, up = (json.loads(line) for line in captured.out.splitlines())
    assert "synth_09999" in captured.err and own["clips"] == up["clips"] == 3 and own["frames"] > 120
    classes = ("root", "chord_tone", "scale", "outside_key")
    assert abs(sum(own[c] for c in classes) - 1) < 0.01
    assert own["ground_truth"] == {c: own[c] for c in classes}  # the ground truth scored against itself
    assert own["root"] >= 0.6 and own["outside_key"] <= 0.05
    assert up["root"] <= 0.2 and up["outside_key"] >= 0.4
    with pytest.raises(SystemExit, match="no SynthV2M wavs"):
        load_script("frame_harmony").main([str(tmp_path), "--params", str(params)])
