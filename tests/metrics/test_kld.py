"""KL divergence as audiocraft computes it: the formula with its epsilon, 20 s segmenting, a pluggable classifier,
and the clear errors of the PaSST / VGGish loaders when their package or weights are missing."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from pipeline.metrics.kld import EPS, kl_divergence, kld, kld_clip, label_distributions, pool, segments, softmax
from pipeline.metrics.models import MissingModelError, load_passt, load_vggish


def test_kl_of_a_distribution_with_itself_is_zero():
    p = softmax(np.random.default_rng(0).standard_normal((3, 527)))
    assert np.allclose(kl_divergence(p, p, eps=0.0), 0.0, atol=1e-12)
    # audiocraft's eps inside the log shifts it by about -K * eps (p log p/(p + eps) ~ -eps per class)
    assert np.allclose(kl_divergence(p, p), -527 * EPS, rtol=1e-3)
    pq, qp = kld(p, p)
    assert pq == pytest.approx(qp) and abs(pq) < 1e-3


def test_kl_matches_the_closed_form_in_both_directions():
    p, q = np.array([0.25, 0.75]), np.array([0.5, 0.5])  # p = generated, q = reference
    q_log_q_over_p = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    p_log_p_over_q = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    pq, qp = kld(p, q, eps=0.0)
    assert pq == pytest.approx(q_log_q_over_p) and qp == pytest.approx(p_log_p_over_q)  # audiocraft's naming
    assert kld(np.log(p), np.log(q), logits=True, eps=0.0) == pytest.approx((pq, qp))
    # zero reference probabilities contribute nothing (0 log 0 = 0), zero generated ones are held by eps
    assert np.isfinite(kl_divergence(np.array([0.0, 1.0]), np.array([0.5, 0.5])))


def test_segments_are_20_s_and_drop_those_of_at_most_0_15_s():
    sr = 1000
    assert [len(s) for s in segments(np.zeros(45 * sr), sr)] == [20_000, 20_000, 5_000]
    assert [len(s) for s in segments(np.zeros(40_150), sr)] == [20_000, 20_000]  # 0.15 s: dropped
    assert [len(s) for s in segments(np.zeros(40_151), sr)] == [20_000, 20_000, 151]
    assert segments(np.zeros(100), sr) == []


class SpectralClassifier:
    """A real, tiny classifier: logits = log energy in 16 bands of the whole segment."""

    sample_rate = 16_000

    def __call__(self, segment):
        spec = np.abs(np.fft.rfft(segment)) ** 2
        return np.log(np.array([b.sum() for b in np.array_split(spec, 16)]) + 1e-12)


def test_kld_clip_with_a_pluggable_classifier():
    rng = np.random.default_rng(1)
    sr = 32_000
    ref = rng.standard_normal(45 * sr).astype(np.float32)  # 3 segments after resampling to 16 kHz
    same = kld_clip(SpectralClassifier(), ref.copy(), ref, sr)
    assert same.segments == 3 and abs(same.pq) < 1e-4 and abs(same.qp) < 1e-4
    t = np.arange(45 * sr) / sr
    hum = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    other = kld_clip(SpectralClassifier(), np.concatenate([hum, hum]), ref, sr)  # cut to the reference length
    assert other.segments == 3 and other.pq > 1.0 and other.qp > 1.0
    pq, qp = pool([same, other])
    assert pq == pytest.approx((same.pq_sum + other.pq_sum) / 6)
    assert label_distributions(SpectralClassifier(), ref, sr).shape == (3, 16)


def test_passt_loader_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("V2M_PASST_CHECKPOINT", raising=False)
    with pytest.raises(MissingModelError, match=r"--passt PATH or set \$V2M_PASST_CHECKPOINT"):
        load_passt()
    with pytest.raises(MissingModelError, match="nowhere.pt: PaSST"):
        load_passt(tmp_path / "nowhere.pt")
    ckpt = tmp_path / "passt.pt"
    ckpt.write_bytes(b"not loaded")
    missing = [name for name in ("torch", "hear21passt") if importlib.util.find_spec(name) is None]
    if not missing:  # installed (make test installs it): hide it, as an environment without it would be
        for name in [m for m in sys.modules if m == "hear21passt" or m.startswith("hear21passt.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "hear21passt", None)  # import then raises ModuleNotFoundError
        missing = ["hear21passt"]
    with pytest.raises(MissingModelError, match=f"package '{missing[0]}"):  # hidden: 'hear21passt.models'
        load_passt(ckpt)


def test_vggish_loader_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_VGGISH_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(MissingModelError, match="absent.pth: VGGish"):
        load_vggish()
