"""Fréchet audio distance between the embeddings of generated and reference audio.

Definition (Kilgour et al. 2019, "Fréchet Audio Distance"; Dowson & Landau 1982 for the Gaussian case, as in
audiocraft's `metrics/fad.py`, which runs Google's `frechet_audio_distance` on VGGish embeddings):
- Every clip is embedded frame by frame ([T, D]; VGGish: one 128-d vector per 0.96 s at 16 kHz mono); the frames of
  all generated clips form one set, the frames of all reference clips the other (generated clips cut to the
  reference length first). Each set is summarised by its mean and its unbiased covariance (`np.cov`, ddof 1).
- FAD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2)).

The trace of the matrix square root is taken as sum(sqrt(eig(A S_r A))) with A = S_g^(1/2) from a symmetric
eigendecomposition: A S_r A is symmetric positive semi-definite and has the same eigenvalues as S_g S_r, so the
square root stays real and finite for singular covariances (fewer frames than dimensions), where
`scipy.linalg.sqrtm(S_g @ S_r)` returns complex parts or NaN and needs an ad hoc offset.

The embedder is any `Embedder`: VGGish via `pipeline.metrics.models.load_vggish`, or the project's tagger
(its penultimate layer), reported under another key since FADs from different embedders are not comparable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps one mono clip [N] at `sample_rate` to frame embeddings [T, D]."""

    sample_rate: int

    def __call__(self, wav: np.ndarray) -> np.ndarray: ...


def _psd_eigvals(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below the numerical-rank cutoff (as in
    `np.linalg.matrix_rank`: max * D * machine eps) are zero, since sqrt would turn 1e-16 noise into 1e-8."""
    cutoff = max(values.max(initial=0.0), 0.0) * len(values) * np.finfo(np.float64).eps
    return np.where(values > cutoff, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(_psd_eigvals(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): [D] means, [D, D] covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh((middle + middle.T) / 2.0))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def embedding_stats(embeddings: np.ndarray | Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of frame embeddings [T, D] (or a list of them, pooled)."""
    if not isinstance(embeddings, np.ndarray):
        embeddings = np.concatenate([np.atleast_2d(e) for e in embeddings], axis=0)
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 embedding frames [T, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fad_from_embeddings(generated: np.ndarray | Iterable[np.ndarray],
                        reference: np.ndarray | Iterable[np.ndarray]) -> float:
    """FAD between two sets of frame embeddings ([T, D] arrays, or lists of them)."""
    return frechet_distance(*embedding_stats(generated), *embedding_stats(reference))


def embed(embedder: Embedder, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Frame embeddings [T, D] of mono audio [N], resampled to the embedder's rate."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if sample_rate != embedder.sample_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=embedder.sample_rate, res_type="soxr_hq")
    return np.atleast_2d(np.asarray(embedder(wav), dtype=np.float64))


def fad(embedder: Embedder, generated: Iterable[np.ndarray], reference: Iterable[np.ndarray],
        sample_rate: int) -> float:
    """FAD of paired mono clips [N] at `sample_rate`; each generated clip is cut to its reference's length."""
    gen_frames, ref_frames = [], []
    for g, r in zip(generated, reference, strict=True):
        r = np.asarray(r).reshape(-1)
        gen_frames.append(embed(embedder, np.asarray(g).reshape(-1)[: len(r)], sample_rate))
        ref_frames.append(embed(embedder, r, sample_rate))
    return fad_from_embeddings(gen_frames, ref_frames)
