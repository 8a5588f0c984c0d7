"""KL divergence between label distributions of generated and reference audio, as audiocraft computes it.

Definition (audiocraft `metrics/kld.py`, `PasstKLDivergenceMetric` with `pretrained_length: 20`):
- Each clip, generated and reference, is cut to the reference length, made mono at the classifier's rate (32 kHz
  for PaSST) and split into 20 s segments (the last one shorter); segments of at most 0.15 s are dropped.
- Each segment gets its own label distribution: softmax of the classifier's logits [K] (527 AudioSet classes).
- Per segment, with p = generated and q = reference probabilities and eps = 1e-6:
      kld_pq = sum_k q_k (log q_k - log(p_k + eps))      (audiocraft: kl_div((p + eps).log(), q))
      kld_qp = sum_k p_k (log p_k - log(q_k + eps))
  with 0 log 0 = 0. (In the usual notation kld_pq is KL(q || p + eps); the names follow audiocraft.)
- The metric is the mean over all segments of all clips (segments, not clips, are the unit of the average).

The classifier is any `LabelClassifier`: PaSST via `pipeline.metrics.models.load_passt` where its weights are at
hand, or the project's own tagger. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SEGMENT_S = 20.0  # PaSST 20 s model (audiocraft's pretrained_length)
MIN_SEGMENT_S = 0.15  # segments of this length or shorter are dropped
EPS = 1e-6


class LabelClassifier(Protocol):
    """Maps one mono segment [N] at `sample_rate` to logits [K]."""

    sample_rate: int

    def __call__(self, segment: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class KldScore:
    """Per-clip sums over `segments` segments."""

    pq_sum: float
    qp_sum: float
    segments: int

    @property
    def pq(self) -> float:
        return self.pq_sum / self.segments if self.segments else float("nan")

    @property
    def qp(self) -> float:
        return self.qp_sum / self.segments if self.segments else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def kl_divergence(pred_probs: np.ndarray, target_probs: np.ndarray, eps: float = EPS) -> np.ndarray:
    """sum_k t_k (log t_k - log(p_k + eps)) per row, 0 log 0 = 0: audiocraft's `kl_divergence`. [S, K] -> [S]."""
    p, t = np.asarray(pred_probs, dtype=np.float64), np.asarray(target_probs, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
    t_log_t = np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)
    return np.sum(t_log_t - t * np.log(p + eps), axis=-1)


def kld(p: np.ndarray, q: np.ndarray, *, logits: bool = False, eps: float = EPS) -> tuple[float, float]:
    """(kld_pq, kld_qp) averaged over rows, for generated `p` and reference `q`: [K] or [S, K].

    Args:
        p, q: label distributions (or logits with `logits=True`) of generated and reference segments.
    """
    p, q = np.atleast_2d(p), np.atleast_2d(q)
    if logits:
        p, q = softmax(p), softmax(q)
    return float(np.mean(kl_divergence(p, q, eps))), float(np.mean(kl_divergence(q, p, eps)))


def segments(wav: np.ndarray, sample_rate: int, segment_s: float = SEGMENT_S,
             min_segment_s: float = MIN_SEGMENT_S) -> list[np.ndarray]:
    """Split mono audio [N] into `segment_s` chunks (torch.split), dropping those of <= `min_segment_s`."""
    wav = np.asarray(wav).reshape(-1)
    size, minimum = int(segment_s * sample_rate), int(min_segment_s * sample_rate)
    chunks = [wav[i : i + size] for i in range(0, len(wav), size)]
    return [c for c in chunks if len(c) > minimum]


def label_distributions(classifier: LabelClassifier, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Probabilities [S, K] of each valid segment of mono audio [N] (resampled to the classifier's rate)."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if sample_rate != classifier.sample_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=classifier.sample_rate, res_type="soxr_hq")
    segs = segments(wav, classifier.sample_rate)
    if not segs:
        return np.zeros((0, 0))
    return softmax(np.stack([np.asarray(classifier(s), dtype=np.float64).reshape(-1) for s in segs]))


def kld_clip(classifier: LabelClassifier, generated: np.ndarray, reference: np.ndarray, sample_rate: int) -> KldScore:
    """KLD sums for one pair of mono clips [N]; the generated one is cut (or zero-padded) to the reference length."""
    reference = np.asarray(reference).reshape(-1)
    generated = np.asarray(generated).reshape(-1)[: len(reference)]
    generated = np.pad(generated, (0, len(reference) - len(generated)))
    p = label_distributions(classifier, generated, sample_rate)
    q = label_distributions(classifier, reference, sample_rate)
    if len(q) == 0:
        return KldScore(0.0, 0.0, 0)
    return KldScore(float(kl_divergence(p, q).sum()), float(kl_divergence(q, p).sum()), len(q))


def pool(scores: Sequence[KldScore]) -> tuple[float, float]:
    """(kld_pq, kld_qp): sums over all segments of all clips divided by the segment count."""
    n = sum(s.segments for s in scores)
    if not n:
        return float("nan"), float("nan")
    return sum(s.pq_sum for s in scores) / n, sum(s.qp_sum for s in scores) / n
