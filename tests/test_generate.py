"""pipeline/generate and the inference library it calls (pipeline/inference): `v2m generate` on real media (a 3 s and
a 70 s clip, a VP8 webm, bad inputs, a batch), the prompt continuation in V2M.generate, text prompts, and the generate
stage's layout.

The model is real and tiny: the module fixture runs the pipeline itself (synth -> ingest -> separate -> embed ->
tokenize -> train, debug preset, text on) on a few short SynthV2M clips in a temporary folder, so generation uses the
same encoders, codec and params that made the training data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from pipeline import embed, generate, inference, ingest, separate, synth, tokenize, train
from pipeline.config import Params, deep_merge, load_params, to_dict
from pipeline.media import load_audio, probe, video_duration
from tests.conftest import ffmpeg, load_script, make_video

torch.set_num_threads(1)
SECONDS = 4.0  # the model's window here


@pytest.fixture(scope="module")
def project(trained_project) -> dict:
    return trained_project  # tests/conftest.py: build_project below, once per session (the serve tests use it too)


def build_project(root: Path) -> dict:
    """A trained debug model (text on) made by the pipeline's own stages, with its params file."""
    overlay = {
        "base": {"clip_seconds": SECONDS},
        "synth": {"out_dir": str(root / "raw"), "manifest": str(root / "synth.csv"), "n_train": 6, "n_val": 1,
                  "n_test": 2, "width": 96, "height": 96, "preview_clips": 1, "preview_path": str(root / "p.png")},
        "ingest": {"manifest": str(root / "synth.csv"), "out_dir": str(root / "ingest"), "short_side": 96},
        "separate": {"out_dir": str(root / "music")},
        "embed": {"out_dir": str(root / "features"), "encoders_dir": str(root / "encoders"), "num_shards": 2,
                  "report_path": str(root / "flow.png"), "report_clips": 1},
        "tokenize": {"music_dir": str(root / "music"), "out_dir": str(root / "tokens"),
                     "model_dir": str(root / "codecs"), "metrics_path": str(root / "codec.json"),
                     "figure_path": str(root / "codec.png"), "real_music_dir": str(root / "none"), "num_shards": 2,
                     "threads": 1, "eval_max_clips": 1,
                     "melvq": {"codebook_size": 32, "kmeans_iters": 4, "griffin_lim_iters": 4, "nnls_iters": 10}},
        "train": {"preset": "debug", "text": True, "max_steps": 30, "batch_size": 4, "ckpt_every": 30,
                  "beat_clips": 0, "warmup_steps": 5,
                  "out_dir": str(root / "models"), "metrics_dir": str(root / "metrics")},
        "generate": {"out_dir": str(root / "generated"), "systems": ["full"], "prompt_seconds": 2.0},
    }
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(deep_merge(to_dict(Params()), overlay), sort_keys=False))
    p = ["--params", str(params)]
    assert synth.main(p) == 0 and ingest.main(p) == 0 and separate.main(p) == 0
    assert embed.main([*p, "--init-encoders"]) == 0 and embed.main(p) == 0
    assert tokenize.main(p) == 0 and train.main([*p, "--system", "full"]) == 0
    ckpt = root / "models" / "full" / "v2m.pt"
    # the same model without its text stream: what a checkpoint trained with train.text: false looks like
    state = torch.load(ckpt, weights_only=False)
    state["config"]["fusion"]["text_dim"] = 0
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("fusion.text_in")}
    torch.save(state, root / "no_text.pt")
    # and one that leans on its text: 30 train steps on six clips teach a debug model little use of the caption
    # (next-token probabilities move by ~1e-3), so the CLI test below scales the text projection up
    state = torch.load(ckpt, weights_only=False)
    for name in ("fusion.text_in.1.weight", "fusion.text_in.1.bias"):
        state["model"][name] = state["model"][name] * 30
    torch.save(state, root / "text_heavy.pt")
    return {"root": root, "params": params, "model": ckpt, "no_text": root / "no_text.pt",
            "text_heavy": root / "text_heavy.pt"}


def run(project: dict, *args: str, model: Path | None = None) -> int:
    return generate.main([*args, "--params", str(project["params"]), "--model", str(model or project["model"])])


def video_packets(path: Path) -> list[tuple]:
    """(pts, keyframe, sha1 of the bytes) of every packet of the first video stream: equal lists = untouched stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(float(pk.pts * pk.time_base), pk.is_keyframe, hashlib.sha1(bytes(pk)).hexdigest())
                for pk in container.demux(stream) if pk.size]


def assert_same_length_and_stream(src: Path, out: Path) -> None:
    duration, fps = video_duration(src)
    assert abs(probe(out).duration_s - max(duration, probe(src).duration_s)) <= 1 / fps + 1e-6
    assert abs(video_duration(out)[0] - duration) <= 1e-6
    assert video_packets(out) == video_packets(src)
    assert probe(out).has_audio


def test_short_and_long_clips_keep_their_length_and_video_stream(project, tmp_path):
    short = make_video(tmp_path / "short.mp4", seconds=3.0, size="160x120", rate="25")
    long = make_video(tmp_path / "long.mp4", seconds=70.0, size="160x120", rate="30", audio=None)
    out = tmp_path / "out"
    assert run(project, str(short), str(long), "-o", str(out)) == 0
    for src in (short, long):
        assert_same_length_and_stream(src, out / src.name)
    assert sorted(p.name for p in out.iterdir()) == ["long.mp4", "short.mp4"]  # no temporary files left


def test_long_video_windows_continue_the_previous_tokens(project, tmp_path):
    """Past the window: overlapping windows (prompt_seconds each, of which the last crossfade_seconds both write),
    the music exactly as long as the video."""
    model = inference.load_model(project["model"], load_params(project["params"]))
    src = make_video(tmp_path / "v.mp4", seconds=13.0, size="128x96", rate="24", audio=None)
    result = inference.generate_one(model, src, tmp_path / "v.wav", model.params.generate, 0, None, wav_only=True)
    fr, window = model.frame_rate, int(SECONDS * model.frame_rate)
    prompt = int(model.params.generate.prompt_seconds * fr)
    assert result["windows"] == len(inference.plan_windows(result["codes"].shape[1], window, prompt)) >= 5
    assert result["prompt_s"] + result["crossfade_s"] == model.params.generate.prompt_seconds
    assert result["crossfade_s"] == round(model.params.generate.crossfade_seconds * fr) / fr > 0
    wav, sr = sf.read(tmp_path / "v.wav")
    assert sr == model.codec.sample_rate and abs(len(wav) / sr - 13.0) < 1 / 24


def test_prompt_is_honoured_and_the_cache_changes_nothing(project):
    """V2M.generate(prompt=...): the prompt comes back as the first frames; the KV cache (prefill) and the plain
    recomputation give the same codes; a greedy continuation of its own first frames reproduces the whole."""
    model = inference.load_model(project["model"], load_params(project["params"]))
    feats = {"clip": np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32), "clip_fps": 2.0,
             "flow": np.random.default_rng(1).normal(size=(32, 160)).astype(np.float32), "flow_fps": 8.0,
             "scene": np.random.default_rng(2).uniform(size=(8, 11)).astype(np.float32), "scene_fps": 2.0}
    batch = inference.window_batch(feats, 0.0, SECONDS, None, "cpu")
    net = model.net
    assert net.cfg.scene_dim == 11 and batch["scene"].shape == (1, 8, 11)  # the project's full reads the scene
    greedy = net.generate(batch, 100, guidance=3.0, temperature=0.0)
    again = net.generate(batch, 100, guidance=3.0, temperature=0.0, prompt=greedy[..., :60])
    assert torch.equal(again, greedy)
    prompt = torch.randint(0, 32, (1, 2, 37), generator=torch.Generator().manual_seed(0))
    cached = net.generate(batch, 100, top_k=8, generator=torch.Generator().manual_seed(1), prompt=prompt)
    plain = net.generate(batch, 100, top_k=8, generator=torch.Generator().manual_seed(1), prompt=prompt,
                         use_cache=False)
    assert torch.equal(cached, plain) and torch.equal(cached[..., :37], prompt)


def test_each_window_batch_carries_the_whole_videos_clip_rows():
    """The VidMuse-style baseline's long-term context is the whole video: window_batch slices the streams to the
    window but passes every CLIP row as `long_clip` (the other systems do not read it)."""
    feats = {"clip": np.arange(40, dtype=np.float32).reshape(20, 2), "clip_fps": 2.0,
             "flow": np.zeros((80, 3), np.float32), "flow_fps": 8.0}
    late = inference.window_batch(feats, 6.0, 2.0, None, "cpu")
    assert late["clip"].shape[1] == 4 and float(late["clip"][0, 0, 0]) == 24.0  # row 12 = 6 s
    assert torch.equal(late["long_clip"][0], torch.from_numpy(feats["clip"])) and late["long_clip_mask"].all()


def test_text_prompt_changes_the_music_and_seed_fixes_it(project, tmp_path):
    # the trained model: a caption moves the guided next-token distribution
    model = inference.load_model(project["model"], load_params(project["params"]))
    feats = {"clip": np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32), "clip_fps": 2.0,
             "flow": np.random.default_rng(1).normal(size=(32, 160)).astype(np.float32), "flow_fps": 8.0,
             "scene": np.random.default_rng(2).uniform(size=(8, 11)).astype(np.float32), "scene_fps": 2.0}
    codes = model.net.generate(inference.window_batch(feats, 0.0, SECONDS, None, "cpu"), 100, temperature=0.0)
    probs = []
    for text in ("calm slow piano in C major", "fast loud drums and bass"):
        batch = inference.window_batch(feats, 0.0, SECONDS, inference.text_embedding(model, text), "cpu")
        probs.append(model.net.guided_logits({**batch, "codes": codes}, 3.0).softmax(-1))
    assert (probs[0] - probs[1]).abs().sum(-1).mean() > 1e-4
    # the CLI end to end, on the model that leans on its text
    src = make_video(tmp_path / "v.mp4", seconds=3.0, size="128x96", audio=None)
    outs = {}
    for name, extra in (("none", []), ("calm", ["--text", "calm slow piano in C major"]),
                        ("drums", ["--text", "fast loud drums and bass"]),
                        ("calm2", ["--text", "calm slow piano in C major"])):
        assert run(project, str(src), "-o", str(tmp_path / f"{name}.wav"), "--wav", "--seed", "3", *extra,
                   model=project["text_heavy"]) == 0
        outs[name] = sf.read(tmp_path / f"{name}.wav")[0]
    assert np.array_equal(outs["calm"], outs["calm2"])  # deterministic for a fixed seed
    assert not np.array_equal(outs["calm"], outs["drums"]) and not np.array_equal(outs["calm"], outs["none"])


def test_text_on_a_model_without_text_is_a_clear_error(project, tmp_path, capsys):
    src = make_video(tmp_path / "v.mp4", seconds=2.0, size="128x96", audio=None)
    assert run(project, str(src), "-o", str(tmp_path / "o.mp4"), "--text", "jazz", model=project["no_text"]) == 2
    err = capsys.readouterr().err
    assert "trained without text" in err and str(project["no_text"]) in err
    assert not (tmp_path / "o.mp4").exists()


def test_webm_stays_copied_and_an_mp4_of_vp8_is_reencoded(project, tmp_path, caplog):
    src = tmp_path / "vp8.webm"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=24:duration=2.5", "-c:v", "libvpx", "-b:v", "200k",
           "-deadline", "realtime", str(src))
    assert run(project, str(src), "-o", str(tmp_path / "same.webm")) == 0
    assert_same_length_and_stream(src, tmp_path / "same.webm")
    caplog.clear()
    assert run(project, str(src), "-o", str(tmp_path / "other.mp4")) == 0
    assert probe(tmp_path / "other.mp4").video_codec == "h264" and "re-encoding" in caplog.text
    duration, fps = video_duration(src)
    assert abs(probe(tmp_path / "other.mp4").duration_s - probe(src).duration_s) <= 1 / fps + 1e-6


def test_bad_inputs_one_line_each_and_the_batch_goes_on(project, tmp_path, capsys):
    good = make_video(tmp_path / "good.mp4", seconds=2.0, size="128x96")
    (tmp_path / "notes.mp4").write_text("not a video at all\n")
    audio_only = tmp_path / "tone.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(audio_only))
    whole = make_video(tmp_path / "whole.mp4", seconds=6.0, size="128x96", extra=["-movflags", "+faststart"])
    corrupt = tmp_path / "cut.mp4"
    corrupt.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    missing = tmp_path / "missing.mp4"
    out = tmp_path / "out"
    inputs = [missing, tmp_path / "notes.mp4", audio_only, corrupt, good]
    assert run(project, *map(str, inputs), "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "4 of 5 input(s) failed" in err
    for path, problem in ((missing, "no such file"), (tmp_path / "notes.mp4", "cannot be read as media"),
                          (audio_only, "no video stream"), (corrupt, "truncated or damaged")):
        lines = [line for line in err.splitlines() if line.startswith(f"  {path}:")]
        assert len(lines) == 1 and problem in lines[0], (path, err)
    assert sorted(p.name for p in out.iterdir()) == ["good.mp4"]  # nothing partial, the good one done
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert run(project, str(good), "-o", str(blocker / "o.mp4")) == 1
    assert "not a writable folder" in capsys.readouterr().err
    assert run(project, str(good), "-o", str(tmp_path / "p.mp4"), "--plausibility", "2") == 1
    assert "generate.sampling.plausibility 2 must be in [0, 1]" in capsys.readouterr().err
    assert run(project, str(good), "-o", str(tmp_path / "b.mp4"), "--harmony-bias", "-1") == 1
    assert "generate.sampling.harmony_bias -1 must be >= 0" in capsys.readouterr().err
    assert run(project, str(good), "-o", str(tmp_path / "m.mp4"), "--mode-guard", "-1") == 1
    assert "generate.sampling.mode_guard -1 must be >= 0" in capsys.readouterr().err


def test_sampling_options_override_generate_sampling(project, tmp_path, monkeypatch):
    """--cfg, --top-k, --temperature, --plausibility, --harmony-bias and --mode-guard set generate.sampling,
    --prompt-seconds and --crossfade-seconds the windows; the rest is params'."""
    seen = {}

    def run_files(inputs, out, model, cfg, *rest):
        seen["cfg"] = cfg
        return [], []

    monkeypatch.setattr(generate, "run_files", run_files)
    assert run(project, "in.mp4", "-o", str(tmp_path / "o.mp4"), "--cfg", "1.5", "--top-k", "4", "--temperature",
               "0.5", "--plausibility", "0.1", "--harmony-bias", "2", "--mode-guard", "3", "--prompt-seconds",
               "1", "--crossfade-seconds", "0.25") == 0
    sampling = seen["cfg"].sampling
    assert (sampling.guidance, sampling.top_k, sampling.temperature, sampling.plausibility, sampling.harmony_bias,
            sampling.mode_guard) == (1.5, 4, 0.5, 0.1, 2.0, 3.0)
    assert seen["cfg"].prompt_seconds == 1.0 and seen["cfg"].crossfade_seconds == 0.25
    assert seen["cfg"].use_cache is True


def test_harmony_bias_on_a_model_without_the_table_is_a_logged_skip(project, tmp_path, caplog):
    """The debug preset has no harmony track, so no token chroma table: the default harmony_bias is not applied, and
    the log says so once for a whole batch, naming the setting."""
    videos = [make_video(tmp_path / f"v{i}.mp4", seconds=2.0) for i in range(2)]
    inference._WARNED.clear()
    with caplog.at_level("WARNING", logger="pipeline.inference"):
        assert run(project, *map(str, videos), "-o", str(tmp_path / "out")) == 0
    said = [r.getMessage() for r in caplog.records if "harmony_bias" in r.getMessage()]
    assert len(said) == 1 and "not applied: the model has no token chroma table" in said[0]


def test_stage_writes_every_system_and_the_manifest(project):
    params = load_params(project["params"])
    frame = generate.run_stage(params)
    out = Path(params.generate.out_dir)
    ids = sorted(pd.read_parquet(Path(params.ingest.out_dir) / "manifest.parquet").query("split == 'test'")["id"])
    assert set(frame["system"]) == {"full", "reference", "retrieval", "random"} and (frame["status"] == "ok").all()
    assert len(frame) == 4 * len(ids) and (out / "manifest.csv").exists()
    for system in ("full", "reference", "retrieval", "random"):
        for item_id in ids:
            clip = Path(params.ingest.out_dir) / "clips" / f"{item_id}.mp4"
            wav, sr = sf.read(out / system / f"{item_id}.wav")
            assert abs(len(wav) / sr - probe(clip).duration_s) < 1 / params.base.fps
            assert video_packets(out / system / f"{item_id}.mp4") == video_packets(clip)
    retrieval = frame[frame["system"] == "retrieval"]
    assert retrieval["source_id"].str.startswith("synth_").all()


def test_rotated_phone_video_keeps_its_rotation(project, tmp_path):
    landscape = make_video(tmp_path / "landscape.mp4", seconds=2.0, size="160x96", rate="30")
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(landscape), "-c", "copy", str(rotated))
    assert run(project, str(rotated), "-o", str(tmp_path / "out.mp4"), "--keep-audio") == 0
    assert probe(tmp_path / "out.mp4").rotation == probe(rotated).rotation in (90, 270)
    assert_same_length_and_stream(rotated, tmp_path / "out.mp4")


def test_score_checkpoint_script_scores_a_split(project, capsys):
    """scripts/score_checkpoint.py (the studies' scorer) on the fixture's trained model: one JSON line per setting,
    every metric in [0, 1], the same line for the same seed."""
    import json

    script = load_script("score_checkpoint")
    args = [str(project["model"]), "{}", '{"temperature": 0.5}', "{}", "--params", str(project["params"]), "--split",
            "test"]
    assert script.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["settings"] for line in lines] == [{}, {"temperature": 0.5}, {}] and lines[0]["clips"] == 2
    for line in lines:
        for metric in ("beat_f1", "tempo_acc", "key_acc", "chroma", "av_align"):
            assert 0.0 <= line[metric] <= 1.0, (metric, line)
    assert lines[0] == lines[2]
    keep = project["params"].parent / "kept"
    assert script.main([str(project["model"]), '{"seed": 3}', "--params", str(project["params"]), "--split", "test",
                        "--keep", str(keep)]) == 0
    assert len(list((keep / "0").glob("*.wav"))) == 2  # --keep: the generated wavs, one folder per setting


def test_stage_for_the_seed_study_takes_a_models_folder_and_skips_the_baselines(project, tmp_path):
    """`v2m generate --stage --no-baselines --models DIR --out OUT` (the generate_seed stages): the trained systems of
    DIR only, and no timing in the manifest (a DVC output holds no machine-local fact)."""
    models = tmp_path / "models"
    (models / "full").mkdir(parents=True)
    shutil.copy(project["model"], models / "full" / "v2m.pt")
    out = tmp_path / "generated"
    generate.main(["--stage", "--no-baselines", "--models", str(models), "--out", str(out), "--params",
                   str(project["params"])])
    frame = pd.read_csv(out / "manifest.csv")
    assert set(frame["system"]) == {"full"} and (frame["status"] == "ok").all()  # the fixture's generate.systems
    assert "seconds" not in frame.columns
    assert sorted(p.name for p in out.iterdir()) == ["full", "manifest.csv"]  # no reference, retrieval, random


def test_stage_for_the_ablation_group_generates_its_systems(project, tmp_path):
    """`v2m generate --stage --no-baselines --ablations --models DIR --patches P` (the generate_ablation stages):
    every system of ablations.trained from DIR, here a VidMuse-style, a no_clip and a spatial-fusion model trained by
    the train stage's own code (the spatial one on the patch stream of `v2m embed --streams patch`) and a data50
    folder; each writes its own music for every clip. Without --patches the spatial model's rows fail, and say why."""
    params = yaml.safe_load(project["params"].read_text())
    params["ablations"] = {**params.get("ablations", {}), "systems": ["vidmuse", "no_clip"], "fractions": [50],
                           "spatial": True, "text": False}
    params["train"]["text"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(path)
    embed.run(loaded, Path(loaded.ingest.out_dir) / "manifest.parquet", tmp_path / "spatial", streams=("patch",))
    patches = tmp_path / "spatial" / "patch"
    models = tmp_path / "models"
    for system in ("vidmuse", "no_clip", "spatial"):
        extra = ["--patches", str(patches)] if system == "spatial" else []
        assert train.main(["--params", str(path), "--system", system, "--out", str(models / system), "--metrics",
                           str(tmp_path / "metrics"), *extra]) == 0
    (models / "data50").mkdir()
    shutil.copy(project["no_text"], models / "data50" / "v2m.pt")
    out = tmp_path / "generated"
    assert generate.main(["--stage", "--no-baselines", "--ablations", "--models", str(models), "--out", str(out),
                          "--params", str(path), "--patches", str(patches)]) == 0
    frame = pd.read_csv(out / "manifest.csv")
    systems = ("vidmuse", "no_clip", "spatial", "data50")
    assert set(frame["system"]) == set(systems) and (frame["status"] == "ok").all()
    first = frame["id"].iloc[0]
    music = {s: load_audio(out / s / f"{first}.wav")[0] for s in systems}
    assert not np.array_equal(music["vidmuse"], music["no_clip"])
    assert not np.array_equal(music["spatial"], music["data50"])
    group = dataclasses.replace(loaded, generate=dataclasses.replace(loaded.generate, workers=1,
                                                                     systems=loaded.ablations.trained))
    frame = generate.run_stage(group, tmp_path / "without", models, baselines=False)  # no --patches
    failed = frame[frame["system"] == "spatial"]
    assert len(failed) == frame["id"].nunique() and (failed["status"] == "failed").all()
    assert failed["error"].str.contains("give --patches DIR").all()
    assert (frame[frame["system"] != "spatial"]["status"] == "ok").all()


def test_text_steering_from_swaps_to_scored_prompts(project, tmp_path):
    """Text steering end to end on the project: `v2m swaps` renders each train clip's score on the other instruments
    and encodes it with the tokenize stage's codec (one manifest row per train clip; a rerun rewrites nothing; a clip
    that no longer renders from the params is a failed row that says so); `v2m train --system text --swaps` learns
    from them; `v2m generate --stage --ablations` writes the text model three ways, each row naming its prompt and the
    instrument it asks for, which evaluate scores it against."""
    from pipeline import evaluate, swaps
    from pipeline.dataset import load_swaps
    from pipeline.shards import load_features

    params = yaml.safe_load(project["params"].read_text())
    params["ablations"] = {**params.get("ablations", {}), "systems": [], "fractions": [], "spatial": False,
                           "text": True, "swaps_dir": str(tmp_path / "swaps"), "swap_workers": 1}
    params["train"].update(text=False, harmony_knn=1, harmony_track=True)  # the harmony bias, as the demo's
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(path)
    assert swaps.main(["--params", str(path)]) == 0
    table = pd.read_csv(tmp_path / "swaps" / "manifest.csv", keep_default_na=False)
    synth_rows = pd.read_csv(loaded.synth.manifest, keep_default_na=False)
    train_ids = sorted(synth_rows.loc[synth_rows["split"] == "train", "id"])
    assert sorted(table["id"]) == train_ids and (table["status"] == "ok").all()
    made = load_swaps(tmp_path / "swaps")
    tokens = load_features(Path(loaded.tokenize.store_dir))
    for i in train_ids:
        own = synth_rows.set_index("id").loc[i, "instrument"]
        assert sorted(made[i]) == sorted({"piano", "organ", "pluck", "bell"} - {own})
        for codes in made[i].values():  # the clip's length in the codec's frames, other tokens than the clip's
            assert codes.shape == np.asarray(tokens[i]).T.shape and not np.array_equal(codes, np.asarray(tokens[i]).T)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "swaps").glob("*.npz")}
    tampered = synth_rows.copy()
    tampered.loc[tampered["id"] == train_ids[0], "spec_hash"] = "0" * 12
    tampered.to_csv(loaded.synth.manifest, index=False)
    try:
        assert swaps.main(["--params", str(path)]) == 0
    finally:
        synth_rows.to_csv(loaded.synth.manifest, index=False)
    table = pd.read_csv(tmp_path / "swaps" / "manifest.csv", keep_default_na=False).set_index("id")
    assert table.loc[train_ids[0], "status"] == "failed" and "spec_mismatch" in table.loc[train_ids[0], "reason"]
    assert (table.drop(train_ids[0])["status"] == "ok").all()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "swaps").glob("*.npz")} == stamps  # nothing redone

    models, out = tmp_path / "models", tmp_path / "generated"
    assert train.main(["--params", str(path), "--system", "text", "--swaps", str(tmp_path / "swaps"), "--out",
                       str(models / "text"), "--metrics", str(tmp_path / "metrics")]) == 0
    # the text model keeps a token chroma table per instrument of its train clips, taken by the prompt naming one
    model = inference.load_model(models / "text" / "v2m.pt", loaded)
    trained_on = sorted(set(synth_rows.loc[synth_rows["split"] == "train", "instrument"]))
    assert list(model.net.cfg.timbres) == trained_on and model.net.harmony.timbre_chroma.any()
    assert inference.prompt_timbre(model, f"music played on the {trained_on[-1].upper()}") == len(trained_on) - 1
    assert inference.prompt_timbre(model, f"{trained_on[0]} and {trained_on[-1]}") is None  # two: no choice
    assert inference.prompt_timbre(model, f"{trained_on[0]}s") is None and inference.prompt_timbre(model, "") is None
    assert inference.prompt_timbre(inference.load_model(project["model"], loaded), trained_on[0]) is None  # no tables
    assert generate.main(["--stage", "--no-baselines", "--ablations", "--models", str(models), "--out", str(out),
                          "--params", str(path)]) == 0
    frame = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(frame["system"]) == {"text", "text_own", "text_other"} and (frame["status"] == "ok").all()
    labels = pd.read_parquet(Path(loaded.ingest.out_dir) / "manifest.parquet").set_index("id")
    for r in frame.to_dict("records"):
        own = labels.loc[r["id"], "instrument"]
        if r["system"] == "text":
            assert r["prompt"] == "" and r["prompt_instrument"] == own
        else:
            assert r["prompt"] == f"music played on the {r['prompt_instrument']}"
            assert (r["prompt_instrument"] == own) == (r["system"] == "text_own")
    first = frame["id"].iloc[0]
    music = {s: load_audio(out / s / f"{first}.wav")[0] for s in ("text", "text_own", "text_other")}
    assert not np.array_equal(music["text_own"], music["text_other"])
    targets = evaluate.prompt_targets(out / "manifest.csv")
    assert targets[("text_other", first)] != labels.loc[first, "instrument"] == targets[("text_own", first)]


class _Payload:
    """What a hostile checkpoint carries: unpickling it with weights_only=False would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_that_runs_code_is_refused_in_one_line(project, tmp_path, capsys):
    """Models travel through the DVC remote: a pickle payload in --model must not run, and gets a one-line error."""
    evil = tmp_path / "evil.pt"
    torch.save({"config": _Payload(tmp_path / "pwned"), "model": {}}, evil)
    video = make_video(tmp_path / "in.mp4", seconds=1.0)
    assert run(project, str(video), "-o", str(tmp_path / "out.mp4"), model=evil) == 2
    err = capsys.readouterr().err
    assert f"{evil}: not a v2m checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.mp4").exists()
    wrong = tmp_path / "wrong.pt"  # loads as data, but is not a v2m model: one line too, not a traceback
    torch.save({"config": {"decoder": "?"}, "model": {"w": torch.zeros(1)}}, wrong)
    assert run(project, str(video), "-o", str(tmp_path / "out.mp4"), model=wrong) == 2
    assert f"{wrong}: not a v2m checkpoint" in capsys.readouterr().err


def test_stage_with_two_workers_writes_what_one_process_writes(project, tmp_path):
    """generate.workers: 2 (the demo's): `v2m generate --stage` starts rank 1 itself and each rank does every other
    job; every wav and the manifest are byte for byte those of one process, and nothing of the ranks is left."""
    from pipeline.shards import sha256_file

    params = load_params(project["params"])
    assert params.generate.workers == 2
    generate.run_stage(params, tmp_path / "one")
    assert generate.main(["--stage", "--out", str(tmp_path / "two"), "--params", str(project["params"])]) == 0

    def files(root: Path) -> dict:
        return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
                if p.is_file() and p.suffix in (".wav", ".csv")}

    one = files(tmp_path / "one")
    assert len(one) == 1 + 4 * 2  # 2 test clips x (full + 3 baselines), and the manifest
    two = files(tmp_path / "two")
    audio = [{k: v for k, v in found.items() if k != "manifest.csv"} for found in (one, two)]
    assert audio[0] == audio[1]
    # the manifests: the same rows in the same order, paths aside (they name the two output folders)
    rows = [(tmp_path / name / "manifest.csv").read_text().replace(str(tmp_path / name), "OUT")
            for name in ("one", "two")]
    assert rows[0] == rows[1]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# the fault-and-abuse cases of `v2m generate` (issue 18; the data stages' are in tests/test_faults.py)
# ----------------------------------------------------------------------------------------------------------------------

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(project, tmp_path, capsys):
    src = make_video(tmp_path / "same.mp4", seconds=2.0, size="128x96")
    other = make_video(tmp_path / "other.mp4", seconds=2.0, size="128x96", audio="sine=frequency=660")
    digests = {src: sha(src), other: sha(other)}
    (tmp_path / "link.mp4").symlink_to(src)
    os.link(src, tmp_path / "hard.mp4")
    for out in (src, tmp_path / "link.mp4", tmp_path / "hard.mp4"):
        assert run(project, str(src), "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert f"{out}: is the input {src}" in err and len(err.strip().splitlines()) == 1, err
    assert run(project, str(src), str(other), "-o", str(tmp_path)) == 2  # `-o .` in the inputs' folder
    assert "is the input" in capsys.readouterr().err
    assert {p: sha(p) for p in digests} == digests


def test_a_batch_whose_outputs_share_a_name_is_refused(project, tmp_path, capsys):
    a = make_video((tmp_path / "a").mkdir() or tmp_path / "a" / "x.mp4", seconds=2.0, size="128x96")
    b = make_video((tmp_path / "b").mkdir() or tmp_path / "b" / "x.mp4", seconds=2.0, size="96x128")
    assert run(project, str(a), str(b), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{a} and {b} would both be written to {tmp_path / 'out' / 'x.mp4'}" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_video_longer_than_the_limit_is_one_line(project, tmp_path, capsys):
    params = yaml.safe_load(Path(project["params"]).read_text())
    params["generate"]["max_duration_s"] = 2.5
    short_limit = tmp_path / "params.yaml"
    short_limit.write_text(yaml.safe_dump(params))
    src = make_video(tmp_path / "v.mp4", seconds=3.0, size="128x96")
    assert generate.main([str(src), "-o", str(tmp_path / "o.mp4"), "--params", str(short_limit),
                          "--model", str(project["model"])]) == 1
    err = capsys.readouterr().err
    assert f"{src}: 0.1 min is longer than generate.max_duration_s (2.5 s)" in err
    assert not (tmp_path / "o.mp4").exists()


def cli(project: dict, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "generate", *args, "--params", str(project["params"]),
            "--model", str(project["model"])]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_signals_leave_no_temps_and_a_killed_runs_go_at_the_next_run(project, tmp_path, monkeypatch):
    """SIGTERM (what `kill`, systemd and SLURM send) cleans up like Ctrl-C; SIGKILL cannot, so the next run removes
    what the dead one left in $TMPDIR and beside the output, and writes what an uninterrupted run writes."""
    src = make_video(tmp_path / "v.mp4", seconds=5.0, size="128x96", rate="24")
    assert run(project, str(src), "-o", str(tmp_path / "clean.mp4")) == 0
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(cli(project, str(src), "-o", str(out / "v.mp4")), env=env, stderr=subprocess.PIPE)
    wait_for(lambda: any(scratch.iterdir()))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM
    left = sorted(p.name for folder in (scratch, out) for p in folder.iterdir())
    assert not [name for name in left if name.startswith(("v2m-", "."))], left  # v2m's own scratch and temps
    assert not any(out.iterdir())
    proc = subprocess.Popen(cli(project, str(src), "-o", str(out / "v.mp4")), env=env, stderr=subprocess.PIPE)
    wait_for(lambda: any(p.name.startswith(".") for p in out.iterdir()))  # killed while the muxer writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(scratch.iterdir()) and any(p.name.startswith(".") for p in out.iterdir())  # what SIGKILL leaks
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    assert run(project, str(src), "-o", str(out / "v.mp4")) == 0
    assert not any(scratch.iterdir()) and [p.name for p in out.iterdir()] == ["v.mp4"]
    assert sha(out / "v.mp4") == sha(tmp_path / "clean.mp4")
