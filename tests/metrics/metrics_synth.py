"""Synthetic media for the metric tests: tones, click tracks and a video whose motion peaks sit on known frames.

A plain module (not conftest.py) so the tests can import it: tests/metrics has no __init__.py, and pytest puts
this folder on sys.path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.media import encode_video


def tone(freq: float, seconds: float, sr: int = 32_000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def clicks(times: list[float], seconds: float, sr: int = 22_050) -> np.ndarray:
    """Decaying noise bursts (5 ms attack-free, 30 ms decay) starting at `times`."""
    rng = np.random.default_rng(0)
    y = np.zeros(int(seconds * sr), np.float32)
    n = int(0.03 * sr)
    burst = (rng.standard_normal(n) * np.exp(-np.arange(n) / (0.005 * sr))).astype(np.float32) * 0.5
    for t in times:
        i = int(round(t * sr))
        y[i : i + n] += burst[: len(y) - i]
    return y


def write_wav(path: Path, audio: np.ndarray, sr: int) -> Path:
    sf.write(str(path), np.asarray(audio).T, sr, subtype="FLOAT")
    return path


def jump_video(path: Path, jump_frames: list[int], n_frames: int, fps: float, size: int = 96) -> Path:
    """A smooth random texture, static except that it moves 3 px right at each of `jump_frames`."""
    import cv2

    rng = np.random.default_rng(1)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), 2.0)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    shift, frames = 0, []
    for i in range(n_frames):
        shift += 3 if i in jump_frames else 0
        frames.append(np.repeat(np.roll(texture, shift, axis=1)[..., None], 3, axis=2))
    encode_video(path, frames, fps, crf=4)
    return path
