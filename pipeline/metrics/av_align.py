"""AV-Align: agreement of audio onsets with motion peaks, as TempoTokens defines it (the 2025 version).

Definition (Yariv et al., "Diverse and Aligned Audio-to-Video Generation via Text-to-Video Model Adaptation";
`av_align.py` of guyyariv/TempoTokens as updated on 2025-02-13):

- Video: every frame at the native frame rate, converted to grayscale as OpenCV does (BGR -> gray, i.e.
  0.299 R + 0.587 G + 0.114 B on the decoded RGB frame). Farneback optical flow between consecutive frames with
  (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2, flags 0); the frame's value is the
  mean flow magnitude. The trajectory has one value per frame: frame 0 repeats the (0, 1) pair.
- Video peaks: strict local maxima (``m[i-1] < m[i] > m[i+1]``) with ``m[i] >= 0.1``, at time ``i / fps``.
- Audio peaks: librosa onsets of the audio loaded as `librosa.load` does (mono mean, 22.05 kHz, soxr_hq), with the
  default onset envelope and peak picking (hop 512).
- Matching: each audio peak, in time order, takes the first unused video peak with
  ``|audio - video| < 1 / fps`` (strict). Score = I / (|A| + |V| - I); the metric is the mean over clips.

We decode with PyAV to RGB and convert with OpenCV: that gives frames bit-identical to `cv2.VideoCapture` +
`COLOR_BGR2GRAY` on every file of ../shared/data (FFmpeg's own "gray" output differs by up to 18 levels).
A clip with no audio onset and no video peak has no defined score (0 / 0): it gives NaN and the caller reports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.media import MediaError, iter_frames, probe
from pipeline.shards import atomic_path, params_hash, sha256_file

ONSET_SAMPLE_RATE = 22_050
ONSET_HOP = 512
PEAK_THRESHOLD = 0.1
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


@dataclass(frozen=True)
class VideoPeaks:
    """Flow magnitude per frame [T], its peak times (s) and the frame rate they were read at."""

    magnitudes: np.ndarray
    peaks: np.ndarray
    fps: float


def flow_magnitudes(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Mean Farneback flow magnitude per frame of RGB [H, W, 3] (or gray [H, W]) uint8 frames -> [T] float64."""
    import cv2

    mags, prev = [], None
    for frame in frames:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        if prev is not None:
            flow = cv2.calcOpticalFlowFarneback(prev, gray, None, **FARNEBACK)
            mags.append(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0])
        prev = gray
    if not mags:
        return np.zeros(0)
    return np.asarray([mags[0], *mags], dtype=np.float64)  # frame 0 takes the (0, 1) pair, as the reference


def find_peaks(magnitudes: np.ndarray, fps: float, threshold: float = PEAK_THRESHOLD) -> np.ndarray:
    """Times (s) of strict local maxima of at least `threshold`; the first and last frames are never peaks."""
    m = np.asarray(magnitudes, dtype=np.float64)
    if len(m) < 3:
        return np.zeros(0)
    mid = m[1:-1]
    idx = np.flatnonzero((m[:-2] < mid) & (mid > m[2:]) & (mid >= threshold)) + 1
    return idx / fps


def video_peaks(video_path: str | Path, cache_dir: str | Path | None = None) -> VideoPeaks:
    """Flow trajectory and peaks of a video file at its native frame rate. Raises MediaError if undecodable.

    The flow is the whole cost of AV-Align and depends only on the video: with `cache_dir`, the trajectory is kept
    there under the hash of the file's bytes, the flow parameters and the OpenCV version, so scoring another system
    against the same videos costs only its audio onsets.
    """
    import cv2

    fps = probe(video_path).fps
    if fps <= 0:
        raise MediaError(video_path, "no frame rate", "no_video")
    cached = None
    if cache_dir is not None:
        key = params_hash({"video": sha256_file(video_path), "farneback": FARNEBACK, "opencv": cv2.__version__}, 24)
        cached = Path(cache_dir) / f"{key}.npy"
    if cached is not None and cached.exists():
        mags = np.load(cached)
    else:
        mags = flow_magnitudes(iter_frames(video_path, gray=False))
        if cached is not None and len(mags) >= 2:
            with atomic_path(cached) as tmp:
                np.save(tmp, mags)
    if len(mags) < 2:
        raise MediaError(video_path, f"{len(mags)} decodable frame(s): AV-Align needs at least 2", "too_short")
    return VideoPeaks(mags, find_peaks(mags, fps), fps)


def onset_times(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times (s) as `librosa.load` + `onset_strength` + `onset_detect` give them: audio [N] or [C, N]."""
    import librosa

    y = np.asarray(audio, dtype=np.float32)
    if y.ndim == 2:
        y = np.mean(y, axis=0)  # librosa.to_mono
    if sample_rate != ONSET_SAMPLE_RATE:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=ONSET_SAMPLE_RATE, res_type="soxr_hq")
    envelope = librosa.onset.onset_strength(y=y, sr=ONSET_SAMPLE_RATE, hop_length=ONSET_HOP)
    frames = librosa.onset.onset_detect(onset_envelope=envelope, sr=ONSET_SAMPLE_RATE, hop_length=ONSET_HOP)
    return librosa.frames_to_time(frames, sr=ONSET_SAMPLE_RATE, hop_length=ONSET_HOP)


def peak_iou(audio_peaks: Sequence[float], video_peaks: Sequence[float], fps: float) -> float:
    """One-to-one greedy matching within 1/fps (strict), then I / (|A| + |V| - I); NaN when both are empty."""
    tolerance = 1.0 / fps
    used = [False] * len(video_peaks)
    hits = 0
    for a in audio_peaks:
        for j, v in enumerate(video_peaks):
            if not used[j] and v - tolerance < a < v + tolerance:
                used[j] = True
                hits += 1
                break
    union = len(audio_peaks) + len(video_peaks) - hits
    return hits / union if union else float("nan")


def av_align(video: str | Path | VideoPeaks, audio: np.ndarray, sample_rate: int) -> float:
    """AV-Align of one clip: a video (path, or its precomputed `video_peaks`) and audio [N] or [C, N].

    Pass a `VideoPeaks` to score several audio tracks against one video without recomputing the flow.
    """
    peaks = video if isinstance(video, VideoPeaks) else video_peaks(video)
    return peak_iou(onset_times(audio, sample_rate), peaks.peaks, peaks.fps)


def pool(scores: Sequence[float]) -> float:
    """Mean over clips (clips with an undefined score are left out; the caller reports them)."""
    values = [s for s in scores if not np.isnan(s)]
    return float(np.mean(values)) if values else float("nan")
