"""params.yaml and profiles: strict typed loading, and profiles that write params.yaml."""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline import cli, profiles
from pipeline.config import (
    ConfigError,
    IngestConfig,
    Params,
    SamplingConfig,
    load_params,
    params_from_dict,
    upgrade,
)

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_are_the_embedded_profile():
    assert (REPO / "params.yaml").read_text() == profiles.render("embedded", REPO / "profiles")
    assert load_params(REPO / "params.yaml") == Params()


def test_sections_are_frozen_dataclasses():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        params.base.seed = 1  # type: ignore[misc]
    assert isinstance(params.ingest, IngestConfig) and params.ingest.download.max_height == 480


@pytest.mark.parametrize("data, message", [
    ({"base": {"sede": 1}}, "unknown key base.sede"),
    ({"ingest": {"download": {"max_hieght": 1}}}, "unknown key ingest.download.max_hieght"),
    ({"trian": {}}, "unknown key trian"),
    ({"base": {"fps": "fast"}}, "base.fps: expected int, got 'fast'"),
    ({"base": {"fps": 24.5}}, "base.fps: expected int"),
    ({"base": {"seed": True}}, "base.seed: expected int"),
    ({"ingest": {"require_audio": "yes"}}, "ingest.require_audio: expected bool"),
    ({"ingest": {"download": 3}}, "ingest.download: expected a mapping"),
    ({"base": {"seed": None}}, r"base.seed: expected int, got null \(this key cannot be unset\)"),
    ({"train": {"harmony_knn": "3"}}, "train.harmony_knn: expected int or null, got '3'"),
    ({"train": {"interpolate": "maybe"}}, "train.interpolate: expected bool or null, got 'maybe'"),
    # renamed keys name their new name
    ({"embed": {"torch_threads": 1}}, "embed.torch_threads is now embed.threads"),
    ({"evaluate": {"jobs": 2}}, "evaluate.jobs is now evaluate.workers"),
    ({"generate": {"guidance": 2.0}}, "generate.guidance is now generate.sampling.guidance"),
    ({"train": {"plausibility": 0.1}}, "train.plausibility is now train.sampling.plausibility"),
    # the sentinels that meant "not set" before null
    ({"train": {"harmony_knn": -1}}, "train.harmony_knn: -1 is now written null"),
    ({"train": {"harmony": -1.0}}, r"train.harmony: -1.0 is now written null"),
    ({"train": {"harmony_track": "on"}}, "train.harmony_track: 'on' is now written true"),
    ({"separate": {"weights_dir": ""}}, "separate.weights_dir: '' is now written null"),
    ({"embed": {"flow": {"checkpoint": ""}}}, "embed.flow.checkpoint: '' is now written null"),
])
def test_bad_params_fail_naming_file_and_key(tmp_path, data, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_null_unsets_optional_keys():
    params = params_from_dict({"train": {"harmony_knn": None, "interpolate": False, "direction": "both"},
                               "evaluate": {"flow_cache": None}})
    assert params.train.harmony_knn is None and params.train.interpolate is False and params.train.direction == "both"
    assert params.evaluate.flow_cache is None and params.separate.weights_dir is None  # the defaults: not set


def test_upgrade_reads_params_written_before_the_renames_and_null():
    old = {"train": {"harmony_knn": -1, "harmony": 0.5, "interpolate": "off", "direction": ""},
           "embed": {"torch_threads": 1, "flow": {"checkpoint": "", "grid": 4}}}
    new = upgrade(old)
    assert new["train"] == {"harmony_knn": None, "harmony": 0.5, "interpolate": False, "direction": None}
    assert new["embed"] == {"flow": {"checkpoint": None, "grid": 4}, "threads": 1}
    assert old["train"]["harmony_knn"] == -1  # a copy
    params_from_dict(new)


def test_train_validation_samples_as_generate_does_without_the_harmony_bias():
    train, generate = Params().train.sampling, Params().generate.sampling
    assert isinstance(train, SamplingConfig) and isinstance(generate, SamplingConfig)
    assert replace(train, harmony_bias=generate.harmony_bias) == generate and train.harmony_bias == 0.0
    assert generate == SamplingConfig(guidance=3.0, temperature=0.8, top_k=0, plausibility=0.03, harmony_bias=8.0,
                                      mode_guard=0.0)
    assert generate.problem("generate.sampling") is None
    assert replace(generate, plausibility=2.0).problem("x") == "x.plausibility 2 must be in [0, 1] (0 = every token)"
    assert replace(generate, harmony_bias=-1.0).problem("x") == "x.harmony_bias -1 must be >= 0 (0 = none)"
    assert replace(generate, mode_guard=-1.0).problem("x") == "x.mode_guard -1 must be >= 0 (0 = none)"


def test_ints_are_accepted_for_floats_and_missing_keys_take_defaults():
    params = params_from_dict({"base": {"clip_seconds": 30}})
    assert params.base.clip_seconds == 30.0 and isinstance(params.base.clip_seconds, float)
    assert params.ingest == IngestConfig()


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")
    assert load_params(tmp_path / "absent.yaml", missing_ok=True) == Params()


def test_profile_use_writes_params_and_round_trips(tmp_path):
    out = tmp_path / "params.yaml"
    assert profiles.main(["use", "v2m20k", "--dir", str(REPO / "profiles"), "--params", str(out)]) == 0
    params = load_params(out)
    assert params.base.clip_seconds == 30.0 and params.ingest.manifest == "data/manifests/v2m20k.csv"
    assert params.ingest.audio_channels == 2 and params.ingest.download.retries == 4
    assert params.ingest.short_side == IngestConfig().short_side  # untouched keys keep the embedded defaults
    assert profiles.main(["use", "embedded", "--dir", str(REPO / "profiles"), "--params", str(out)]) == 0
    assert out.read_text() == (REPO / "params.yaml").read_text()


def test_bad_profile_is_reported(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("base:\n  clip_second: 10\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key base\.clip_second"):
        profiles.render("typo", tmp_path)
    with pytest.raises(SystemExit, match="no such profile"):
        profiles.render("absent", tmp_path)
    assert cli.main(["profile", "show", "typo", "--dir", str(tmp_path)]) == 2
    assert "unknown key base.clip_second" in capsys.readouterr().err
    assert profiles.available(REPO / "profiles") == ["embedded", "production-smoke", "v2m20k"]


@pytest.mark.parametrize("name", ["production-smoke", "v2m20k"])
def test_real_data_profiles_run_the_production_models_from_weights(name):
    """Both real-data profiles: EnCodec tokens into the MusicGen-small decoder, the published metrics, and every
    weight from weights/ in the layout scripts/production_weights.py writes (docs/production.md)."""
    params = params_from_dict(yaml.safe_load(profiles.render(name, REPO / "profiles")), name)
    assert (params.tokenize.codec, params.train.preset, params.evaluate.embedding) == \
        ("encodec_32khz", "musicgen-small", "vggish")
    assert params.tokenize.store_dir == "data/tokens/encodec_32khz"
    assert params.train.beat_clips == 0  # real clips have no beat labels
    paths = [params.separate.weights_dir, params.embed.clip.pretrained, params.embed.flow.checkpoint,
             params.tokenize.encodec.weights, params.train.pretrained_dir, params.evaluate.passt_checkpoint,
             params.evaluate.vggish_weights]
    assert all(p.startswith("weights/") for p in paths), paths
    assert params.embed.flow.method == "ptlflow:rapidflow" and params.embed.clip.model == "ViT-B-32"


def _resolve(text: str, data: dict) -> str:
    """dvc.yaml's ${a.b.c} interpolation of `text` from a params mapping."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(functools.reduce(operator.getitem, m.group(1).split("."), data)),
                  text)


@pytest.mark.parametrize("name", profiles.available(REPO / "profiles"))
def test_each_profile_is_consistent(name):
    """What a profile trains on is what it tokenized: the train stages read (and depend on) the store of
    tokenize.codec under tokenize.out_dir, an output of the tokenize stage; the codec and the model preset exist."""
    from pipeline.codecs import list_codecs
    from pipeline.model import list_presets

    data = yaml.safe_load(profiles.render(name, REPO / "profiles"))
    params = params_from_dict(data)
    assert params.tokenize.codec in list_codecs() and params.train.preset in list_presets()
    assert params.tokenize.store_dir == f"{params.tokenize.out_dir}/{params.tokenize.codec}"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [_resolve(out if isinstance(out, str) else next(iter(out)), data) for out in stages["tokenize"]["outs"]]
    assert params.tokenize.out_dir in outs
    for stage in (stages["train"]["do"], stages["train_seed"]):
        deps = [_resolve(d, data) for d in stage["deps"]]
        assert params.tokenize.store_dir in deps and "tokenize.codec" in stage["params"]
    if name == "v2m20k":
        assert params.tokenize.store_dir == "data/tokens/encodec_32khz"


def test_the_old_tokens_dir_key_says_where_train_reads_now():
    with pytest.raises(ConfigError, match=r"train.tokens_dir was removed: train reads \{tokenize.out_dir\}/"):
        params_from_dict({"train": {"tokens_dir": "data/tokens/melvq"}})

