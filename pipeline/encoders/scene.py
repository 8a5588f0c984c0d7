"""The scene stream: what shapes a frame is made of, a rotation-invariant edge-orientation spectrum in whole numbers.

Why: on SynthV2M the instrument is the shape of the scene's objects (star piano, square organ, triangle pluck,
circle bell), and the embedded CLIP stand-in (a ViT with seeded random weights) carries too little of it for the
decoder to pick the timbre (a probe of its embeddings names the instrument of 0.65 of val + test clips; the full
system played the scene's instrument on 0.2 of test clips, chance being 0.25). A shape's edges point in a few
directions (a square's in 2, a triangle's in 3, a star's in 5 up to rotation; a circle's in all), so the histogram of
edge orientations, read through the magnitudes of its Fourier coefficients (which a rotation only shifts in phase),
names the shape whatever its angle: a probe of these 11 numbers' mean and spread over a clip names the instrument of
all 40 val + test clips (docs/baselines.md, "Timbre").

Per frame (the luma plane of the frames the CLIP stream samples, at `embed.clip_fps`):
1. 2 x 2 blocks summed (a 224-pixel clip is read at 112);
2. Sobel gradients gx, gy;
3. each gradient's orientation modulo 180 degrees, in 36 bins of 5 degrees: the bin is the count of bin edges the
   gradient lies past, each a sign test of a cross product against a table of integer sines and cosines;
4. the strongest 10 % of gradients (by |gx| + |gy|, ties all kept) vote with that magnitude;
5. out: |H_k| / H_0 for k = 1 .. 11, the discrete Fourier coefficients of the 36-bin histogram H, from the same
   integer table.

Steps 1-4 and the coefficients' real and imaginary parts are integer arithmetic, and the last step only squares,
adds, takes a square root and divides, which IEEE 754 rounds exactly: the stream is the same bytes on every CPU,
whatever its SIMD kernels or BLAS (tests/test_scene.py checks it under OpenBLAS variations). No weights, nothing to
download.

Public interface:
    edge_spectrum(luma)   # [H, W] uint8 -> [N_COEFFS] float32
    spectra(frames)       # [T, H, W] uint8 -> [T, N_COEFFS] float32: the scene stream's rows
"""

from __future__ import annotations

import numpy as np

VERSION = 1  # bump when the rows change: the embed stage recomputes the stream
N_BINS = 36  # 5-degree orientation bins over 180 degrees
N_COEFFS = 11  # |H_1| .. |H_11| / H_0
STRONGEST = 0.10  # the share of gradients that vote
SCALE = 16384  # the integer table's unit
# round(16384 cos(5 j degrees)) and round(16384 sin(5 j degrees)), j = 0 .. 35 (none within 0.008 of a rounding
# boundary), written out so that no libm is consulted
_COS5 = (16384, 16322, 16135, 15826, 15396, 14849, 14189, 13421, 12551, 11585, 10531, 9397, 8192, 6924, 5604, 4240,
         2845, 1428, 0, -1428, -2845, -4240, -5604, -6924, -8192, -9397, -10531, -11585, -12551, -13421, -14189,
         -14849, -15396, -15826, -16135, -16322)
_SIN5 = (0, 1428, 2845, 4240, 5604, 6924, 8192, 9397, 10531, 11585, 12551, 13421, 14189, 14849, 15396, 15826, 16135,
         16322, 16384, 16322, 16135, 15826, 15396, 14849, 14189, 13421, 12551, 11585, 10531, 9397, 8192, 6924, 5604,
         4240, 2845, 1428)


def _dft_tables() -> tuple[np.ndarray, np.ndarray]:
    """(N_COEFFS + 1, N_BINS) int64: SCALE cos and sin of 2 pi k n / 36 = 10 k n degrees, from the 5-degree table
    (an angle past 180 degrees is the table's angle less 180 with the sign flipped)."""
    cos5, sin5 = np.array(_COS5, np.int64), np.array(_SIN5, np.int64)
    j = (2 * np.arange(N_COEFFS + 1)[:, None] * np.arange(N_BINS)[None]) % (2 * N_BINS)  # in 5-degree steps
    sign = np.where(j >= N_BINS, -1, 1)
    return sign * cos5[j % N_BINS], sign * sin5[j % N_BINS]


_DFT_COS, _DFT_SIN = _dft_tables()


def orientation_bins(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Integer gradients -> the bin (0 .. 35) of each one's orientation modulo 180 degrees, exactly: the gradient is
    turned into the upper half plane, and its bin is how many of the edges at 5, 10, .., 175 degrees it lies at or
    past (cos(e) gy - sin(e) gx >= 0, in the integer table)."""
    flip = (gy < 0) | ((gy == 0) & (gx < 0))
    x = np.where(flip, -gx, gx).astype(np.int64)
    y = np.where(flip, -gy, gy).astype(np.int64)
    out = np.zeros(x.shape, np.int64)
    for e in range(1, N_BINS):
        out += (_COS5[e] * y - _SIN5[e] * x) >= 0
    return out


def edge_spectrum(luma: np.ndarray) -> np.ndarray:
    """One frame's luma [H, W] uint8 -> [N_COEFFS] float32, |H_k| / H_0 for k = 1 .. 11 (the module docstring); a
    frame without a single edge gives zeros."""
    y = np.asarray(luma)
    if y.ndim != 2 or y.dtype != np.uint8:
        raise ValueError(f"scene: a frame must be [H, W] uint8 luma, got {y.shape} {y.dtype}")
    h, w = (y.shape[0] // 2) * 2, (y.shape[1] // 2) * 2
    if h < 6 or w < 6:
        raise ValueError(f"scene: a frame of {y.shape[1]}x{y.shape[0]} is too small (6x6 at least)")
    y = y[:h, :w].astype(np.int32)
    y = y[0::2, 0::2] + y[1::2, 0::2] + y[0::2, 1::2] + y[1::2, 1::2]  # 2 x 2 block sums
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    mag = (np.abs(gx) + np.abs(gy)).ravel()
    threshold = np.partition(mag, int((1 - STRONGEST) * (mag.size - 1)))[int((1 - STRONGEST) * (mag.size - 1))]
    keep = mag >= max(int(threshold), 1)
    if not keep.any():
        return np.zeros(N_COEFFS, np.float32)
    bins = orientation_bins(gx.ravel()[keep], gy.ravel()[keep])
    hist = np.zeros(N_BINS, np.int64)
    np.add.at(hist, bins, mag[keep].astype(np.int64))
    re = (_DFT_COS @ hist).astype(np.float64)  # integer products and sums, exact in int64, then exact in float64
    im = (_DFT_SIN @ hist).astype(np.float64)
    size = np.sqrt(re * re + im * im)  # each operation correctly rounded: the same bits everywhere
    return (size[1:] / size[0]).astype(np.float32)


def spectra(frames: np.ndarray) -> np.ndarray:
    """Frames [T, H, W] uint8 luma -> the scene stream's rows [T, N_COEFFS] float32."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"scene: frames must be [T, H, W] uint8 luma, got {frames.shape}")
    return np.stack([edge_spectrum(f) for f in frames]) if len(frames) else np.zeros((0, N_COEFFS), np.float32)
