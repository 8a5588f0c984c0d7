"""The tokenize stage on a small SynthV2M music folder (as the separate stage writes it): one manifest row per
upstream id, bad input recorded and not fatal, tokens in the shared shard store, incremental reruns, a refit when the
train music changes, two ranks writing what one writes, and the round trip metrics file."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tokenize
from pipeline.config import Params, deep_merge, load_params, to_dict
from pipeline.media import write_wav
from pipeline.shards import load_features, write_manifest
from tests.test_codecs import synth_clip

SR = 32000
SECONDS = 4.0


def labels(index: int) -> dict:
    from pipeline.config import BaseConfig, SynthConfig
    from pipeline.synth import labels as synth_labels
    from pipeline.synth import make_spec

    return synth_labels(make_spec(0, index, SynthConfig(), BaseConfig(clip_seconds=SECONDS)))


def make_music(folder: Path, n_train: int = 6, n_test: int = 2) -> list[dict]:
    """A music folder as the separate stage leaves it: SynthV2M wavs, an upstream failure, and three bad inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_test):
        path = folder / f"synth_{i:05d}.wav"
        write_wav(path, synth_clip(i, SECONDS)[0], SR)
        rows.append({"id": f"synth_{i:05d}", "split": "train" if i < n_train else "test", "status": "ok",
                     "reason": "", "error": "", "music_path": str(path), "duration_s": SECONDS, "sample_rate": SR,
                     "channels": 1, **labels(i)})
    write_wav(folder / "quiet.wav", np.zeros(SR, np.float32), SR)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00not a wav at all")
    for name, status, path in (("quiet", "ok", "quiet.wav"), ("broken", "ok", "broken.wav"),
                               ("gone", "ok", "gone.wav"), ("dropped", "failed", "")):
        rows.append({"id": name, "split": "train", "status": status, "reason": "corrupt" if status != "ok" else "",
                     "error": "", "music_path": str(folder / path) if path else "", "duration_s": 1.0,
                     "sample_rate": SR, "channels": 1})
    write_manifest(folder / "manifest.parquet", rows)
    return rows


def write_params(root: Path, **tokenize_overlay) -> Path:
    overlay = {"tokenize": deep_merge({
        "music_dir": str(root / "music"), "out_dir": str(root / "tokens"), "model_dir": str(root / "models"),
        "metrics_path": str(root / "metrics" / "codec.json"), "figure_path": str(root / "codec.png"),
        "real_music_dir": str(root / "no-real-music"), "num_shards": 3, "threads": 1, "eval_max_clips": 2,
        "melvq": {"codebook_size": 32, "kmeans_iters": 5, "griffin_lim_iters": 4}}, tokenize_overlay)}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(to_dict(Params()), overlay), sort_keys=False))
    return path


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    make_music(tmp_path / "music")
    write_params(tmp_path)
    return tmp_path


def run_stage(root: Path) -> int:
    return tokenize.main(["--params", str(root / "params.yaml")])


def test_tokens_manifest_metrics_and_bad_input(project, capsys):
    assert run_stage(project) == 1  # 2 failed of 12 rows > max_fail_ratio 0.1: reported, yet everything is written
    out = capsys.readouterr()
    assert "failed  broken: corrupt" in out.out and "failed  gone: missing" in out.out
    manifest = pd.read_parquet(project / "tokens/melvq/manifest.parquet")
    assert len(manifest) == 12 and manifest["id"].is_unique
    status = dict(zip(manifest["id"], manifest["status"] + ":" + manifest["reason"], strict=True))
    assert status["quiet"] == "skipped:silent_audio" and status["dropped"] == "skipped:upstream_failed"
    assert status["broken"] == "failed:corrupt" and status["gone"] == "failed:missing"
    assert [status[f"synth_{i:05d}"] for i in range(8)] == ["ok:"] * 8
    assert {"tempo_bpm", "beat_times", "key", "caption"} <= set(manifest.columns)  # labels pass through

    tokens = load_features(project / "tokens/melvq")
    info = json.loads((project / "tokens/melvq/codec.json").read_text())
    assert info["codec"] == "melvq" and info["state_dir"] == str(project / "models/melvq")
    assert set(tokens) == {f"synth_{i:05d}" for i in range(8)}
    codes = tokens["synth_00007"]
    assert codes.dtype == np.int16 and codes.shape == (int(SECONDS * info["frame_rate"]), info["num_codebooks"])
    assert codes.max() < info["codebook_size"]
    from pipeline.codecs import load_codec

    codec = load_codec("melvq", load_params(project / "params.yaml").tokenize)  # as train/generate will
    assert np.array_equal(codec.encode(synth_clip(7, SECONDS)[0]).T, codes)

    metrics = json.loads((project / "metrics/codec.json").read_text())
    assert metrics["codec"] == "melvq" and metrics["num_codebooks"] == info["num_codebooks"]
    synth = metrics["round_trip"]["synthv2m"]
    assert synth["clips"] == 2 and {"chroma", "beat_f1", "onset_f1", "beat_f1_original"} <= set(synth)
    assert metrics["round_trip"]["real"] is None and "no such folder" in metrics["notes"]["real"]
    assert (project / "codec.png").stat().st_size > 10_000
    fit = json.loads((project / "models/melvq/melvq.json").read_text())
    assert fit["fit"]["items"] == 6  # the train split's ok music only: not quiet/broken/gone/test


def test_rerun_is_incremental_and_a_train_change_refits(project):
    run_stage(project)
    before, models = mtimes(project / "tokens/melvq"), mtimes(project / "models")
    assert run_stage(project) == 1
    assert mtimes(project / "tokens/melvq") == before and mtimes(project / "models") == models  # nothing redone

    # a decode-only setting: no refit, no token recomputed, but the round trip is measured again
    metrics = (project / "metrics/codec.json").stat().st_mtime_ns
    write_params(project, melvq={"codebook_size": 32, "kmeans_iters": 5, "griffin_lim_iters": 2, "gate_sigmas": 1.0})
    assert run_stage(project) == 1
    assert mtimes(project / "tokens/melvq") == before and mtimes(project / "models") == models
    assert (project / "metrics/codec.json").stat().st_mtime_ns != metrics

    # a changed test track: only its shard is rewritten, the fit is reused
    write_wav(project / "music/synth_00007.wav", synth_clip(20, SECONDS)[0], SR)
    result = tokenize.run(load_params(project / "params.yaml").base, load_params(project / "params.yaml").tokenize)
    assert result["computed"] == ["synth_00007"] and mtimes(project / "models") == models
    # a changed train track: refit, so every token is recomputed
    write_wav(project / "music/synth_00000.wav", synth_clip(21, SECONDS)[0], SR)
    result = tokenize.run(load_params(project / "params.yaml").base, load_params(project / "params.yaml").tokenize)
    assert len(result["computed"]) == 11 and mtimes(project / "models") != models  # every ok-upstream id, bad ones too


def test_two_ranks_write_what_one_writes(project, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize, "FIT_POLL_S", 0.05)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    params = load_params(project / "params.yaml")
    results = {}

    def rank(r):
        results[r] = tokenize.run(params.base, params.tokenize, rank=r, world=2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # rank 1 first: it waits for the fit
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[1]["manifest"] is None and len(results[0]["manifest"]) == 12
    assert not {r["shard"] for r in results[0]["rows"]} & {r["shard"] for r in results[1]["rows"]}
    two = load_features(project / "tokens/melvq")
    single = project / "single"
    shutil.copytree(project / "music", single / "music")
    rows = pd.read_parquet(single / "music/manifest.parquet")
    rows["music_path"] = [p.replace(str(project / "music"), str(single / "music")) for p in rows["music_path"]]
    rows.to_parquet(single / "music/manifest.parquet")
    write_params(single)
    assert run_stage(single) == 1
    one = load_features(single / "tokens/melvq")
    assert set(one) == set(two) and all(np.array_equal(one[i], two[i]) for i in one)


def test_real_music_round_trip(project, shared_data):
    real = project / "real"
    real.mkdir()
    os.symlink(shared_data / "music/sorohan_solo_trumpet_5s.ogg", real / "trumpet.ogg")  # read in place, not copied
    write_params(project, real_music_dir=str(real), real_max_seconds=3.0)
    run_stage(project)
    metrics = json.loads((project / "metrics/codec.json").read_text())
    assert metrics["round_trip"]["real"]["clips"] == 1 and metrics["round_trip"]["real"]["seconds"] == 3.0
    assert 0.0 <= metrics["round_trip"]["real"]["chroma"] <= 1.0


def test_missing_upstream_manifest_names_the_file(tmp_path):
    write_params(tmp_path)
    with pytest.raises(SystemExit, match=r"music/manifest.parquet: no such manifest"):
        run_stage(tmp_path)
