"""Frame encoders of the embed stage: `clip.py` (open_clip image embeddings) and `flow.py` (optical flow reduced to a
per-frame motion descriptor), plus what they share: frame sampling at a target rate, device and thread choice.

Both streams use the same time axis: row k of a stream sampled at `fps` belongs to time k / fps seconds from the start
of the clip, and a clip of duration d has ceil(d * fps) rows (ingested clips start at 0 with a constant frame rate).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import av
import numpy as np

from pipeline.media import MediaError

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


def resolve_device(device: str) -> str:
    """`auto` -> this process's GPU when torch sees one (cuda:$LOCAL_RANK under torchrun), else "cpu"."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def set_threads(threads: int) -> int:
    """Set torch's (and OpenCV's) intra-op threads; 0 = the cores divided by the processes on this node.

    More threads than free cores makes every small op wait for a descheduled thread: on a 2-core machine shared with
    other work, 2 threads ran the embedded CLIP model ~8x slower than 1. Scale out with processes (torchrun), not
    threads. Returns the number set.
    """
    import cv2
    import torch

    if threads <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads
