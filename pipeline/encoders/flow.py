"""Flow stream: dense optical flow at `embed.flow_fps`, reduced to a compact per-frame motion descriptor [T, D].

Estimators (`embed.flow.method`):
- `opencv_dis`: OpenCV's DIS flow (preset `embed.flow.dis_preset`); no weights, ~1 ms a 224x224 pair. Embedded default.
- `opencv_farneback`: Farneback with the AV-Align parameters (0.5, 3, 15, 3, 5, 1.2, 0); no weights, slower.
- `ptlflow:<model>` (e.g. `ptlflow:rapidflow`, `ptlflow:raft_small`): a learned model from ptlflow, weights from
  `embed.flow.checkpoint` (a local file, or a ptlflow checkpoint name already in `$TORCH_HOME/hub/checkpoints`);
  without one it runs with random weights, which is only good for timing, and says so.

Descriptor (what the model learns from). Row k is the motion from the frame at (k-1)/fps to the frame at k/fps, so
row k, like every stream's row k, belongs to time k / fps; row 0 has no earlier frame and is zero. The flow field is
converted to velocity in short-side lengths per second (independent of resolution and fps), area-averaged to about
56 px on its short side, and cut into a `grid` x `grid` array of cells (row-major, top-left first). Per cell:
- `direction_bins` values: the speed-weighted histogram of motion direction (bin b covers angles
  [b * 2pi/B, (b+1) * 2pi/B) from the +x axis towards +y, image coordinates with y down: bin 0 starts at "right",
  bin B/4 at "down"), divided by the cell's pixel count, so the bins of a cell sum to its mean speed;
- 2 values: the cell's mean velocity (vx, vy): coherent translation versus rotation or jitter.
So D = grid^2 * (direction_bins + 2) (160 with the defaults): where things move (the cell), how fast (the bin sums)
and which way (the bins and the mean vector). `mean_speed(desc)` recovers the frame's mean speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.config import FlowEncoderConfig
from pipeline.shards import sha256_file

log = logging.getLogger(__name__)

VERSION = 1  # bump when the descriptor changes, so cached features are recomputed
DIS_PRESETS = ("ultrafast", "fast", "medium")
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)  # pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags
POOL_SHORT_SIDE = 56  # the flow field is area-averaged to about this many pixels on its short side before reduction


def descriptor_dim(cfg: FlowEncoderConfig) -> int:
    return cfg.grid * cfg.grid * (cfg.direction_bins + 2)


def describe(flow: np.ndarray, grid: int, bins: int, scale: float) -> np.ndarray:
    """Reduce one flow field [H, W, 2] (pixels) to the descriptor [grid^2 * (bins + 2)]; `scale` turns px into units.

    The field is first area-averaged to about POOL_SHORT_SIDE pixels on its short side: flow estimators work on 8x8
    patches (DIS) or 1/8-resolution features (RAFT and kin), so little is lost, and the reduction gets 16x cheaper.
    """
    import cv2

    h, w = flow.shape[:2]
    factor = max(1, min(h, w) // POOL_SHORT_SIDE)
    if factor > 1:
        flow = cv2.resize(flow, (max(grid, w // factor), max(grid, h // factor)), interpolation=cv2.INTER_AREA)
        h, w = flow.shape[:2]
    v = np.ascontiguousarray(flow, dtype=np.float32) * np.float32(scale)
    speed, angle = cv2.cartToPolar(np.ascontiguousarray(v[..., 0]), np.ascontiguousarray(v[..., 1]))  # [0, 2pi)
    b = np.minimum((angle * (bins / (2 * np.pi))).astype(np.int64), bins - 1)
    cy = np.minimum(np.arange(h) * grid // h, grid - 1)
    cx = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell = (cy[:, None] * grid + cx[None, :]).ravel()  # (H * W,)
    counts = np.bincount(cell, minlength=grid * grid).astype(np.float64)
    hist = np.bincount(cell * bins + b.ravel(), weights=speed.ravel(), minlength=grid * grid * bins)
    hist = hist.reshape(grid * grid, bins) / counts[:, None]
    mean_v = np.stack([np.bincount(cell, weights=v[..., i].ravel(), minlength=grid * grid) / counts for i in (0, 1)],
                      axis=1)
    return np.concatenate([hist, mean_v], axis=1).astype(np.float32).ravel()  # (grid^2 * (bins + 2),)


def mean_speed(desc: np.ndarray, cfg: FlowEncoderConfig) -> np.ndarray:
    """Mean speed per row (short sides per second) of descriptors [T, D] -> [T]."""
    cells = np.asarray(desc).reshape(len(desc), cfg.grid * cfg.grid, cfg.direction_bins + 2)
    return cells[:, :, : cfg.direction_bins].sum(axis=2).mean(axis=1)


def weights_identity(cfg: FlowEncoderConfig) -> str:
    if cfg.method.startswith("ptlflow:") and cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        return sha256_file(path) if path.is_file() else f"name:{cfg.checkpoint}"
    return ""


def check(cfg: FlowEncoderConfig) -> None:
    """Fail early, naming the key, on a method or setting that cannot work."""
    if cfg.method not in ("opencv_dis", "opencv_farneback") and not cfg.method.startswith("ptlflow:"):
        raise ValueError(f"embed.flow.method: {cfg.method!r}; use opencv_dis, opencv_farneback or ptlflow:<model>")
    if cfg.dis_preset not in DIS_PRESETS:
        raise ValueError(f"embed.flow.dis_preset: {cfg.dis_preset!r}; use one of {', '.join(DIS_PRESETS)}")
    if cfg.grid < 1 or cfg.direction_bins < 1:
        raise ValueError("embed.flow.grid and embed.flow.direction_bins must be >= 1")


class FlowEncoder:
    """Frames [T, H, W] gray (OpenCV) or [T, H, W, 3] RGB (ptlflow) uint8 at `fps` -> descriptors [T, D] float32."""

    def __init__(self, cfg: FlowEncoderConfig, device: str = "cpu"):
        check(cfg)
        self.cfg, self.device = cfg, device
        self.gray = not cfg.method.startswith("ptlflow:")
        self.model = None
        if cfg.method.startswith("ptlflow:"):
            self._init_ptlflow(cfg.method.split(":", 1)[1])

    def _init_ptlflow(self, name: str) -> None:
        import ptlflow

        ckpt = self.cfg.checkpoint or None
        if ckpt and Path(ckpt).expanduser().is_file():
            ckpt = str(Path(ckpt).expanduser())
        try:
            self.model = ptlflow.get_model(name, ckpt_path=ckpt).eval().to(self.device)
        except Exception as exc:  # noqa: BLE001 - truncated file, another model's checkpoint: name the file
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RuntimeError(f"embed.flow.checkpoint {self.cfg.checkpoint!r}: cannot load it into ptlflow {name} "
                               f"({type(exc).__name__}: {first}). Give a {name} checkpoint (not truncated), or a "
                               "ptlflow checkpoint name in $TORCH_HOME/hub/checkpoints.") from None
        if ckpt is None:
            log.warning("flow stream: ptlflow %s with RANDOM weights (embed.flow.checkpoint is null); its flow is "
                        "noise. Give a local checkpoint for real features.", name)

    def flows(self, frames: np.ndarray) -> list[np.ndarray]:
        """Flow fields [H, W, 2] in pixels from frame k-1 to frame k, k = 1 .. T-1."""
        if self.model is not None:
            return self._ptlflow(frames)
        import cv2

        if self.cfg.method == "opencv_dis":
            preset = getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{self.cfg.dis_preset.upper()}")
            dis = cv2.DISOpticalFlow_create(preset)
            return [dis.calc(frames[k - 1], frames[k], None) for k in range(1, len(frames))]
        return [cv2.calcOpticalFlowFarneback(frames[k - 1], frames[k], None, *FARNEBACK) for k in range(1, len(frames))]

    def _ptlflow(self, frames: np.ndarray) -> list[np.ndarray]:
        import torch

        # ptlflow models take {"images": (B, 2, 3, H, W)} BGR in [0, 1] (they read images with OpenCV), pad to their
        # stride themselves and return {"flows": (B, 1, 2, H, W)} in pixels at the input size
        bgr = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(1, len(frames), self.cfg.batch_size):
                ks = torch.arange(start, min(len(frames), start + self.cfg.batch_size))
                pairs = torch.stack([bgr[ks - 1], bgr[ks]], dim=1).contiguous().to(self.device)  # (B, 2, 3, H, W)
                flows = self.model({"images": pairs})["flows"][:, 0]  # (B, 2, H, W)
                out += list(flows.permute(0, 2, 3, 1).float().cpu().numpy())
        return out

    def __call__(self, frames: np.ndarray, fps: float) -> np.ndarray:
        scale = fps / min(frames.shape[1:3])  # px per frame interval -> short sides per second
        rows = [np.zeros(descriptor_dim(self.cfg), np.float32)]
        rows += [describe(f, self.cfg.grid, self.cfg.direction_bins, scale) for f in self.flows(frames)]
        return np.stack(rows)  # (T, D)
