"""Fréchet distance: closed-form Gaussian cases, agreement with the scipy.linalg.sqrtm formula, singular covariances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from pipeline.metrics.fad import embedding_stats, fad, fad_from_embeddings, frechet_distance


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_equal_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_gaussians_match_the_closed_form():
    # N(mu1, diag(a)) vs N(mu2, diag(b)): |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(0.0, [[4.0]], 3.0, [[1.0]]) == pytest.approx(9 + 1)  # 1-D: (m1-m2)^2 + (s1-s2)^2


def test_agrees_with_the_sqrtm_formula_on_full_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    s1, s2 = _random_spd(rng, 32), _random_spd(rng, 32)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_stay_finite_and_non_negative():
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 64, rank=5), _random_spd(rng, 64, rank=3)  # fewer frames than dimensions
    value = frechet_distance(np.zeros(64), s1, np.zeros(64), s2)
    assert np.isfinite(value) and value >= 0
    assert frechet_distance(np.zeros(64), s1, np.zeros(64), s1) == pytest.approx(0.0, abs=1e-9)


def test_fad_of_samples_approaches_the_gaussian_value():
    rng = np.random.default_rng(3)
    shift = np.array([2.0, 0.0, 0.0, 0.0])
    gen = rng.standard_normal((20_000, 4))
    ref = [rng.standard_normal((10_000, 4)) + shift, rng.standard_normal((10_000, 4)) + shift]  # pooled
    assert fad_from_embeddings(gen, ref) == pytest.approx(4.0, abs=0.1)
    mu, sigma = embedding_stats(gen)
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_stats(np.zeros((1, 4)))


class BandEnergies:
    """A real, tiny embedder: log energy in 8 bands per 0.1 s frame."""

    sample_rate = 8_000

    def __call__(self, wav):
        frames = wav[: len(wav) // 800 * 800].reshape(-1, 800)
        spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        return np.log(np.stack([b.sum(axis=1) for b in np.array_split(spec, 8, axis=1)], axis=1) + 1e-9)


def test_fad_with_a_pluggable_embedder_resamples_and_cuts():
    rng = np.random.default_rng(4)
    ref = [rng.standard_normal(16_000 * 3).astype(np.float32) for _ in range(3)]
    same = [r.copy() for r in ref]
    assert fad(BandEnergies(), same, ref, 16_000) == pytest.approx(0.0, abs=1e-6)
    longer = [np.concatenate([r, 10 * r]) for r in ref]  # the extra part lies past the reference: cut away
    assert fad(BandEnergies(), longer, ref, 16_000) == pytest.approx(0.0, abs=1e-6)
    assert fad(BandEnergies(), [0.1 * r for r in ref], ref, 16_000) > 1.0
