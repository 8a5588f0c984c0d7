"""The scene stream (pipeline/encoders/scene.py) and the scene prior that reads it (V2M with scene_dim): the shapes of
SynthV2M's scenes, named from real rendered frames whatever their angle, the same bytes under any BLAS, and a prior
that is off until learned and off in the null condition."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import BaseConfig, SynthConfig, TrainConfig
from pipeline.encoders import scene
from pipeline.model import V2M, ModelConfig, scene_summary
from pipeline.model.decoder import DecoderConfig
from pipeline.model.fusion import FusionConfig
from pipeline.synth import INSTRUMENT_SHAPES, make_spec, render_frames
from pipeline.train import SYSTEMS, model_config

REPO = Path(__file__).resolve().parents[1]


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def synth_clips(per_instrument: int, first: int = 0) -> list[tuple[str, np.ndarray]]:
    """(instrument, scene rows [8, 11]) of real SynthV2M clips (2 s at 4 fps, 224 px), per_instrument of each."""
    cfg, base = SynthConfig(), BaseConfig(clip_seconds=2.0)
    out, count, index = [], {i: 0 for i in INSTRUMENT_SHAPES}, first
    while min(count.values()) < per_instrument:
        spec = make_spec(7, index, cfg, base)
        index += 1
        if count[spec.instrument] >= per_instrument:
            continue
        count[spec.instrument] += 1
        frames = np.stack([luma(f) for f in render_frames(spec, 4.0, 224, 224)])
        out.append((spec.instrument, scene.spectra(frames)))
    return out


def shape_frame(sides: int, angle_deg: float, size: int = 224) -> np.ndarray:
    """A bright regular polygon (sides 0: a disc) on a dark frame, turned by angle_deg."""
    frame = np.full((size, size), 30, np.uint8)
    if sides == 0:
        cv2.circle(frame, (size // 2, size // 2), size // 3, 220, -1, lineType=cv2.LINE_AA)
        return frame
    t = np.radians(angle_deg) + 2 * np.pi * np.arange(sides) / sides
    pts = np.stack([size / 2 + size / 3 * np.cos(t), size / 2 + size / 3 * np.sin(t)], 1)
    cv2.fillPoly(frame, [np.round(pts * 16).astype(np.int32)], 220, lineType=cv2.LINE_AA, shift=4)
    return frame


def test_a_shape_keeps_its_spectrum_when_it_turns_and_differs_from_other_shapes():
    shapes = {"triangle": 3, "square": 4, "pentagon": 5, "disc": 0}
    spectra = {(name, a): scene.edge_spectrum(shape_frame(n, a)) for name, n in shapes.items() for a in (0, 17, 40)}
    for (name, a), s in spectra.items():
        assert s.shape == (scene.N_COEFFS,) and s.dtype == np.float32
        same = [np.abs(s - t).sum() for (m, b), t in spectra.items() if m == name and b != a]
        other = [np.abs(s - t).sum() for (m, _), t in spectra.items() if m != name]
        assert max(same) < min(other), (name, a, max(same), min(other))
    # a square's edges point in 2 directions 90 degrees apart: coefficient 2 (of 180 degrees) stands out, and a
    # triangle's 3 directions put their weight on coefficient 3 (the array starts at coefficient 1)
    assert spectra[("square", 17)][1] > 0.5 > spectra[("square", 17)][0]
    assert spectra[("triangle", 40)][2] > 0.5 > spectra[("triangle", 40)][1]
    assert spectra[("disc", 0)].max() < 0.25


def test_the_scene_names_the_instrument_of_synthv2m_clips_it_has_not_seen():
    """Nearest neighbour in the clips' mean and spread of the rows: train on some rendered clips, name others."""
    seen, unseen = synth_clips(3), synth_clips(2, first=200)

    def summary(rows: np.ndarray) -> np.ndarray:
        return scene_summary(torch.from_numpy(rows)[None], torch.ones(1, len(rows), dtype=torch.bool))[0].numpy()

    x = np.stack([summary(r) for _, r in seen])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    right = 0
    for instrument, rows in unseen:
        dist = (((x - mu) / sd - (summary(rows) - mu) / sd) ** 2).sum(1)
        right += seen[int(np.argmin(dist))][0] == instrument
    assert right == len(unseen), f"{right} of {len(unseen)}"


def test_bad_frames_are_refused_with_what_is_wrong_and_a_flat_frame_gives_zeros():
    with pytest.raises(ValueError, match="uint8 luma"):
        scene.edge_spectrum(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="too small"):
        scene.edge_spectrum(np.zeros((4, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        scene.spectra(np.zeros((2, 64, 64, 3), np.uint8))  # RGB frames, not luma
    assert not scene.edge_spectrum(np.full((64, 48), 128, np.uint8)).any()
    assert scene.spectra(np.zeros((0, 64, 64), np.uint8)).shape == (0, scene.N_COEFFS)
    # an odd size is read without its last row and column
    odd = shape_frame(4, 10, 225)
    assert np.array_equal(scene.edge_spectrum(odd), scene.edge_spectrum(odd[:224, :224]))


PROBE = """
import hashlib, sys, cv2, numpy as np
from pipeline.encoders import scene
from pipeline.config import BaseConfig, SynthConfig
from pipeline.synth import make_spec, render_frames
frames = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for i in range(4)
          for f in render_frames(make_spec(3, i, SynthConfig(), BaseConfig(clip_seconds=1.0)), 4.0, 224, 224)]
print(hashlib.sha256(scene.spectra(np.stack(frames)).tobytes()).hexdigest())
"""


def test_the_scene_stream_is_the_same_bytes_under_any_blas_and_cpu_kernels():
    variants = [{"OPENBLAS_NUM_THREADS": "1"}, {"OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"},
                {"OPENBLAS_CORETYPE": "Prescott", "ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": ""}]
    digests = set()
    for variant in variants:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "ATEN_"))} | variant
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env | {"PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
    # and the integer tables are what they say: round(16384 cos/sin(5 j degrees))
    j = np.radians(5 * np.arange(scene.N_BINS))
    assert np.array_equal(scene._COS5, np.round(scene.SCALE * np.cos(j)).astype(int))
    assert np.array_equal(scene._SIN5, np.round(scene.SCALE * np.sin(j)).astype(int))
    assert hashlib.sha256(np.asarray(scene._DFT_COS).tobytes()).hexdigest()  # built at import, no libm


def tiny_config(scene_dim: int) -> ModelConfig:
    return ModelConfig(decoder=DecoderConfig(num_codebooks=2, codebook_size=16, d_model=32, n_layers=1, n_heads=2),
                       fusion=FusionConfig(clip_dim=8, flow_dim=6, d_model=32, n_layers=1, n_heads=2),
                       scene_dim=scene_dim)


def tiny_batch(b: int = 3, with_scene: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {"clip": torch.randn(b, 4, 8, generator=g), "clip_mask": torch.ones(b, 4, dtype=torch.bool),
             "flow": torch.randn(b, 20, 6, generator=g), "flow_mask": torch.ones(b, 20, dtype=torch.bool),
             "clip_fps": torch.full((b,), 2.0), "flow_fps": torch.full((b,), 10.0),
             "codes": torch.randint(0, 16, (b, 2, 25), generator=g)}
    if with_scene:
        batch["scene"] = torch.rand(b, 4, 11, generator=g)
        batch["scene_mask"] = torch.ones(b, 4, dtype=torch.bool)
    return batch


def test_the_scene_prior_is_off_until_learned_and_off_in_the_null_condition():
    torch.manual_seed(0)
    plain = V2M(tiny_config(0)).eval()
    torch.manual_seed(0)
    with_scene = V2M(tiny_config(11)).eval()
    # built last: every other weight is the plain model's, and the zeroed last layer adds nothing yet
    state = with_scene.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    batch = tiny_batch()
    assert torch.equal(plain(batch)[0], with_scene(batch)[0])
    # once it has learned something, it moves the logits of conditioned items only
    with torch.no_grad():
        with_scene.scene_prior[-1].bias.normal_()
    logits = with_scene(batch)[0]
    assert not torch.allclose(logits, plain(batch)[0])
    keep = torch.tensor([True, False, True])
    dropped = with_scene(batch, keep)[0]
    assert torch.equal(dropped[1], plain(batch, keep)[0][1])
    assert not torch.allclose(dropped[0], plain(batch, keep)[0][0])
    # generation adds it too (greedy, one step: the first token follows the bias of its scene)
    with torch.no_grad():
        with_scene.scene_prior[-1].bias.zero_()
        with_scene.scene_prior[-1].bias.view(2, 16)[:, 5] = 1e4
    codes = with_scene.generate({k: v for k, v in batch.items() if k != "codes"}, 4, guidance=1.0, temperature=0)
    assert (codes == 5).all()


def test_a_model_that_reads_the_scene_says_so_without_it_and_checkpoints_keep_their_bytes():
    model = V2M(tiny_config(11))
    with pytest.raises(ValueError, match="scene stream"):
        model(tiny_batch(with_scene=False))
    # scene_dim is saved only when set, so a checkpoint's config of a model without it is as before
    assert "scene_dim" not in tiny_config(0).to_dict() and tiny_config(11).to_dict()["scene_dim"] == 11
    assert ModelConfig.from_dict(tiny_config(11).to_dict()) == tiny_config(11)
    pooled = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).repeat(1, 11)
    model.fit_scene(pooled)
    assert torch.allclose(model.scene_mean[:2], torch.tensor([2.0, 4.0]))
    assert torch.allclose(model.scene_std[:2], torch.tensor([1.0, 2.0]))  # population sd: one clip gives 0, not nan
    # the summary: mean and spread over the valid rows only
    rows, mask = torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[True, True, False]])
    assert torch.equal(scene_summary(rows, mask), torch.tensor([[2.0, 1.0]]))


def test_full_and_its_variants_read_the_scene_the_others_never_do():
    codec = {"num_codebooks": 2, "codebook_size": 16, "frame_rate": 25.0}
    on, off = TrainConfig(), dataclasses.replace(TrainConfig(), scene=False)
    for system in SYSTEMS:
        cfg = model_config(on, system, codec, 8, 32, 16, scene_dim=11)
        assert cfg.scene_dim == (0 if system in ("no_clip", "vidmuse", "text") else 11), system
        assert model_config(off, system, codec, 8, 32, 16, scene_dim=11).scene_dim == 0


def scene_model(**overrides) -> V2M:
    from tests.test_model import debug_model

    return debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True, scene_dim=1, timbre_knn=2,
                       timbre_bank=(4, 6), **overrides)


def test_the_harmony_bias_sounds_the_chord_in_the_tokens_of_the_nearest_scenes_music():
    """Four training clips: two of scene A write tokens 0 (on pitch class 0) and 2 (on pc 2), two of scene B tokens 12
    and 13 on the same pitch classes. The table of all clips ties a token of A with one of B; the table of a query's
    two nearest scenes (`scene_table`, no label read) has only its own scene's tokens, zero rows for the others, so a
    large harmony bias writes the chord in the scene's tokens. A model whose config asks for the tables without the
    scene or the track is refused, and a bank of the wrong size says what it expected."""
    from tests.test_model import CARD, K, make_batch

    with pytest.raises(ValueError, match="timbre_knn .* needs scene_dim and harmony_track"):
        V2M(dataclasses.replace(scene_model().cfg, scene_dim=0))
    model = scene_model()
    model.harmony.fill(torch.eye(4, 8), torch.eye(4, 12), torch.tensor([0, 0, 1, 1]))
    frames = torch.eye(12)[[0, 2]].repeat(3, 1)  # (6, 12): pc 0, pc 2, ...
    a, b = torch.tensor([0, 2]).repeat(K, 3), torch.tensor([12, 13]).repeat(K, 3)
    model.harmony.fill_token_chroma([a, a, b, b], [frames] * 4)
    keys = torch.tensor([[-1.0, 0.0], [-0.9, 0.1], [1.0, 0.0], [0.9, -0.1]])  # standardised (mean, sd) summaries
    with pytest.raises(ValueError, match="expected 4 clips"):
        model.harmony.fill_scene(keys[:3], [a, a, b], [frames] * 3)
    model.harmony.fill_scene(keys, [a, a, b, b], [frames] * 4)
    tables = model.harmony.scene_table(torch.tensor([[-0.8, 0.0], [0.8, 0.0]]))
    assert torch.allclose(tables[0, :, 0], torch.eye(12)[0].expand(K, -1))
    assert torch.allclose(tables[0, :, 2], torch.eye(12)[2].expand(K, -1))
    assert not tables[0, :, 12:].any() and not tables[1, :, :12].any()
    assert torch.allclose(tables[1, :, 13], torch.eye(12)[2].expand(K, -1))
    # generation: scene rows whose standardised summary is A's or B's; the chord is pc 0 then pc 2 as in test_model
    model.scene_mean.zero_(), model.scene_std.fill_(1.0)
    batch = {k: v for k, v in make_batch(B=2, clip_len=(4, 4)).items() if k not in ("codes", "code_mask")}
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][:, :2, 0], batch["clip"][:, 2:, 2] = 1.0, 1.0
    batch["scene"] = torch.tensor([-1.0, 1.0])[:, None, None].expand(2, 4, 1).clone()  # mean -1 or 1, sd 0
    batch["scene_mask"] = torch.ones(2, 4, dtype=torch.bool)
    codes = model.generate(batch, 12, guidance=3.0, temperature=1.0, generator=torch.Generator().manual_seed(0),
                           harmony_bias=200.0)
    seconds = torch.arange(12) / model.cfg.frame_rate
    early, late = seconds <= 0.5, seconds >= 1.0
    assert (codes[0][:, early] == 0).all() and (codes[0][:, late] == 2).all()
    assert (codes[1][:, early] == 12).all() and (codes[1][:, late] == 13).all()
    assert CARD > 13
    # the tables travel in the checkpoint: a model of the same config loads them
    again = scene_model()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.harmony.scene_codes, model.harmony.scene_codes)


def test_a_token_the_nearest_scenes_wrote_rarely_keeps_mostly_its_chroma_over_all_clips():
    """scene_table shrinks the neighbours' estimate toward the table of all clips as if that came from
    SCENE_PRIOR_FRAMES frames: (neighbours' sum + m x all-clips row) / (their count + m); unwritten tokens stay 0."""
    from pipeline.model.harmony import SCENE_PRIOR_FRAMES, HarmonyBank

    bank = HarmonyBank(2, 2, 1, track=True, token_shape=(1, 4), scene_k=1, scene_shape=(2, 3, 2))
    bank.token_chroma[0, 1] = torch.eye(12)[0]  # over all clips token 1 sounds pc 0
    bank.fill_scene(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), [torch.tensor([[1, 1, 1]]), torch.tensor([[2, 2, 2]])],
                    [torch.eye(12)[[4, 4, 4]], torch.eye(12)[[7, 7, 7]]])
    table = bank.scene_table(torch.tensor([[0.1, 0.0]]))[0, 0]  # the first clip's scene: token 1 on pc 4, 3 frames
    m = SCENE_PRIOR_FRAMES
    assert torch.allclose(table[1], (3 * torch.eye(12)[4] + m * torch.eye(12)[0]) / (3 + m))
    assert not table[[0, 2, 3]].any()
