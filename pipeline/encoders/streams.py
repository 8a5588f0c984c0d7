"""The video streams of a clip, as the embed stage computes them and generation recomputes them on any video: frame
sampling at a target rate, and `Encoders`, the CLIP and flow encoders built on first use, and the scene stream's
edge-orientation spectrum (pipeline/encoders/scene.py, no weights) on the CLIP stream's frames.

Both streams use the same time axis: row k of a stream sampled at `fps` belongs to time k / fps seconds from the start
of the clip, and a clip of duration d has ceil(d * fps) rows (ingested clips start at 0 with a constant frame rate).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from pipeline.config import EmbedConfig
from pipeline.encoders import clip as clip_enc
from pipeline.encoders import flow as flow_enc
from pipeline.encoders import scene as scene_enc
from pipeline.media import MediaError, decode_video
from pipeline.shards import Item

log = logging.getLogger(__name__)


def sample_indices(n_frames: int, native_fps: float, fps: float) -> list[int]:
    """Native frame index of each sample k at time k / fps (nearest frame), for every k with k / fps < duration."""
    step = native_fps / fps
    count = max(1, math.ceil(n_frames / step - 1e-9))
    return [min(n_frames - 1, int(math.floor(k * step + 0.5))) for k in range(count)]


def iter_samples(path: str | Path, fps: float, gray: bool = False, info: dict | None = None) -> Iterator[np.ndarray]:
    """The frames nearest to k / fps, k = 0, 1, ..., decoded and yielded one at a time (memory: one frame, whatever
    the duration). A rate above the native one yields the same array again (do not modify them).

    Args:
        path: a video file with a constant frame rate (every ingested clip is one).
        fps: samples per second.
        gray: luma only ([H, W] uint8) instead of RGB ([H, W, 3] uint8).
        info: when given, receives `native_fps` and `n_frames` (native frames decoded) once the video is exhausted.

    Raises `MediaError` (reason ``corrupt``) on undecodable input.
    """
    k, n, last, step = 0, 0, None, 1.0
    for frame, native in decode_video(path):
        step, array = native / fps, None
        while math.floor(k * step + 0.5) == n:  # the frame count is known only at the end: yield as we go
            array = _to_array(frame, gray) if array is None else array
            yield array
            k += 1
        n, last = n + 1, frame
    if last is None:
        raise MediaError(path, "no decodable video frame")
    count = max(1, math.ceil(n / step - 1e-9))  # as sample_indices: the samples past the last frame repeat it
    if k < count:
        array = _to_array(last, gray)
        for _ in range(count - k):
            yield array
    if info is not None:
        info.update(native_fps=native, n_frames=n)


def sample_frames(path: str | Path, fps: float, gray: bool = False) -> tuple[np.ndarray, float, int]:
    """Decode a clip and keep the frames nearest to k / fps (`iter_samples`, stacked).

    Returns:
        (frames [T, H, W(, 3)] uint8, native fps, number of native frames).
    """
    info: dict = {}
    frames = np.stack(list(iter_samples(path, fps, gray, info)))
    return frames, info["native_fps"], info["n_frames"]


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive frames stacked `size` at a time (the last chunk may be shorter)."""
    chunk: list[np.ndarray] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


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
    """The compute functions FeatureStore calls (clip, flow, scene; patch for the spatial ablation); each encoder is
    built on its first use."""

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

    def scene(self, item: Item) -> tuple[np.ndarray, dict]:
        """The edge-orientation spectra of the CLIP stream's frames (their luma, `scene.spectra`): (T, 11), row k at
        time k / clip_fps like the clip stream's."""
        _check_exists(item.payload)
        frames, native_fps, n = sample_frames(item.payload, self.cfg.clip_fps, gray=True)
        return scene_enc.spectra(frames), {"fps": self.cfg.clip_fps, "duration_s": round(n / native_fps, 6)}

    def patch(self, item: Item) -> tuple[np.ndarray, dict]:
        """The CLIP stream's frames as patch embeddings on the flow descriptor's grid (`ClipEncoder.patches`):
        (T, grid^2 * Dc), row k at time k / clip_fps like the clip stream's."""
        _check_exists(item.payload)
        if self._clip is None:
            self._clip = _load("clip", clip_enc.ClipEncoder, self.cfg.clip, self.cfg.encoders_dir, self.device)
        frames, native_fps, n = sample_frames(item.payload, self.cfg.clip_fps)
        return self._clip.patches(frames, self.cfg.flow.grid), {"fps": self.cfg.clip_fps,
                                                                "duration_s": round(n / native_fps, 6)}


    # Streamed: what generation calls on a video of any length. Same rows as clip() / flow() on the same file (CLIP
    # chunks are whole batches, flow chunks carry the previous chunk's last frame), frames decoded one chunk at a time.

    def clip_streamed(self, path: str | Path, batches_per_chunk: int = 8) -> tuple[np.ndarray, dict]:
        """clip(), `batches_per_chunk` CLIP batches of frames in memory at a time -> (rows [T, Dc], metadata)."""
        _check_exists(path)
        if self._clip is None:
            self._clip = _load("clip", clip_enc.ClipEncoder, self.cfg.clip, self.cfg.encoders_dir, self.device)
        info: dict = {}
        size = self.cfg.clip.batch_size * max(1, batches_per_chunk)
        rows = [self._clip(frames) for frames in _chunks(iter_samples(path, self.cfg.clip_fps, False, info), size)]
        return np.concatenate(rows), {"fps": self.cfg.clip_fps,
                                      "duration_s": round(info["n_frames"] / info["native_fps"], 6)}

    def scene_streamed(self, path: str | Path) -> tuple[np.ndarray, dict]:
        """scene(), one frame in memory at a time -> (rows [T, 11], metadata)."""
        _check_exists(path)
        info: dict = {}
        rows = [scene_enc.edge_spectrum(f) for f in iter_samples(path, self.cfg.clip_fps, True, info)]
        return np.stack(rows), {"fps": self.cfg.clip_fps,
                                "duration_s": round(info["n_frames"] / info["native_fps"], 6)}

    def flow_streamed(self, path: str | Path, chunk_frames: int = 240) -> tuple[np.ndarray, dict]:
        """flow(), `chunk_frames` frames in memory at a time -> (rows [T, Df], metadata)."""
        _check_exists(path)
        if self._flow is None:
            self._flow = _load("flow", flow_enc.FlowEncoder, self.cfg.flow, self.device)
        info: dict = {}
        rows, previous = [], None
        for frames in _chunks(iter_samples(path, self.cfg.flow_fps, self._flow.gray, info), max(2, chunk_frames)):
            if previous is None:
                rows.append(self._flow(frames, self.cfg.flow_fps))  # its first row: no motion before frame 0
            else:  # the pair (previous chunk's last frame, this chunk's first) belongs to this chunk
                rows.append(self._flow(np.concatenate([previous[None], frames]), self.cfg.flow_fps)[1:])
            previous = frames[-1]
        return np.concatenate(rows), {"fps": self.cfg.flow_fps,
                                      "duration_s": round(info["n_frames"] / info["native_fps"], 6)}


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
