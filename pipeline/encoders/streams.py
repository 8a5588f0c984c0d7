"""The two video streams of a clip, as the embed stage computes them and generation recomputes them on any video:
frame sampling at a target rate, and `Encoders`, the CLIP and flow encoders built on first use.

Both streams use the same time axis: row k of a stream sampled at `fps` belongs to time k / fps seconds from the start
of the clip, and a clip of duration d has ceil(d * fps) rows (ingested clips start at 0 with a constant frame rate).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import av
import numpy as np

from pipeline.config import EmbedConfig
from pipeline.encoders import clip as clip_enc
from pipeline.encoders import flow as flow_enc
from pipeline.media import MediaError
from pipeline.shards import Item

log = logging.getLogger(__name__)


def sample_indices(n_frames: int, native_fps: float, fps: float) -> list[int]:
    """Native frame index of each sample k at time k / fps (nearest frame), for every k with k / fps < duration."""
    step = native_fps / fps
    count = max(1, math.ceil(n_frames / step - 1e-9))
    return [min(n_frames - 1, int(math.floor(k * step + 0.5))) for k in range(count)]


def sample_frames(path: str | Path, fps: float, gray: bool = False) -> tuple[np.ndarray, float, int]:
    """Decode a clip and keep the frames nearest to k / fps.

    Args:
        path: a video file with a constant frame rate (every ingested clip is one).
        fps: samples per second; a rate above the native one repeats frames.
        gray: luma only ([T, H, W] uint8) instead of RGB ([T, H, W, 3] uint8).

    Returns:
        (frames, native fps, number of native frames). Raises `MediaError` (reason ``corrupt``) on undecodable input.
    """
    kept: dict[int, np.ndarray] = {}
    n, last = 0, None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "no video stream", "no_video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            native = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            step, k = native / fps, 0
            for frame in container.decode(stream):  # the frame count is known only at the end: keep as we go
                while math.floor(k * step + 0.5) < n:
                    k += 1
                if math.floor(k * step + 0.5) == n:
                    kept[n] = _to_array(frame, gray)
                n, last = n + 1, frame
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"video cannot be decoded ({exc.strerror or exc})") from None
    if last is None:
        raise MediaError(path, "no decodable video frame")
    if n - 1 not in kept:
        kept[n - 1] = _to_array(last, gray)
    frames = [kept[i] for i in sample_indices(n, native, fps)]
    return np.stack(frames), native, n


def _to_array(frame: av.VideoFrame, gray: bool) -> np.ndarray:
    """One frame as uint8 luma [H, W] or RGB [H, W, 3].

    Ingested clips are yuv420p: the luma plane is used as is and RGB comes from OpenCV's I420 conversion, ~100x
    cheaper than a per-frame swscale context (2 ms a frame here, more than the flow itself). Other layouts go through
    PyAV's conversion.
    """
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        import cv2

        planes = frame.to_ndarray()  # (H * 3 / 2, W): Y, then U and V
        return np.ascontiguousarray(planes[: frame.height]) if gray else cv2.cvtColor(planes, cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="gray" if gray else "rgb24")


class Encoders:
    """The two compute functions FeatureStore calls; each encoder is built on its first use."""

    def __init__(self, cfg: EmbedConfig, device: str):
        self.cfg, self.device = cfg, device
        self._clip: clip_enc.ClipEncoder | None = None
        self._flow: flow_enc.FlowEncoder | None = None

    def clip(self, item: Item) -> tuple[np.ndarray, dict]:
        _check_exists(item.payload)
        if self._clip is None:
            self._clip = _load("clip", clip_enc.ClipEncoder, self.cfg.clip, self.cfg.encoders_dir, self.device)
        frames, native_fps, n = sample_frames(item.payload, self.cfg.clip_fps)
        return self._clip(frames), {"fps": self.cfg.clip_fps, "duration_s": round(n / native_fps, 6)}  # (T, Dc)

    def flow(self, item: Item) -> tuple[np.ndarray, dict]:
        _check_exists(item.payload)
        if self._flow is None:
            self._flow = _load("flow", flow_enc.FlowEncoder, self.cfg.flow, self.device)
        frames, native_fps, n = sample_frames(item.payload, self.cfg.flow_fps, gray=self._flow.gray)
        return self._flow(frames, self.cfg.flow_fps), {"fps": self.cfg.flow_fps,
                                                       "duration_s": round(n / native_fps, 6)}  # (T, Df)


def _load(stream: str, cls, *args):
    """Build an encoder. A failure is a configuration problem, not one clip's, so it stops the stage (FeatureStore
    does not catch SystemExit, and it writes a shard only whole, so every shard on disk stays complete)."""
    try:
        return cls(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised as the stage's error, with the stream named
        raise SystemExit(f"embed: cannot load the {stream} encoder: {type(exc).__name__}: {exc}") from exc


def _check_exists(path: str) -> None:
    if not Path(path).is_file():
        raise MediaError(path, "no such clip", "missing")
