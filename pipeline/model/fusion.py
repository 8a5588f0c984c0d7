"""Conditioning: CLIP + optical-flow streams (+ optional caption text) -> the decoder's memory [B, T, d] + mask.

The two video streams run at different rates (CLIP at `embed.clip_fps`, flow at `embed.flow_fps`; row k of either is
time k / fps, see pipeline/encoders/flow.py), so neither a shared index nor a shared length means anything. Each row
therefore gets a sinusoidal embedding of its time *in seconds* (`SecondsEmbedding`), and the streams meet through
temporal cross-attention (`CrossBlock`), in which time is the only thing that lines up a flow row with a CLIP row.

Direction (`FusionConfig.direction`):
- `flow_to_clip`: flow rows (fine, 24 fps) query the CLIP rows (coarse, 2 fps): every motion event learns what scene it
  happens in, and the fine time grid, which beats need, is kept. The default, chosen by that argument; the three
  directions compared on SynthV2M: docs/studies/motion.md.
- `clip_to_flow`: CLIP rows query flow: the scene rows summarise the motion around them (coarse in time).
- `both`: the two, one after the other.
- `none`: no cross-attention; the streams are only projected and concatenated.

The memory is the concatenation along time of the fused CLIP rows, the fused flow rows and, when enabled, one text
row (a sentence embedding of the caption), each tagged with a learned stream embedding. `use_motion: false` drops the
flow stream entirely (the `no_motion` ablation), `use_clip: false` the CLIP stream (the `no_clip` ablation: motion
only, no cross-attention). Text dropout (`text_dropout`) masks the caption row in training so
that text stays optional at inference.

Alignment (the audiocraft `input_interpolate` fuser, as in DyViM): `context_at(times)` interpolates the fused streams
to arbitrary times (the decoder's token frames) so that the decoder can add the local video context to its input at
every step instead of having to find it by cross-attention.

`mode: long_short` (`LongShortFusion`) is the VidMuse-style baseline, a re-implementation of the idea of VidMuse's
long-short-term visual module on the same CLIP rows (docs/baselines.md): a long-term summary of the whole video
(`long_rows` segment means) and, at every moment, a short-term window of the frames around it (`short_s` seconds),
which queries the long-term summary by cross-attention. No flow stream: VidMuse sees frames only.

`mode: spatial` (`SpatialFusion`) is the spatial-fusion ablation (the paper's third conclusion, docs/baselines.md):
the CLIP stream enters as patch embeddings on the flow descriptor's grid (the `patch` stream of `v2m embed --streams
patch`, `flow_cells` cells a frame) and the flow stream as one token per cell and frame, each token tagged with
its cell; at each moment the flow tokens query the CLIP patch tokens (cross-attention in space, where the temporal
fusion's is in time), and the decoder attends to every patch token, not to one CLIP row per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIRECTIONS = ("flow_to_clip", "clip_to_flow", "both", "none")
MODES = ("temporal", "long_short", "spatial")


@dataclass(frozen=True)
class FusionConfig:
    clip_dim: int = 256  # D of the CLIP stream (set from the feature store)
    flow_dim: int = 160  # D of the flow stream (set from the feature store)
    d_model: int = 128  # width of the memory = the decoder's width
    n_heads: int = 4
    n_layers: int = 1  # cross-attention blocks per direction
    direction: str = "flow_to_clip"  # flow_to_clip | clip_to_flow | both | none
    use_motion: bool = True  # False = drop the flow stream (the no_motion ablation)
    # the flow descriptor's grid cells (D = cells x per-cell values): temporal, > 1 averages over them first
    # (train.flow_pool); spatial, a token per cell (the patch stream has the same cells)
    flow_cells: int = 1
    text_dim: int = 0  # 0 = no text; 384 for all-MiniLM-L6-v2
    text_dropout: float = 0.5  # probability of hiding the caption in training (text optional at inference)
    dropout: float = 0.0
    min_period_s: float = 0.05  # shortest period of the time embedding (finer than a token frame)
    max_period_s: float = 200.0  # longest period (longer than any clip)
    # where flow row k (the motion between frames k-1 and k) sits in time: end = k / fps (causal: the context at t
    # holds motion up to t) | centre = (k - 0.5) / fps. At 8 fps centre aligned worse (val_beat_f1 0.45/0.49/0.73 vs
    # 0.57/0.67/0.76 at steps 100/200/300, docs/studies/motion.md); at 24 fps they are 21 ms apart.
    flow_time: str = "end"
    # how a flow row is scaled before its projection: layer = LayerNorm over the row, which divides out the row's
    # overall speed (on SynthV2M the hop speed is the note density: 1 note a beat came out as 2.5 onsets a beat) |
    # log = sign(x) log(1 + |x| / FLOW_LOG_FLOOR), elementwise, which keeps how fast as well as where and which way
    flow_norm: str = "layer"
    use_clip: bool = True  # False = drop the CLIP stream (the no_clip ablation: motion only)
    mode: str = "temporal"  # temporal (TemporalFusion) | long_short (LongShortFusion: the VidMuse-style baseline)
    short_s: float = 2.0  # long_short: the short-term window, seconds of frames centred on each moment
    long_rows: int = 4  # long_short: rows of the long-term summary (the whole video in that many equal segments)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"fusion.direction: {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if self.mode not in MODES:
            raise ValueError(f"fusion.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not (self.use_clip or self.use_motion):
            raise ValueError("fusion: use_clip and use_motion are both false: the model would see nothing")
        if self.mode == "long_short" and (self.use_motion or not self.use_clip):
            raise ValueError("fusion.mode long_short reads the CLIP stream only: set use_motion false, use_clip true")
        if self.mode == "spatial" and not (self.use_clip and self.use_motion):
            raise ValueError("fusion.mode spatial reads the patch and flow streams: set use_clip and use_motion true")
        if self.flow_cells < 1 or self.flow_dim % self.flow_cells:
            raise ValueError(f"fusion: flow_cells must be >= 1 and divide flow_dim, got {self.flow_cells}, "
                             f"{self.flow_dim}")
        if self.mode == "long_short" and (self.short_s <= 0 or self.long_rows < 1):
            raise ValueError(f"fusion: short_s must be > 0 and long_rows >= 1, got {self.short_s:g}, "
                             f"{self.long_rows}")
        if self.flow_time not in ("centre", "end"):
            raise ValueError(f"fusion.flow_time: {self.flow_time!r} is not one of centre, end")
        if self.flow_norm not in ("layer", "log"):
            raise ValueError(f"fusion.flow_norm: {self.flow_norm!r} is not one of layer, log")


FLOW_LOG_FLOOR = 0.05  # short sides per second: about the median frame speed of a SynthV2M clip (background jitter)


class SignedLog(nn.Module):
    """sign(x) log(1 + |x| / floor), elementwise: a fixed compression that keeps the scale of the input, unlike a
    per-row LayerNorm (descriptor values span 0 to ~2 short sides per second, the hops' peaks 10-40x the jitter)."""

    def __init__(self, floor: float = FLOW_LOG_FLOOR):
        super().__init__()
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sign() * torch.log1p(x.abs() / self.floor)


class SecondsEmbedding(nn.Module):
    """Sinusoidal embedding of a time in seconds, periods log-spaced in [min_period_s, max_period_s]."""

    def __init__(self, dim: int, min_period_s: float, max_period_s: float):
        super().__init__()
        periods = torch.logspace(math.log10(min_period_s), math.log10(max_period_s), dim // 2)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.dim = dim

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        """seconds (...,) -> (..., dim)."""
        angle = seconds[..., None].float() * self.omega  # (..., dim/2)
        emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
        return F.pad(emb, (0, self.dim - emb.shape[-1]))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to a context with a padding mask) + feed-forward, both residual."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, d), ctx (B, Tk, d), ctx_mask (B, Tk) True = valid -> (B, Tq, d)."""
        kv = self.norm_kv(ctx)
        x = x + self.attn(self.norm_q(x), kv, kv, key_padding_mask=~ctx_mask, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


def rows_at(rows: torch.Tensor, mask: torch.Tensor, fps: torch.Tensor, seconds: torch.Tensor,
            shift: float = 0.0) -> torch.Tensor:
    """Rows (B, T, D) of a stream whose row k is at time (k + shift) / fps (B,), linearly interpolated to `seconds`
    (B, S) -> (B, S, D). Times before the first row or past an item's last valid row (mask (B, T)) take that row
    (no extrapolation)."""
    last = (mask.sum(1) - 1).clamp(min=0).float()[:, None]  # (B, 1)
    pos = torch.minimum((seconds * fps[:, None] - shift).clamp(min=0.0), last)  # (B, S)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last.long())
    w = (pos - lo.float())[..., None]  # (B, S, 1)
    at_lo = rows.gather(1, lo[..., None].expand(-1, -1, rows.shape[-1]))  # (B, S, D)
    at_hi = rows.gather(1, hi[..., None].expand(-1, -1, rows.shape[-1]))
    return (1 - w) * at_lo + w * at_hi


@dataclass
class Conditioning:
    """What the decoder sees: the memory for cross-attention and the fused streams for interpolation."""

    memory: torch.Tensor  # (B, M, d)
    mask: torch.Tensor  # (B, M) bool, True = valid
    # [(rows (B, T, d), mask (B, T), fps (B,), shift)]: row k of a stream is at time (k + shift) / fps
    streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
    harmony: torch.Tensor | None = None  # (B, d) embedded pitch-class profile added at every step (V2M's harmony)
    harmony_logits: torch.Tensor | None = None  # (B, 12) the harmony head's prediction
    # (embedded rows (B, Tc, d), mask (B, Tc), fps (B,)): the harmony track, what sounds at each CLIP row's time
    harmony_track: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # (projected caption (B, d), mask (B,) after caption dropout): what V2M's text prior reads (text_prior)
    text: tuple[torch.Tensor, torch.Tensor] | None = None
    scene: torch.Tensor | None = None  # (B, K, V) the scene prior's logit bias (V2M's, with scene_dim)

    def context_at(self, seconds: torch.Tensor) -> torch.Tensor:
        """The fused video streams linearly interpolated to `seconds` (B, S) and summed -> (B, S, d)."""
        out = 0
        for rows, mask, fps, shift in self.streams:
            out = out + rows_at(rows, mask, fps, seconds, shift)
        return out

    def drop(self, keep: torch.Tensor) -> Conditioning:
        """Zero the conditioning of items where keep (B,) is False: the null condition of classifier-free guidance."""
        k = keep.to(self.memory.dtype)[:, None, None]
        track = None if self.harmony_track is None else (self.harmony_track[0] * k, *self.harmony_track[1:])
        text = None if self.text is None else (self.text[0] * k[:, 0], self.text[1] & keep)
        return Conditioning(self.memory * k, self.mask, [(r * k, m, f, s) for r, m, f, s in self.streams],
                            None if self.harmony is None else self.harmony * k[:, 0], self.harmony_logits, track, text,
                            None if self.scene is None else self.scene * k)


class _Fusion(nn.Module):
    """What the fusions share: the caption row at the end of the memory."""

    cfg: FusionConfig

    def _with_text(self, cfg: FusionConfig, clip: torch.Tensor, parts: list, masks: list, streams: list,
                   text: torch.Tensor | None, text_mask: torch.Tensor | None,
                   text_force: torch.Tensor | None = None) -> Conditioning:
        """The memory: `parts` (+ the caption row when the model has text) concatenated along time. Caption dropout
        spares items whose `text_force` (B,) is True (the timbre-swapped items, whose caption names what they play)."""
        B = clip.shape[0]
        row = None
        if cfg.text_dim:
            if text is None:  # no caption at all: a masked placeholder row keeps shapes fixed
                text = clip.new_zeros(B, cfg.text_dim)
                text_mask = torch.zeros(B, dtype=torch.bool, device=clip.device)
            if self.training and cfg.text_dropout > 0:
                kept = torch.rand(B, device=clip.device) >= cfg.text_dropout
                text_mask = text_mask & (kept if text_force is None else kept | text_force)
            row = self.text_in(text)  # (B, d)
            parts.append(row[:, None] + self.stream_emb[2])  # (B, 1, d)
            masks.append(text_mask[:, None])
        return Conditioning(torch.cat(parts, dim=1), torch.cat(masks, dim=1), streams,
                            text=None if row is None else (row, text_mask))


def make_fusion(cfg: FusionConfig) -> _Fusion:
    """The fusion `cfg.mode` names: TemporalFusion (v2m's), LongShortFusion (the VidMuse-style baseline) or
    SpatialFusion (the spatial-fusion ablation)."""
    return {"long_short": LongShortFusion, "spatial": SpatialFusion}.get(cfg.mode, TemporalFusion)(cfg)


class TemporalFusion(_Fusion):
    """CLIP (B, Tc, Dc) + flow (B, Tf, Df) [+ text (B, Dt)] -> Conditioning with memory (B, Tc + Tf [+ 1], d)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.time = SecondsEmbedding(d, cfg.min_period_s, cfg.max_period_s)
        if cfg.use_clip:
            self.clip_in = nn.Sequential(nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, d))
        self.stream_emb = nn.Parameter(torch.zeros(3, d))  # clip, flow, text
        nn.init.normal_(self.stream_emb, std=0.02)
        if cfg.use_motion:
            flow_in = cfg.flow_dim // cfg.flow_cells
            norm = nn.LayerNorm(flow_in) if cfg.flow_norm == "layer" else SignedLog()
            self.flow_in = nn.Sequential(norm, nn.Linear(flow_in, d))
            n = cfg.n_layers
            with_f2c = cfg.use_clip and cfg.direction in ("flow_to_clip", "both")
            with_c2f = cfg.use_clip and cfg.direction in ("clip_to_flow", "both")
            self.flow_to_clip = nn.ModuleList([CrossBlock(d, cfg.n_heads, cfg.dropout) for _ in range(n * with_f2c)])
            self.clip_to_flow = nn.ModuleList([CrossBlock(d, cfg.n_heads, cfg.dropout) for _ in range(n * with_c2f)])
        if cfg.text_dim:
            self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.out = nn.LayerNorm(d)

    def forward(self, clip: torch.Tensor, clip_mask: torch.Tensor, clip_fps: torch.Tensor,
                flow: torch.Tensor | None = None, flow_mask: torch.Tensor | None = None,
                flow_fps: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_force: torch.Tensor | None = None) -> Conditioning:
        """Args: clip (B, Tc, Dc), masks (B, T) bool True = valid, fps (B,) rows per second, text (B, Dt) with
        text_mask (B,) (False = no caption) and text_force (B,) (True = never dropped in training). Returns
        Conditioning(memory (B, M, d), mask (B, M), streams)."""
        cfg = self.cfg
        B, Tc, _ = clip.shape
        c = None
        if cfg.use_clip:
            t_clip = torch.arange(Tc, device=clip.device)[None] / clip_fps[:, None]  # (B, Tc) seconds
            c = self.clip_in(clip) + self.time(t_clip) + self.stream_emb[0]  # (B, Tc, d)
        parts, masks, streams = [], [], []
        if cfg.use_motion:
            if flow is None:
                raise ValueError("use_motion is set but no flow stream was given")
            B, Tf, Df = flow.shape
            if cfg.flow_cells > 1:  # where in the frame things move is clip-specific: keep how fast and which way
                flow = flow.view(B, Tf, cfg.flow_cells, Df // cfg.flow_cells).mean(2)
            # row k holds the motion between the frames at (k-1)/fps and k/fps (pipeline/encoders/flow.py)
            shift = -0.5 if cfg.flow_time == "centre" else 0.0
            t_flow = (torch.arange(Tf, device=flow.device)[None] + shift) / flow_fps[:, None]  # (B, Tf)
            f = self.flow_in(flow) + self.time(t_flow) + self.stream_emb[1]  # (B, Tf, d)
            c0 = c
            for block in self.flow_to_clip:
                f = block(f, c0, clip_mask)  # motion events learn their scene
            for block in self.clip_to_flow:
                c = block(c, f, flow_mask)  # scene rows summarise nearby motion
            f = self.out(f)
            parts.append(f), masks.append(flow_mask), streams.append((f, flow_mask, flow_fps, shift))
        if c is not None:
            c = self.out(c)
            parts.insert(0, c), masks.insert(0, clip_mask), streams.insert(0, (c, clip_mask, clip_fps, 0.0))
        return self._with_text(cfg, clip, parts, masks, streams, text, text_mask, text_force)


def window_means(rows: torch.Tensor, mask: torch.Tensor, fps: torch.Tensor, seconds: float) -> torch.Tensor:
    """Rows (B, T, d) at k / fps (B,) with mask (B, T) -> (B, T, d): at each row, the mean of the valid rows within
    +-seconds / 2 of its time (the short-term window around that moment)."""
    k = torch.arange(rows.shape[1], device=rows.device, dtype=torch.float32)
    near = (k[None, :, None] - k[None, None, :]).abs() <= 0.5 * seconds * fps.float()[:, None, None] + 1e-6
    weights = (near & mask[:, None, :]).to(rows.dtype)  # (B, T, T); the row itself is always in its window
    return weights @ rows / weights.sum(-1, keepdim=True).clamp(min=1.0)


def segment_means(rows: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, T, d) with mask (B, T) -> (B, n, d) the means of n consecutive segments of each item's valid rows
    (segment j: rows floor(j V / n) to floor((j + 1) V / n), at least one; V valid rows), and their centres (B, n) in
    rows."""
    valid = mask.sum(1).clamp(min=1).float()[:, None]  # (B, 1)
    j = torch.arange(n, device=rows.device, dtype=torch.float32)[None]
    lo = (j * valid / n).floor()
    hi = torch.maximum(((j + 1) * valid / n).floor(), lo + 1).minimum(valid)
    lo = lo.minimum(hi - 1)
    k = torch.arange(rows.shape[1], device=rows.device, dtype=torch.float32)[None, None]
    weights = ((k >= lo[..., None]) & (k < hi[..., None])).to(rows.dtype)  # (B, n, T)
    return weights @ rows / weights.sum(-1, keepdim=True), (lo + hi - 1) / 2


class LongShortFusion(_Fusion):
    """The VidMuse-style baseline's conditioning, on CLIP rows only (module docstring, docs/baselines.md).

    Long-term: the whole video's CLIP rows (`long_clip`, (B, Tl, Dc); the clip itself when not given) in
    `long_rows` segment means, each with the time of its centre. Short-term: at every CLIP row of the window, the mean
    of the rows within `short_s` / 2 of it. The short rows query the long-term rows (cross-attention, `n_layers`
    blocks), so each moment is read in the context of the whole video; the memory is [long rows, short rows] and the
    short rows are the stream interpolated to every token step (with the model's `interpolate`)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.time = SecondsEmbedding(d, cfg.min_period_s, cfg.max_period_s)
        self.clip_in = nn.Sequential(nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, d))
        self.stream_emb = nn.Parameter(torch.zeros(3, d))  # short, long, text
        nn.init.normal_(self.stream_emb, std=0.02)
        self.short_to_long = nn.ModuleList([CrossBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers)])
        if cfg.text_dim:
            self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.out = nn.LayerNorm(d)

    def forward(self, clip: torch.Tensor, clip_mask: torch.Tensor, clip_fps: torch.Tensor,
                flow: torch.Tensor | None = None, flow_mask: torch.Tensor | None = None,
                flow_fps: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, long_clip: torch.Tensor | None = None,
                long_mask: torch.Tensor | None = None, text_force: torch.Tensor | None = None) -> Conditioning:
        """As TemporalFusion.forward (the flow arguments are ignored), plus `long_clip` (B, Tl, Dc) with `long_mask`:
        the whole video's CLIP rows when the clip is one window of a longer video. -> memory (B, long_rows + Tc
        [+ 1], d)."""
        cfg = self.cfg
        if long_clip is None:
            long_clip, long_mask = clip, clip_mask
        Tc = clip.shape[1]
        t_clip = torch.arange(Tc, device=clip.device)[None] / clip_fps[:, None]  # (B, Tc) seconds
        short = window_means(self.clip_in(clip), clip_mask, clip_fps, cfg.short_s)
        short = short + self.time(t_clip) + self.stream_emb[0]
        long, centre = segment_means(self.clip_in(long_clip), long_mask, cfg.long_rows)
        long = long + self.time(centre / clip_fps[:, None]) + self.stream_emb[1]
        every = torch.ones(long.shape[:2], dtype=torch.bool, device=clip.device)
        for block in self.short_to_long:
            short = block(short, long, every)
        short, long = self.out(short), self.out(long)
        return self._with_text(cfg, clip, [long, short], [every, clip_mask], [(short, clip_mask, clip_fps, 0.0)],
                               text, text_mask, text_force)


class SpatialFusion(_Fusion):
    """The spatial-fusion ablation's conditioning (module docstring, docs/baselines.md): patch (B, Tp, P x Dc) + flow
    (B, Tf, Df) [+ text] -> Conditioning with memory (B, Tp P + Tf [+ 1], d), P = `flow_cells`.

    A CLIP patch token is its cell's embedding projected, plus its time, its cell and the stream; a flow token is its
    cell's share of the flow row (the row normalised as TemporalFusion normalises it, then cut into its P cells)
    projected, plus the same tags. The fusion is in space: at each flow row, the P flow tokens query the P patch
    tokens of that moment (interpolated to its time; `n_layers` cross-attention blocks), so each cell's motion learns
    what is seen there and around it; then the row's cells are averaged into one flow row, whose fine time grid the
    beats need. The decoder attends to every patch token and to the flow rows; the streams `context_at` interpolates
    are the per-frame means of the patch tokens and the flow rows. The CLIP rows (`clip`) are not read here: the
    model's harmony bank retrieves with them, as full's does."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.time = SecondsEmbedding(d, cfg.min_period_s, cfg.max_period_s)
        self.clip_in = nn.Sequential(nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, d))
        self.flow_norm = nn.LayerNorm(cfg.flow_dim) if cfg.flow_norm == "layer" else SignedLog()
        self.flow_in = nn.Linear(cfg.flow_dim // cfg.flow_cells, d)
        self.stream_emb = nn.Parameter(torch.zeros(3, d))  # clip patches, flow cells, text
        self.cell_emb = nn.Parameter(torch.zeros(cfg.flow_cells, d))
        nn.init.normal_(self.stream_emb, std=0.02)
        nn.init.normal_(self.cell_emb, std=0.02)
        self.flow_to_clip = nn.ModuleList([CrossBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers)])
        if cfg.text_dim:
            self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.out = nn.LayerNorm(d)

    def forward(self, clip: torch.Tensor, clip_mask: torch.Tensor, clip_fps: torch.Tensor,
                flow: torch.Tensor | None = None, flow_mask: torch.Tensor | None = None,
                flow_fps: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, patch: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None, patch_fps: torch.Tensor | None = None,
                text_force: torch.Tensor | None = None) -> Conditioning:
        """As TemporalFusion.forward, plus the patch stream: `patch` (B, Tp, P x Dc) with `patch_mask` (B, Tp) and
        `patch_fps` (B,) (`v2m embed --streams patch`)."""
        cfg = self.cfg
        if patch is None or flow is None:
            raise ValueError("the spatial fusion needs the patch and flow streams (the patch stream: `v2m embed "
                             "--streams patch`, DVC stage embed_spatial)")
        P, d = cfg.flow_cells, cfg.d_model
        B, Tp, Dp = patch.shape
        if Dp != P * cfg.clip_dim:
            raise ValueError(f"spatial fusion: patch rows of {Dp} values, expected {P} cells x {cfg.clip_dim}")
        t_patch = torch.arange(Tp, device=patch.device)[None] / patch_fps[:, None]  # (B, Tp) seconds
        cells = self.cell_emb[None, None]  # (1, 1, P, d)
        c = self.clip_in(patch.view(B, Tp, P, cfg.clip_dim)) + self.time(t_patch)[:, :, None] + cells
        c = c + self.stream_emb[0]  # (B, Tp, P, d)
        Tf = flow.shape[1]
        shift = -0.5 if cfg.flow_time == "centre" else 0.0
        t_flow = (torch.arange(Tf, device=flow.device)[None] + shift) / flow_fps[:, None]  # (B, Tf)
        f = self.flow_in(self.flow_norm(flow).view(B, Tf, P, -1)) + self.time(t_flow)[:, :, None] + cells
        f = (f + self.stream_emb[1]).reshape(B * Tf, P, d)
        seen = rows_at(c.reshape(B, Tp, P * d), patch_mask, patch_fps, t_flow).reshape(B * Tf, P, d)
        every = torch.ones(B * Tf, P, dtype=torch.bool, device=flow.device)
        for block in self.flow_to_clip:
            f = block(f, seen, every)  # each cell's motion learns what is seen at that moment, there and around it
        f = self.out(f.view(B, Tf, P, d).mean(2))  # (B, Tf, d)
        c = self.out(c)
        c_mask = patch_mask[:, :, None].expand(B, Tp, P).reshape(B, Tp * P)
        streams = [(c.mean(2), patch_mask, patch_fps, 0.0), (f, flow_mask, flow_fps, shift)]
        return self._with_text(cfg, clip, [c.reshape(B, Tp * P, d), f], [c_mask, flow_mask], streams, text,
                               text_mask, text_force)
