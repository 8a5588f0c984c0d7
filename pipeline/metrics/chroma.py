"""Chroma cosine similarity, exactly as audiocraft computes it.

Definition (audiocraft `metrics/chroma_cosinesim.py` + `modules/chroma.py`, the MusicGen melody evaluation, with the
solver's `metrics.chroma_cosine` config: sample_rate 32000, n_chroma 12, radix2_exp 14, argmax true):

1. Both waveforms mono at 32 kHz; the generated one cut to the reference length (audiocraft's solver does
   ``y_pred[..., :audio.shape[-1]]``; a shorter generated clip is zero-padded here, and the caller reports it).
2. Power spectrogram: n_fft = win_length = 2**14 = 16384, hop = 4096, periodic Hann window, centered with reflect
   padding, ``normalized=True`` (the STFT divided by sqrt(sum(window**2))), power 2 (torchaudio `Spectrogram`).
   A clip shorter than n_fft is first zero-padded to n_fft, split evenly on both sides. We compute in float64 but
   round the power spectrum to float32, the reference's precision, so that frames whose energy underflows float32
   (digital near-silence) are all-zero, as there.
3. Raw chroma = librosa's chroma filterbank (`filters.chroma(sr, n_fft, tuning=0, n_chroma=12)`) times the spectrum.
4. Per-frame max normalisation (`normalize(p=inf, eps=1e-6)`), then argmax to a one-hot vector per frame (ties and
   all-zero frames go to the first bin, C, as torch's argmax does).
5. Only the first ceil(reference_samples / hop) frames count; per-frame cosine similarity (eps 1e-8); the score is
   the sum over all frames of all clips divided by the frame count (frame-weighted, not a mean of clip means).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 32_000
N_FFT = 2**14  # radix2_exp = 14: n_fft = win_length = 16384
HOP = N_FFT // 4  # 4096
N_CHROMA = 12
NORM_EPS = 1e-6  # torch.nn.functional.normalize eps in ChromaExtractor
COSINE_EPS = 1e-8  # ChromaCosineSimilarityMetric eps


@dataclass(frozen=True)
class ChromaScore:
    """Per-clip accumulators: `cosine_sum` over `frames` frames; `value` is their ratio."""

    cosine_sum: float
    frames: int

    @property
    def value(self) -> float:
        return self.cosine_sum / self.frames if self.frames else float("nan")


@lru_cache(maxsize=4)
def _filterbank(sample_rate: int, n_fft: int) -> np.ndarray:
    import librosa

    return librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, tuning=0, n_chroma=N_CHROMA).astype(np.float64)


def _power_spectrogram(wav: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """torchaudio Spectrogram(n_fft, win_length=n_fft, hop, power=2, center=True, normalized=True): [F, T]."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann, as torch.hann_window
    padded = np.pad(wav.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]  # (T, n_fft)
    spec = np.fft.rfft(frames * window, axis=-1)  # (T, F)
    spec /= np.sqrt(np.sum(window**2))  # normalized=True ("window" normalisation)
    # Rounded to float32 like the reference: a digitally near-silent frame underflows to zero there (argmax -> C)
    # and must here too; float64 everywhere else keeps near-ties from depending on summation order.
    return (np.abs(spec) ** 2).astype(np.float32).astype(np.float64).T  # (F, T)


def chroma_onehot(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Argmax chroma of a mono waveform, as audiocraft's ChromaExtractor(argmax=True).

    Args:
        wav: mono audio [N] at `sample_rate` (32 kHz for the metric).
    Returns:
        one-hot chroma [T, 12] float64, T = 1 + max(N, n_fft) // hop.
    """
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    if len(wav) < N_FFT:  # audiocraft pads short clips to n_fft, split evenly (the odd sample at the end)
        pad = N_FFT - len(wav)
        wav = np.pad(wav, (pad // 2, pad // 2 + pad % 2))
    raw = _filterbank(sample_rate, N_FFT) @ _power_spectrogram(wav)  # (12, T)
    norm = raw / np.maximum(np.abs(raw).max(axis=0, keepdims=True), NORM_EPS)
    onehot = np.zeros((raw.shape[1], N_CHROMA))
    onehot[np.arange(raw.shape[1]), norm.argmax(axis=0)] = 1.0
    return onehot


def fit_to_reference(generated: np.ndarray, reference_len: int) -> np.ndarray:
    """Cut (or zero-pad) a mono generated waveform [N] to the reference length."""
    generated = np.asarray(generated).reshape(-1)[:reference_len]
    return np.pad(generated, (0, reference_len - len(generated)))


def chroma_cosine_clip(generated: np.ndarray, reference: np.ndarray, sample_rate: int = SAMPLE_RATE) -> ChromaScore:
    """Cosine sum and frame count for one pair of mono waveforms [N] at `sample_rate` (32 kHz for the metric)."""
    reference = np.asarray(reference).reshape(-1)
    if len(reference) == 0:
        raise ValueError("empty reference audio")
    generated = fit_to_reference(generated, len(reference))
    n_frames = math.ceil(len(reference) / HOP)
    ref, gen = chroma_onehot(reference, sample_rate)[:n_frames], chroma_onehot(generated, sample_rate)[:n_frames]
    norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(gen, axis=1), COSINE_EPS)
    cosine = np.sum(ref * gen, axis=1) / norms
    return ChromaScore(float(cosine.sum()), int(n_frames))


def pool(scores: Sequence[ChromaScore]) -> float:
    """Frame-weighted mean over clips: sum of cosines over the total frame count."""
    frames = sum(s.frames for s in scores)
    return sum(s.cosine_sum for s in scores) / frames if frames else float("nan")


def chroma_cosine(
    generated: Sequence[np.ndarray], reference: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE
) -> float:
    """Chroma cosine similarity of paired clips (mono [N] arrays at 32 kHz), frame-weighted over all clips.

    Audio at another rate should be resampled to 32 kHz first (`pipeline.media.load_audio(path, 32000)`).
    """
    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated clips but {len(reference)} references")
    return pool([chroma_cosine_clip(g, r, sample_rate) for g, r in zip(generated, reference, strict=True)])
