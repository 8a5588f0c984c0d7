"""pipeline/train: data by id from feature/token stores, overfitting one clip, resume after SIGKILL, DDP equivalence.

The stores are built here with FeatureStore from SynthV2M labels (beat times, key), so these tests need neither the
embed nor the tokenize stage: flow rows spike on beats, CLIP rows encode the key, codebook 0 holds a beat token on
beat frames and a key token elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import train
from pipeline.config import BaseConfig, SynthConfig, params_from_dict, to_dict
from pipeline.dataset import collate, load_dataset, load_swaps
from pipeline.encoders import scene
from pipeline.shards import FeatureStore, Item
from pipeline.synth import make_spec, render_frames

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SECONDS, FRAME_RATE, K, CARD = 4.0, 25.0, 2, 16


def make_data(root: Path, n_train: int = 6, n_val: int = 2) -> dict:
    """features/{clip,flow,scene}, tokens/, manifest.parquet under root from SynthV2M specs; returns the paths."""
    base = BaseConfig(clip_seconds=SECONDS)
    specs = [make_spec(0, i, SynthConfig(), base) for i in range(n_train + n_val)]
    ids = [f"synth_{i:05d}" for i in range(len(specs))]
    rng = np.random.default_rng(0)
    key_vectors = rng.normal(size=(12, 8)).astype(np.float32)

    def clip(item):
        return np.repeat(key_vectors[["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"].index(
            item.payload.key)][None], int(SECONDS * 2), 0), {"fps": 2.0}

    def flow(item):
        t = np.arange(int(SECONDS * 8)) / 8.0
        near = np.abs(t[:, None] - np.asarray(item.payload.beat_times)[None]).min(1)
        speed = np.exp(-((near / 0.06) ** 2))
        return np.stack([speed, speed * 0.5, np.zeros_like(speed)], 1).astype(np.float32), {"fps": 8.0}

    def tokens(item):
        spec = item.payload
        centres = (np.arange(int(SECONDS * FRAME_RATE)) + 0.5) / FRAME_RATE
        beat = np.abs(centres[:, None] - np.asarray(spec.beat_times)[None]).min(1) <= 0.02
        key = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"].index(spec.key) % 8
        c0 = np.where(beat, 15, key)
        noise = np.random.default_rng(int(item.id[-5:])).integers(8, 14, len(c0))  # to be memorised
        c1 = np.where(beat, 14, noise)
        return np.stack([c0, c1], 1).astype(np.int16), {"frame_rate": FRAME_RATE}

    def patch(item):  # the spatial system's stream: one cell (params' embed.flow.grid 1) holding the CLIP row
        return clip(item)

    def scene_rows(item):  # the scene stream of the clip's real frames, as embed computes it
        frames = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in render_frames(item.payload, 2.0, 96, 96)]
        return scene.spectra(np.stack(frames)), {"fps": 2.0}

    items = [Item(i, "h", s) for i, s in zip(ids, specs, strict=True)]
    for name, fn in (("features/clip", clip), ("features/flow", flow), ("features/scene", scene_rows),
                     ("tokens", tokens), ("spatial/patch", patch)):
        FeatureStore(root / name, 2).update(items, "enc", fn)
    splits = ["train"] * n_train + ["val"] * n_val
    pd.DataFrame({"id": ids, "split": splits, "status": "ok", "caption": [s.caption() for s in specs],
                  "instrument": [s.instrument for s in specs],
                  "beat_times": [json.dumps(list(s.beat_times)) for s in specs]}).to_parquet(root / "manifest.parquet")
    # the text system's timbre swaps (`v2m swaps`' layout): the clip's codes with codebook 1 off the beats naming the
    # instrument (token 8 + its index), as a real swap changes the timbre and keeps the beats
    swaps = root / "swaps"
    swaps.mkdir()
    for item, split in zip(items, splits, strict=True):
        if split != "train":
            continue
        codes = tokens(item)[0].T.astype(np.int16)  # (K, T)
        beat = codes[1] == 14
        arrays = {}
        for k, name in enumerate(SWAP_INSTRUMENTS):
            if name != item.payload.instrument:
                arrays[name] = np.stack([codes[0], np.where(beat, 14, 8 + k)]).astype(np.int16)
        np.savez(swaps / f"{item.id}.npz", key=np.array("test"), **arrays)
    pd.DataFrame({"id": [i for i, s in zip(ids, splits, strict=True) if s == "train"], "status": "ok", "reason": "",
                  "instruments": ""}).to_csv(swaps / "manifest.csv", index=False)
    return {"features": root / "features", "tokens": root / "tokens", "manifest": root / "manifest.parquet",
            "patches": root / "spatial" / "patch", "swaps": swaps}


SWAP_INSTRUMENTS = ("piano", "organ", "pluck", "bell")


def write_params(path: Path, music_dir: Path | None = None, grid: int = 4, **train_cfg) -> Path:
    cfg = {"preset": "debug", "max_steps": 20, "batch_size": 4, "ckpt_every": 10, "log_every": 1, "beat_clips": 0,
           "warmup_steps": 5, "lr": 3e-3, **train_cfg}
    data = to_dict(params_from_dict({"train": cfg, "embed": {"flow": {"grid": grid}},
                                     **({"tokenize": {"music_dir": str(music_dir)}} if music_dir else {})}))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def argv(data: dict, params: Path, out: Path, system: str = "full") -> list[str]:
    return ["--params", str(params), "--system", system, "--features", str(data["features"]), "--tokens",
            str(data["tokens"]), "--manifest", str(data["manifest"]), "--out", str(out / "model"), "--metrics",
            str(out / "metrics")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_data(tmp_path_factory.mktemp("data"))


def test_dataset_reads_stores_by_id(data):
    items, codec = load_dataset(data["features"], data["tokens"], data["manifest"])
    assert len(items) == 8 and [it["split"] for it in items].count("val") == 2
    assert codec == {"frame_rate": FRAME_RATE, "num_codebooks": K, "codebook_size": CARD, "name": "tokens"}
    it = items[0]
    assert it["clip"].shape == (8, 8) and it["flow"].shape == (32, 3) and it["codes"].shape == (K, 100)
    assert it["clip_fps"] == 2.0 and it["flow_fps"] == 8.0 and len(it["beats"]) > 4
    assert "patch" not in it and "patch" not in collate(items[:2])
    spatial, _ = load_dataset(data["features"], data["tokens"], data["manifest"], patch_dir=data["patches"])
    assert spatial[0]["patch"].shape == (8, 8) and spatial[0]["patch_fps"] == 2.0  # the spatial system's stream
    batch = collate(spatial[:2])
    assert batch["patch"].shape == (2, 8, 8) and bool(batch["patch_mask"].all())
    near = train.onset_frames(items[:1], 100, FRAME_RATE)[0]
    assert near.sum() >= len(it["beats"]) - 1 and (it["codes"][0][near.numpy()] == 15).mean() >= 0.5


def test_lr_schedule_and_draws_are_deterministic():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55) and train.lr_at(110, cfg) == pytest.approx(0.1)
    a, b = train.draw(3, 0, 10, 8, 0.5), train.draw(3, 0, 10, 8, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_main_writes_model_metrics_and_plots(data, tmp_path):
    params = write_params(tmp_path / "params.yaml", grid=1)  # the test flow rows are one cell (3 values)
    for system in train.SYSTEMS:
        extra = (["--patches", str(data["patches"])] if system == "spatial" else
                 ["--swaps", str(data["swaps"])] if system == "text" else [])
        assert train.main(argv(data, params, tmp_path, system) + ["--out", str(tmp_path / system)] + extra) == 0
    metrics = json.loads((tmp_path / "metrics" / "full.json").read_text())["full"]
    assert metrics["steps"] == 20 and {"val_loss", "onset_val_loss", "val_beat_f1"} <= set(metrics)
    assert "train_seconds" not in metrics  # a timing is machine-local: never in a DVC output
    ckpt = torch.load(tmp_path / "full" / "v2m.pt", weights_only=False)
    assert ckpt["step"] == 20 and ckpt["config"]["fusion"]["use_motion"]
    fusion = {s: torch.load(tmp_path / s / "v2m.pt", weights_only=False)["config"]["fusion"] for s in train.SYSTEMS}
    assert not fusion["no_motion"]["use_motion"] and fusion["no_motion"]["use_clip"]
    assert fusion["no_clip"]["use_motion"] and not fusion["no_clip"]["use_clip"]
    assert fusion["vidmuse"]["mode"] == "long_short" and not fusion["vidmuse"]["use_motion"]
    assert fusion["spatial"]["mode"] == "spatial" and fusion["spatial"]["flow_cells"] == 1
    with pytest.raises(SystemExit, match="give --patches DIR"):
        train.main(argv(data, params, tmp_path, "spatial"))
    with pytest.raises(SystemExit, match="does not read --patches"):
        train.main(argv(data, params, tmp_path, "full") + ["--patches", str(data["patches"])])
    assert fusion["text"]["text_dim"] == 384 and fusion["text"]["mode"] == "temporal"
    text = torch.load(tmp_path / "text" / "v2m.pt", weights_only=True)
    assert text["config"]["text_prior"] and "text_prior.weight" in text["model"]
    assert "text_prior" not in torch.load(tmp_path / "full" / "v2m.pt", weights_only=True)["config"]
    with pytest.raises(SystemExit, match="give --swaps DIR"):
        train.main(argv(data, params, tmp_path, "text"))
    with pytest.raises(SystemExit, match="does not read --swaps"):
        train.main(argv(data, params, tmp_path, "full") + ["--swaps", str(data["swaps"])])
    loss = pd.read_csv(tmp_path / "metrics" / "full_loss.csv")
    assert list(loss["step"]) == list(range(1, 21)) and "train_loss" in loss.columns
    assert "tokens_per_s" not in loss.columns
    assert train.main(["--params", str(params), "--metrics", str(tmp_path / "metrics"), "--report",
                       str(tmp_path / "train.json")]) == 0
    merged = json.loads((tmp_path / "train.json").read_text())
    assert set(merged) == set(train.SYSTEMS)
    assert set(pd.read_csv(tmp_path / "train_curves.csv")["system"]) == set(train.SYSTEMS)


OVERFIT_LOSS = 0.2  # nats per token; a uniform guess is ln(16) = 2.77


def test_debug_preset_overfits_one_clip(tmp_path):
    """One SynthV2M clip, 150 steps of the debug preset: the training loss falls below OVERFIT_LOSS."""
    data = make_data(tmp_path / "one", n_train=1, n_val=0)
    params = write_params(tmp_path / "p.yaml", max_steps=150, batch_size=2, ckpt_every=150, log_every=1,
                          warmup_steps=10, lr=1e-2)
    assert train.main(argv(data, params, tmp_path)) == 0
    history = pd.read_csv(tmp_path / "metrics" / "full_loss.csv")
    metrics = json.loads((tmp_path / "metrics" / "full.json").read_text())["full"]
    assert history["train_loss"].iloc[0] > 2.0
    assert metrics["val_loss"] < OVERFIT_LOSS, metrics  # val = the training clip here (no val split)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_resume_after_sigkill_reaches_the_same_weights(data, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=40, ckpt_every=5)
    assert train.main(argv(data, params, tmp_path / "ref")) == 0
    cmd = [sys.executable, "-m", "pipeline.train", *argv(data, params, tmp_path / "killed")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "killed" / "model" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["step"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=False)["step"]
    assert 10 <= killed_at < 40 and not (tmp_path / "killed" / "model" / "v2m.pt").exists()
    assert train.main(argv(data, params, tmp_path / "killed")) == 0
    ref, resumed = _weights(tmp_path / "ref" / "model" / "v2m.pt"), _weights(tmp_path / "killed" / "model" / "v2m.pt")
    assert torch.load(tmp_path / "killed" / "model" / "v2m.pt", weights_only=False)["step"] == 40
    assert all(torch.allclose(ref[k], resumed[k], atol=1e-6) for k in ref)


def test_changed_params_do_not_resume(data, tmp_path):
    params = write_params(tmp_path / "params.yaml", max_steps=10, ckpt_every=5)
    assert train.main(argv(data, params, tmp_path)) == 0
    params = write_params(tmp_path / "params.yaml", max_steps=10, ckpt_every=5, lr=1e-3)
    assert train.main(argv(data, params, tmp_path)) == 0
    history = pd.read_csv(tmp_path / "metrics" / "full_loss.csv")
    assert list(history["step"]) == list(range(1, 11))


def test_ddp_two_processes_match_one_with_the_combined_batch(data, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 items each == 1 process with the 4 items: the same loss curve."""
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun not installed beside this python")
    params = write_params(tmp_path / "params.yaml", max_steps=6, ckpt_every=6, batch_size=4)
    assert train.main(argv(data, params, tmp_path / "one")) == 0
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pipeline.train",
                           *argv(data, params, tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = pd.read_csv(tmp_path / "one" / "metrics" / "full_loss.csv")["train_loss"]
    two = pd.read_csv(tmp_path / "two" / "metrics" / "full_loss.csv")["train_loss"]
    assert np.allclose(one, two, atol=1e-4), (list(one), list(two))
    w1, w2 = _weights(tmp_path / "one" / "model" / "v2m.pt"), _weights(tmp_path / "two" / "model" / "v2m.pt")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    assert len(one) == len(two) == 6


def test_text_conditioning_trains(data, tmp_path, monkeypatch):
    """train.text: caption embeddings (here random 384-d stand-ins for all-MiniLM-L6-v2) enter the memory."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(train, "caption_embeddings",
                        lambda items: {it["id"]: rng.normal(size=384).astype(np.float32) for it in items})
    params = write_params(tmp_path / "params.yaml", max_steps=4, ckpt_every=4, text=True)
    assert train.main(argv(data, params, tmp_path)) == 0
    ckpt = torch.load(tmp_path / "model" / "v2m.pt", weights_only=False)
    assert ckpt["config"]["fusion"]["text_dim"] == 384 and "fusion.text_in.1.weight" in ckpt["model"]


def test_swap_items_replace_a_share_of_the_batch_with_their_swaps(data):
    """Each drawn item becomes one of its swaps with probability swap_rate: the swap's codes, its instrument's prompt
    as the caption (never dropped); the same (seed, step) draws the same batch, and items without swaps stay."""
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    swaps = load_swaps(data["swaps"])
    chosen = [it for it in items if it["split"] == "train"] * 8  # 48 draws
    out = train.swap_items(chosen, swaps, 0.5, 0, 3)
    swapped = [(a, b) for a, b in zip(chosen, out, strict=True) if b.get("text_force")]
    assert 12 <= len(swapped) <= 36  # about half
    for before, after in swapped:
        instrument = after["text_key"].split(":", 1)[1]
        assert instrument != before["instrument"] and instrument in swaps[before["id"]]
        assert np.array_equal(after["codes"], swaps[before["id"]][instrument])
        assert np.array_equal(after["codes"][0], before["codes"][0])  # the same score: codebook 0 here
    assert all(a is b for a, b in zip(chosen, out, strict=True) if not b.get("text_force"))
    again = train.swap_items(chosen, swaps, 0.5, 0, 3)
    assert [it.get("text_key") for it in again] == [it.get("text_key") for it in out]
    assert train.swap_items(chosen, swaps, 0.0, 0, 3) == chosen
    assert train.swap_items(chosen, {}, 1.0, 0, 3) == chosen
    mixed = [b for _, b in swapped[:2]] + [b for b in out if not b.get("text_force")][:2]
    batch = collate(mixed, {**{it["id"]: np.zeros(384, np.float32) for it in items},
                            **{f"prompt:{i}": np.ones(384, np.float32) for i in SWAP_INSTRUMENTS}})
    assert batch["text_force"].tolist() == [True, True, False, False]
    assert [bool(row.any()) for row in batch["text"]] == batch["text_force"].tolist()  # the prompt's embedding


def test_text_system_learns_the_instrument_its_caption_names(data, tmp_path):
    """Trained on the clips and their swaps (codebook 1 names the instrument off the beats), the text system's token
    prior puts the prompted instrument's token first, whatever the scene: the prompt steers the timbre."""
    from pipeline.encoders.text import caption_embeddings
    from pipeline.model import V2M, ModelConfig

    params = write_params(tmp_path / "params.yaml", grid=1, max_steps=120, ckpt_every=120, lr=1e-2)
    assert train.main(argv(data, params, tmp_path, "text") + ["--swaps", str(data["swaps"])]) == 0
    ckpt = torch.load(tmp_path / "model" / "v2m.pt", weights_only=True)
    net = V2M(ModelConfig.from_dict(ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    net.eval()
    prompts = caption_embeddings([{"id": i, "caption": f"music played on the {i}"} for i in SWAP_INSTRUMENTS])
    with torch.no_grad():
        for k, name in enumerate(SWAP_INSTRUMENTS):
            row = net.fusion.text_in(torch.from_numpy(prompts[name])[None])
            prior = net.text_prior(row).view(K, CARD)[1]  # codebook 1
            assert int(prior[8:12].argmax()) == k, (name, prior[8:12])


@pytest.mark.slow
def test_caption_embeddings_use_the_bundled_minilm():
    from pipeline.encoders.text import caption_embeddings

    vectors = caption_embeddings([{"id": "a", "caption": "a bright piano in C major"},
                                  {"id": "b", "caption": "a dark organ in A minor"}])
    assert vectors["a"].shape == (384,) and not np.allclose(vectors["a"], vectors["b"])


class ClickCodec:
    """A stand-in codec: a click wherever codebook 0 holds the beat token, so beat tracking can score generations."""

    sample_rate = 16000

    def describe(self) -> dict:
        return {"codec": "clicks", "sample_rate": self.sample_rate, "frame_rate": FRAME_RATE, "num_codebooks": K,
                "codebook_size": CARD}

    def decode(self, codes: np.ndarray) -> np.ndarray:
        hop = int(self.sample_rate / FRAME_RATE)
        wav = np.zeros(codes.shape[1] * hop, np.float32)
        for t in np.flatnonzero(codes[0] == 15):
            wav[t * hop : t * hop + 200] = np.hanning(200) * np.sin(np.arange(200))
        return wav


def test_val_beat_f1_generates_and_decodes(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_codec", lambda params, name: ClickCodec())
    params = write_params(tmp_path / "params.yaml", max_steps=4, ckpt_every=4, beat_clips=2)
    assert train.main(argv(data, params, tmp_path)) == 0
    metrics = json.loads((tmp_path / "metrics" / "full.json").read_text())["full"]
    assert 0.0 <= metrics["val_beat_f1"] <= 1.0


def test_out_of_range_plausibility_stops_before_training(data, tmp_path):
    params = write_params(tmp_path / "params.yaml", sampling={"plausibility": 2.0})
    with pytest.raises(SystemExit, match=r"train.sampling.plausibility 2 must be in \[0, 1\]"):
        train.main(argv(data, params, tmp_path))
    assert not (tmp_path / "model" / "last.pt").exists()  # not a step was taken


def test_select_keeps_the_checkpoint_with_the_best_val_beat_f1(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_codec", lambda params, name: ClickCodec())
    params = write_params(tmp_path / "params.yaml", max_steps=12, ckpt_every=2, beat_clips=2, select="val_beat_f1",
                          beat_every=0)
    assert train.main(argv(data, params, tmp_path)) == 0
    evals = pd.read_csv(tmp_path / "metrics" / "full_eval.csv")
    best = evals.loc[evals["val_beat_f1"].idxmax()]  # the first of equal scores, as training keeps it
    saved = torch.load(tmp_path / "model" / "v2m.pt", map_location="cpu", weights_only=False)
    metrics = json.loads((tmp_path / "metrics" / "full.json").read_text())["full"]
    assert saved["step"] == metrics["selected_step"] == int(best["step"]) and saved["steps_trained"] == 12
    assert metrics["val_beat_f1"] == pytest.approx(best["val_beat_f1"]) and metrics["steps"] == 12
    kept = torch.load(tmp_path / "model" / "best.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(kept["model"][k], v) for k, v in saved["model"].items())

    # select: last (a validation-only setting: the finished run is resumed, not retrained) -> the final weights
    params = write_params(tmp_path / "params.yaml", max_steps=12, ckpt_every=2, beat_clips=2, select="last",
                          beat_every=0)
    assert train.main(argv(data, params, tmp_path)) == 0
    final = torch.load(tmp_path / "model" / "last.pt", map_location="cpu", weights_only=False)
    saved = torch.load(tmp_path / "model" / "v2m.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 12 and all(torch.equal(final["model"][k], v) for k, v in saved["model"].items())


def test_val_beat_f1_every_few_checkpoints_leaves_the_training_as_it_was(data, tmp_path, monkeypatch):
    """train.beat_every: val_beat_f1 only every so many steps and at the last; validation draws from its own
    generator, so the weights are those of a run that scores every checkpoint."""
    monkeypatch.setattr(train, "load_codec", lambda params, name: ClickCodec())
    weights = {}
    for every in (0, 4):
        out = tmp_path / f"every{every}"
        out.mkdir()
        params = write_params(out / "params.yaml", max_steps=10, ckpt_every=2, beat_clips=2, beat_every=every)
        assert train.main(argv(data, params, out)) == 0
        evals = pd.read_csv(out / "metrics" / "full_eval.csv")
        scored = evals.loc[evals["val_beat_f1"].notna(), "step"].tolist()
        assert scored == ([2, 4, 6, 8, 10] if every == 0 else [4, 8, 10])
        assert evals["val_loss"].notna().all()  # the losses at every checkpoint still
        weights[every] = torch.load(out / "model" / "v2m.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(weights[0][k], v) for k, v in weights[4].items())
    params = write_params(tmp_path / "bad.yaml", beat_every=-1)
    with pytest.raises(SystemExit, match=r"train.beat_every -1 must be >= 0"):
        train.main(argv(data, params, tmp_path / "bad"))


def test_harmony_arrays_come_from_the_cache_the_second_time(data, tmp_path):
    """dataset.add_harmony keeps each clip's arrays beside the music (a side cache): the second call (the other
    system, another seed) reads the very arrays the first computed, and a changed music file is computed again."""
    from pipeline.dataset import add_harmony, harmony_cache_dir
    from pipeline.media import load_audio
    from pipeline.metrics.rhythm import SAMPLE_RATE, chroma_track

    music = make_music(tmp_path / "music", data)
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    first = [dict(it) for it in items]
    add_harmony(first, music, FRAME_RATE, workers=2)
    cached = sorted(harmony_cache_dir(music).glob("*.npz"))
    assert len(cached) == len(items)
    again = [dict(it) for it in items]
    add_harmony(again, music, FRAME_RATE)
    assert sorted(harmony_cache_dir(music).glob("*.npz")) == cached
    for a, b in zip(first, again, strict=True):
        for name in ("harmony", "harmony_track", "frame_chroma"):
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name])
    it = items[0]
    profile, track = chroma_track(*load_audio(music / f"{it['id']}.wav", SAMPLE_RATE),
                                  np.arange(len(it["clip"])) / it["clip_fps"])  # computed here, in this process
    np.testing.assert_allclose(first[0]["harmony"], profile, atol=1e-6)
    np.testing.assert_allclose(first[0]["harmony_track"], track, atol=1e-6)
    # other music under the same id (the cache is keyed by content): that music's arrays, not the stale ones
    shutil.copyfile(music / f"{items[1]['id']}.wav", music / f"{it['id']}.wav")
    changed = [dict(it)]
    add_harmony(changed, music, FRAME_RATE)
    assert np.array_equal(changed[0]["harmony"], first[1]["harmony"])
    assert not np.array_equal(changed[0]["harmony"], first[0]["harmony"])


def make_music(root: Path, data: dict) -> Path:
    """The SynthV2M music of make_data's clips (16 kHz wavs) and a separate-stage manifest naming them."""
    from pipeline.media import write_wav
    from pipeline.synth import render_audio

    frame = pd.read_parquet(data["manifest"])
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in frame["id"]:
        spec = make_spec(0, int(i[-5:]), SynthConfig(), BaseConfig(clip_seconds=SECONDS))
        paths.append(str(root / f"{i}.wav"))
        write_wav(paths[-1], render_audio(spec, 16000), 16000)
    frame.assign(music_path=paths).to_parquet(root / "manifest.parquet")
    return root


def _trained(tmp_path: Path):
    from pipeline.model import V2M, ModelConfig

    ckpt = torch.load(tmp_path / "model" / "v2m.pt", weights_only=False)
    model = V2M(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def _profiles(music: Path, ids: list[str]) -> np.ndarray:
    from pipeline.media import load_audio
    from pipeline.metrics.rhythm import chroma_profile

    return np.stack([chroma_profile(*load_audio(music / f"{i}.wav", 16000)) for i in ids])


def test_harmony_head_learns_each_clips_profile_from_the_music(data, tmp_path):
    """train.harmony: the targets are the pitch-class profiles of the real SynthV2M music; the head's loss is logged
    and falls, and the trained head's prediction for a training clip is nearer its own profile than the others'."""
    music = make_music(tmp_path / "music", data)
    params = write_params(tmp_path / "params.yaml", music_dir=music, max_steps=60, ckpt_every=60, harmony=5.0,
                          lr=1e-2)
    assert train.main(argv(data, params, tmp_path)) == 0
    loss = pd.read_csv(tmp_path / "metrics" / "full_loss.csv")["harmony_loss"]
    assert loss.iloc[-5:].mean() < 0.5 * loss.iloc[:5].mean()
    model, ckpt = _trained(tmp_path)
    assert ckpt["config"]["harmony"] == 5.0
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    items = [it for it in items if it["split"] == "train"]
    with torch.no_grad():
        logp = model.condition(collate(items)).harmony_logits.log_softmax(-1).numpy()
    truth = _profiles(music, [it["id"] for it in items])
    cross = -(truth[:, None] * logp[None]).sum(-1)  # (truth i, prediction j) cross-entropy
    assert np.mean(np.diag(cross)) < np.mean(cross[~np.eye(len(items), dtype=bool)])


def test_harmony_knn_bank_holds_the_training_clips_and_their_music(data, tmp_path):
    """train.harmony_knn: the checkpoint's bank is the training clips' mean CLIP embeddings (normalised) and the
    profiles of their music; no head, no loss."""
    music = make_music(tmp_path / "music", data)
    params = write_params(tmp_path / "params.yaml", music_dir=music, max_steps=4, ckpt_every=4, harmony_knn=2)
    assert train.main(argv(data, params, tmp_path)) == 0
    model, ckpt = _trained(tmp_path)
    assert ckpt["config"]["harmony_knn"] == 2 and ckpt["config"]["harmony_bank"] == 6
    assert not any(k.startswith("harmony_head") for k in ckpt["model"])
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    items = [it for it in items if it["split"] == "train"]
    means = np.stack([it["clip"].mean(0) for it in items])
    np.testing.assert_allclose(model.harmony.bank_keys.numpy(), means / np.linalg.norm(means, axis=1, keepdims=True),
                               atol=1e-6)
    np.testing.assert_allclose(model.harmony.bank_profiles.numpy(), _profiles(music, [it["id"] for it in items]),
                               atol=1e-6)
    assert "harmony_loss" not in pd.read_csv(tmp_path / "metrics" / "full_loss.csv").columns


def test_harmony_track_bank_holds_every_clip_row_and_the_chord_around_it(data, tmp_path):
    """train.harmony_track: the bank is every CLIP row of the training clips (normalised), each with the chroma of the
    music in the half second around its time and the index of its clip; the trained model's track for a training
    clip never comes from that clip's own rows; the token chroma table is filled from the same music."""
    from pipeline.media import load_audio
    from pipeline.metrics.rhythm import chroma_track, frame_chroma

    music = make_music(tmp_path / "music", data)
    params = write_params(tmp_path / "params.yaml", music_dir=music, max_steps=4, ckpt_every=4, harmony_knn=1,
                          harmony_track=True)
    assert train.main(argv(data, params, tmp_path)) == 0
    model, ckpt = _trained(tmp_path)
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    items = [it for it in items if it["split"] == "train"]
    rows = np.concatenate([it["clip"] for it in items])
    assert ckpt["config"]["harmony_track"] is True and ckpt["config"]["harmony_bank"] == len(rows)
    bank = model.harmony
    np.testing.assert_allclose(bank.bank_keys.numpy(), rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(bank.bank_clips.numpy(), np.repeat(np.arange(len(items)), [len(it["clip"])
                                                                                              for it in items]))
    first = items[0]
    expected = chroma_track(*load_audio(music / f"{first['id']}.wav", 16000),
                            np.arange(len(first["clip"])) / first["clip_fps"])[1]
    np.testing.assert_allclose(bank.bank_profiles.numpy()[: len(first["clip"])], expected, atol=1e-5)
    batch = collate(items[:1])
    _, own = bank(batch["clip"], batch["clip_mask"], torch.tensor([0]))
    assert not torch.allclose(own, bank(batch["clip"], batch["clip_mask"])[1])  # else its rows find themselves
    # the token chroma table: per codebook and token, the mean chroma of the music at the frames it was written
    total, count = np.zeros((K, CARD, 12)), np.zeros((K, CARD))
    for it in items:
        frames = frame_chroma(*load_audio(music / f"{it['id']}.wav", 32000), FRAME_RATE, it["codes"].shape[1])
        for k in range(K):
            np.add.at(total[k], it["codes"][k], frames)
            np.add.at(count[k], it["codes"][k], 1)
    assert model.has_token_chroma() and (count[0] == 0).any()  # some tokens are never written
    np.testing.assert_allclose(bank.token_chroma.numpy(), total / np.maximum(count, 1)[..., None], atol=1e-5)
    np.testing.assert_allclose(bank.token_chroma.numpy().sum(-1), (count > 0).astype(float), atol=1e-5)


def test_harmony_without_the_music_says_so(data, tmp_path):
    params = write_params(tmp_path / "params.yaml", music_dir=tmp_path / "nowhere", harmony=1.0)
    with pytest.raises(SystemExit, match="nowhere/manifest.parquet is missing"):
        train.main(argv(data, params, tmp_path))


def test_train_keys_override_the_preset_and_null_keeps_it():
    from pipeline.config import TrainConfig

    codec = {"num_codebooks": 2, "codebook_size": 16, "frame_rate": 25.0}
    cfg = train.model_config(TrainConfig(preset="debug", harmony_knn=1, harmony_track=True), "full", codec, 8, 6)
    assert cfg.harmony_track is True and cfg.harmony_knn == 1
    preset = train.model_config(TrainConfig(preset="debug"), "full", codec, 8, 6)  # debug.yaml: interpolate, no harmony
    assert preset.interpolate is True and preset.harmony_knn == 0 and preset.harmony == 0.0
    off = train.model_config(TrainConfig(preset="debug", interpolate=False, harmony=0.5), "full", codec, 8, 6)
    assert off.interpolate is False and off.harmony == 0.5


def test_ablation_systems_change_only_what_they_name():
    """no_clip and vidmuse drop the harmony bank (it retrieves by CLIP; VidMuse has none) unless
    ablations.vidmuse.harmony gives the baseline full's; vidmuse takes its window and summary from its settings."""
    from pipeline.config import TrainConfig, VidMuseConfig

    codec = {"num_codebooks": 2, "codebook_size": 16, "frame_rate": 25.0}
    cfg = TrainConfig(preset="embedded")
    full = train.model_config(cfg, "full", codec, 8, 6)
    assert full.harmony_knn == 3 and full.harmony_track and full.fusion.use_clip and full.fusion.mode == "temporal"
    no_clip = train.model_config(cfg, "no_clip", codec, 8, 6)
    assert no_clip.harmony_knn == 0 and not no_clip.harmony_track and not no_clip.fusion.use_clip
    assert dataclasses.replace(no_clip, harmony_knn=3, harmony_track=True,
                               fusion=full.fusion) == full  # nothing else differs
    vid = train.model_config(cfg, "vidmuse", codec, 8, 6, vidmuse=VidMuseConfig(short_s=3.0, long_rows=6, layers=2))
    assert (vid.fusion.short_s, vid.fusion.long_rows, vid.fusion.n_layers) == (3.0, 6, 2) and vid.harmony_knn == 0
    with_bank = train.model_config(cfg, "vidmuse", codec, 8, 6, vidmuse=VidMuseConfig(harmony=True))
    assert with_bank.harmony_knn == 3 and with_bank.harmony_track
    spatial = train.model_config(cfg, "spatial", codec, 8, 16 * 10, flow_cells=16)
    assert spatial.fusion.mode == "spatial" and spatial.fusion.flow_cells == 16
    assert dataclasses.replace(spatial, fusion=dataclasses.replace(spatial.fusion, mode="temporal", flow_cells=1,
                                                                   flow_dim=6)) == full  # the fusion only
    with pytest.raises(ValueError, match="unknown system 'sideways'"):
        train.model_config(cfg, "sideways", codec, 8, 6)


def test_fraction_takes_a_fixed_nested_share_of_the_train_split(data, tmp_path):
    ids = [f"synth_{i:05d}" for i in range(40)]
    quarter, half = train.fraction_ids(ids, 25), train.fraction_ids(ids, 50)
    assert len(quarter) == 10 and len(half) == 20 and set(quarter) < set(half)
    assert train.fraction_ids(list(reversed(ids)), 25) == quarter  # the order given does not matter
    assert quarter != ids[:10]  # not simply the first ids (synth's ids run in render order)
    assert len(train.fraction_ids(ids[:3], 10)) == 1  # never empty
    with pytest.raises(ValueError, match="1..100"):
        train.fraction_ids(ids, 0)
    music = make_music(tmp_path / "music", data)
    params = write_params(tmp_path / "params.yaml", music_dir=music, max_steps=4, ckpt_every=4, harmony_knn=1)
    assert train.main(argv(data, params, tmp_path) + ["--fraction", "50"]) == 0
    model, ckpt = _trained(tmp_path)
    assert ckpt["config"]["harmony_bank"] == 3  # 50 % of the 6 train clips, and only they are in the bank
    items, _ = load_dataset(data["features"], data["tokens"], data["manifest"])
    kept = train.fraction_ids([it["id"] for it in items if it["split"] == "train"], 50)
    means = np.stack([it["clip"].mean(0) for it in items if it["id"] in kept])
    np.testing.assert_allclose(model.harmony.bank_keys.numpy(), means / np.linalg.norm(means, axis=1, keepdims=True),
                               atol=1e-6)


def test_seed_option_trains_as_base_seed_would(data, tmp_path):
    """`v2m train --seed S` (the seed study) gives the weights that base.seed: S gives, and other weights than S=0."""
    import dataclasses

    from pipeline.config import load_params

    def weights(params: Path, out: Path, *extra: str) -> dict:
        assert train.main(argv(data, params, out) + list(extra)) == 0
        return torch.load(out / "model" / "v2m.pt", weights_only=False)["model"]

    params = write_params(tmp_path / "params.yaml", max_steps=10, ckpt_every=10)
    seeded = tmp_path / "seeded.yaml"
    loaded = load_params(params)
    loaded = dataclasses.replace(loaded, base=dataclasses.replace(loaded.base, seed=3))
    seeded.write_text(yaml.safe_dump(to_dict(loaded), sort_keys=False))
    by_option, by_params = weights(params, tmp_path / "a", "--seed", "3"), weights(seeded, tmp_path / "b")
    default = weights(params, tmp_path / "c")
    assert all(torch.equal(by_option[k], by_params[k]) for k in by_option)
    assert not all(torch.equal(by_option[k], default[k]) for k in by_option)


def test_a_last_pt_that_runs_code_is_not_resumed(data, tmp_path, caplog):
    """A shared out dir's last.pt carrying a pickle payload: not executed, not resumed; training starts over."""

    class Payload:
        def __reduce__(self):
            return Path.touch, (tmp_path / "pwned",)

    params = write_params(tmp_path / "params.yaml", max_steps=10, ckpt_every=10)
    (tmp_path / "model").mkdir()
    torch.save({"fingerprint": Payload()}, tmp_path / "model" / "last.pt")
    with caplog.at_level("WARNING"):
        assert train.main(argv(data, params, tmp_path)) == 0
    assert not (tmp_path / "pwned").exists()
    assert "not resumed, not a plain checkpoint" in caplog.text
    assert torch.load(tmp_path / "model" / "last.pt", weights_only=True)["step"] == 10  # its own, written over
