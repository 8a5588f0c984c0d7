"""HarmonyBank: harmony by retrieval, the component V2M receives at construction (`V2M(cfg, harmony=bank)`).

Key is a property of the whole clip, and scene-to-key is many-to-one and not linear in CLIP space, so the music's
pitch-class profile (the time-averaged chroma, 12 values summing to 1, `rhythm.chroma_profile`) is retrieved rather
than predicted: on SynthV2M the 3 nearest training clips name the key for 0.95 of val clips where a ridge probe of the
same embeddings manages 0.40 (docs/studies/harmony.md). The bank holds, for the training clips,

- per clip (`track=False`): each clip's mean CLIP embedding (normalised) and the profile of its music; a query clip
  gets the similarity-weighted mean profile of the k bank clips nearest its own mean embedding (cosine; softmax at
  temperature `tau` over the k);
- per row (`track=True`): every CLIP row of every training clip with the chroma of the half second of music around
  its time (`rhythm.chroma_track`) and the clip it comes from; each row of a query clip takes the mean chroma of its k
  nearest bank rows of other clips. That is the harmony track, what sounds at each moment, and its mean over the clip
  is the profile. With the track the bank also keeps the token chroma table (K, V, 12): for every codebook and token,
  the mean chroma of the training music at the frames where the token was written, what each token sounds like
  (`generate(..., harmony_bias=w)` adds w x its correlation with the track to the token's logit). The text system's
  bank also keeps one such table per instrument (`timbres`, counted over that instrument's training clips alone): a
  prompt that names an instrument takes its table, so that the bias ranks the tokens by what they sound like in that
  timbre and stops favouring another instrument's tokens that sound the chord (docs/baselines.md, "Text steering").
  A model that reads the scene stream (`scene_dim`, with `timbre_knn: k`) keeps, instead of labels, every training
  clip's scene key (its standardised scene summary), tokens and frame chroma: the table of a query is counted over
  the music of the k training clips whose scenes are nearest (`scene_table`), what each token sounds like in music
  of scenes like this one. No label is read, and a token those clips never wrote is left alone (docs/baselines.md,
  "Timbre").

Public interface:
    bank = HarmonyBank(size, key_dim, k, tau, track, token_shape, timbres)  # empty; or HarmonyBank.from_config(cfg)
    bank.fill(keys, profiles[, clips])                                # train: the training clips (or rows)
    bank.fill_token_chroma(codes, chroma[, timbres])                  # train, with track: the token chroma table(s)
    profile, track = bank(clip, clip_mask, own)                       # (B, 12), (B, Tc, 12) or None
    bank.fill_scene(keys, codes, chroma)                              # train, with timbre_knn: the scenes' music
    bank.scene_table(query)                                           # (B, 2 D) scene keys -> (B, K, V, 12)
    bank.token_correlation(rows[, timbre, table])                     # (B, F, 12) -> (B, F, K, V)
    bank.mode_penalty(profile[, timbre, table])                       # (B, 12) -> (B, K, V), <= 0
    harmony_features(profile, key_profiles())                         # (B, 12) -> (B, 36), what V2M embeds
    key_agreement(profile, heard)                                     # (B, 12) x 2 -> (B,), same key, how likely

The bank has no parameters: its buffers travel in the checkpoint (under the names V2M's state dict has always used,
see `V2M.__init__`), and `V2M` learns how to embed what it retrieves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pipeline.model.v2m import ModelConfig

N_CHROMA = 12
KEY_SHARPNESS = 20.0  # softmax scale of the key correlations (in [-1, 1]): a 0.1 lead is a 7x odds ratio
# `scene_table`: a token's chroma in the nearest scenes' music is shrunk toward its chroma over all training clips as if
# that estimate came from this many frames (a token written a few times by the neighbours mostly keeps the all-clips
# estimate; 50 against none or 1000: key 0.925 against 0.875, chroma 0.577 against 0.556 / 0.587, instrument 0.825
# against 0.825 / 0.775 over the 40 val + test clips, docs/baselines.md, "Timbre")
SCENE_PRIOR_FRAMES = 50.0


def key_profiles() -> torch.Tensor:
    """(24, 12) the Krumhansl-Kessler major then minor profiles rotated to every tonic, each standardised."""
    from pipeline.metrics.rhythm import KK_MAJOR, KK_MINOR

    rows = [torch.roll(torch.tensor(p, dtype=torch.float32), t) for p in (KK_MAJOR, KK_MINOR) for t in range(12)]
    out = torch.stack(rows)
    return (out - out.mean(-1, keepdim=True)) / out.std(-1, keepdim=True)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each row over its last axis to mean 0 and standard deviation 1 (a flat row stays 0)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp(min=1e-6)


def harmony_features(profile: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, 12) profile -> (B, 36): the profile standardised over its 12 bins (contrast, whatever its spread) and a
    distribution over the 24 keys, a softmax of its Krumhansl-Schmuckler correlations with `keys` (24, 12)
    (`key_profiles()`) x KEY_SHARPNESS. The profiles of parallel keys (C major, C minor) differ in a few per cent of
    their mass, too little for the decoder to act on from the profile alone; the key correlations make that
    difference explicit."""
    z = standardise(profile)
    corr = z @ keys.T / (N_CHROMA - 1)  # (B, 24) Pearson correlations
    return torch.cat([z, (KEY_SHARPNESS * corr).softmax(-1)], dim=-1)


def key_agreement(profile: torch.Tensor, heard: torch.Tensor) -> torch.Tensor:
    """(B, 12) two pitch-class profiles -> (B,): the probability that both read as the same key, under the key
    distributions `harmony_features` gives each (softmax over the 24 Krumhansl-Schmuckler correlations). 1 when both
    are certain of one key, near 0 when they name different ones; a soft score, no argmax. How `inference` ranks a
    window's candidate draws: the retrieved profile against the chroma of each draw's music."""
    keys = key_profiles().to(profile.device)
    return (harmony_features(profile.float(), keys)[:, N_CHROMA:]
            * harmony_features(heard.float(), keys)[:, N_CHROMA:]).sum(-1)


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid rows: rows (B, T, D), mask (B, T) True = valid -> (B, D)."""
    valid = mask[..., None].to(rows.dtype)
    return (rows * valid).sum(1) / valid.sum(1).clamp(min=1.0)


class HarmonyBank(nn.Module):
    """The k-nearest-scene harmony bank of the training clips (see the module docstring); empty until `fill`."""

    def __init__(self, size: int, key_dim: int, k: int, tau: float = 0.05, track: bool = False,
                 token_shape: tuple[int, int] = (0, 0), timbres: int = 0, scene_k: int = 0,
                 scene_shape: tuple[int, int, int] = (0, 0, 0)):
        """Args: size, the bank's rows (training clips, or their CLIP rows with `track`); key_dim, the CLIP
        embedding's; k neighbours, softmax temperature tau; token_shape (K, V), the token chroma table's (with
        track); timbres, how many per-instrument tables it also keeps (with track; the text system's); scene_k > 0
        (with track): the token chroma table of a query is counted over the music of its scene_k nearest scenes, of
        scene_shape (training clips, their most token frames, the scene key's width)."""
        super().__init__()
        if k < 1:
            raise ValueError(f"harmony bank: k must be >= 1, got {k}")
        self.k, self.tau, self.track = k, tau, track
        self.register_buffer("bank_keys", torch.zeros(size, key_dim))  # (N, Dc) normalised
        self.register_buffer("bank_profiles", torch.zeros(size, N_CHROMA))  # (N, 12)
        if track:  # bank row -> its training clip's index, so that a clip never retrieves itself
            self.register_buffer("bank_clips", torch.zeros(size, dtype=torch.long))
            # all zero = unknown (a model trained before the table existed): harmony_bias is then 0
            self.register_buffer("token_chroma", torch.zeros(*token_shape, N_CHROMA))  # (K, V, 12)
            if timbres:  # the same table counted over each instrument's clips alone: (I, K, V, 12)
                self.register_buffer("timbre_chroma", torch.zeros(timbres, *token_shape, N_CHROMA))
        self.scene_k = scene_k
        if scene_k:
            if not track:
                raise ValueError("harmony bank: scene tables (timbre_knn) need harmony_track")
            clips, frames, width = scene_shape
            self.register_buffer("scene_keys", torch.zeros(clips, width))  # standardised scene summaries
            self.register_buffer("scene_codes", torch.full((clips, token_shape[0], frames), -1, dtype=torch.int16))
            self.register_buffer("scene_chroma", torch.zeros(clips, frames, N_CHROMA))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HarmonyBank:
        """The empty bank a model config describes (cfg.harmony_knn > 0): what a checkpoint's buffers load into."""
        return cls(cfg.harmony_bank, cfg.fusion.clip_dim, cfg.harmony_knn, cfg.harmony_tau, cfg.harmony_track,
                   (cfg.decoder.num_codebooks, cfg.decoder.codebook_size), len(cfg.timbres), cfg.timbre_knn,
                   (*cfg.timbre_bank, 2 * cfg.scene_dim) if cfg.timbre_knn else (0, 0, 0))

    @property
    def size(self) -> int:
        return self.bank_keys.shape[0]

    @property
    def key_dim(self) -> int:
        return self.bank_keys.shape[1]

    @torch.no_grad()
    def fill(self, keys: torch.Tensor, profiles: torch.Tensor, clips: torch.Tensor | None = None) -> HarmonyBank:
        """Fill the bank: mean CLIP embeddings (N, Dc) of the training clips and their profiles (N, 12); with
        `track`, CLIP rows (N, Dc), the chroma around each row's time (N, 12) and the index of the training clip each
        row comes from, `clips` (N,). Keys are stored normalised. Returns the bank."""
        if tuple(keys.shape) != tuple(self.bank_keys.shape):
            raise ValueError(f"harmony bank: expected {tuple(self.bank_keys.shape)} embeddings, "
                             f"got {tuple(keys.shape)}")
        if self.track:
            if clips is None or tuple(clips.shape) != (self.size,):
                raise ValueError(f"harmony bank: harmony_track needs the clip index of each of the {self.size} rows")
            self.bank_clips.copy_(clips.long())
        self.bank_keys.copy_(F.normalize(keys.float(), dim=-1))
        self.bank_profiles.copy_(profiles.float())
        return self

    @torch.no_grad()
    def fill_token_chroma(self, codes: list[torch.Tensor], chroma: list[torch.Tensor],
                          timbres: list[int] | None = None) -> HarmonyBank:
        """Fill the token chroma table (K, V, 12) from training music: codes[i] (K, T_i) a clip's tokens and
        chroma[i] (T_i, 12) the music's chroma at each of its frames (`rhythm.frame_chroma`, rows summing to 1). Row
        (k, v) is the mean chroma over the frames where codebook k wrote token v; a token never written keeps a zero
        row. A bank with timbre tables also needs `timbres`, each clip's instrument (an index into them), and fills
        table t from the clips of instrument t alone. Returns the bank."""
        if not self.track:
            raise ValueError("token chroma: only models with harmony_track have the table")
        self.token_chroma.copy_(self._token_means(codes, chroma))
        if self.timbre_count:
            if timbres is None or len(timbres) != len(codes) or not all(0 <= t < self.timbre_count for t in timbres):
                raise ValueError(f"token chroma: the {self.timbre_count} timbre tables need each clip's instrument "
                                 f"index in [0, {self.timbre_count})")
            for t in range(self.timbre_count):
                own = [i for i, x in enumerate(timbres) if x == t]
                self.timbre_chroma[t].copy_(self._token_means([codes[i] for i in own], [chroma[i] for i in own]))
        return self

    @torch.no_grad()
    def fill_scene(self, keys: torch.Tensor, codes: list[torch.Tensor], chroma: list[torch.Tensor]) -> HarmonyBank:
        """Keep each training clip's standardised scene key (N, 2 D), tokens codes[i] (K, T_i) and frame chroma
        chroma[i] (T_i, 12), for `scene_table`. Returns the bank."""
        clips, K, frames = self.scene_codes.shape
        if tuple(keys.shape) != tuple(self.scene_keys.shape) or len(codes) != clips or len(chroma) != clips:
            raise ValueError(f"scene tables: expected {clips} clips with keys {tuple(self.scene_keys.shape)}, got "
                             f"{tuple(keys.shape)}, {len(codes)} token arrays and {len(chroma)} chroma arrays")
        self.scene_keys.copy_(keys.float())
        self.scene_codes.fill_(-1)
        self.scene_chroma.zero_()
        for i, (c, x) in enumerate(zip(codes, chroma, strict=True)):
            T = min(c.shape[-1], x.shape[0], frames)
            self.scene_codes[i, :, :T] = c[:, :T].to(torch.int16)
            self.scene_chroma[i, :T] = x[:T].float()
        return self

    def scene_table(self, query: torch.Tensor) -> torch.Tensor:
        """Standardised scene keys (B, 2 D) -> (B, K, V, 12): for each, the token chroma table counted over the music
        of the scene_k training clips whose keys are nearest (Euclidean): the mean chroma of the frames where each
        codebook wrote each token, shrunk toward the token's row in the table of all clips (`SCENE_PRIOR_FRAMES`), and
        zero where those clips never wrote it."""
        K, V = self.token_chroma.shape[:2]
        dist = ((query.float()[:, None] - self.scene_keys[None]) ** 2).sum(-1)  # (B, N)
        nearest = dist.topk(min(self.scene_k, dist.shape[-1]), dim=-1, largest=False).indices  # (B, k)
        out = torch.zeros(query.shape[0], K, V, N_CHROMA)
        for b, index in enumerate(nearest):
            codes, chroma = self.scene_codes[index].long(), self.scene_chroma[index]  # (k, K, T), (k, T, 12)
            total = torch.zeros(K, V, N_CHROMA, dtype=torch.float64)
            count = torch.zeros(K, V, dtype=torch.float64)
            rows = chroma.reshape(-1, N_CHROMA).double()
            for k in range(K):
                c = codes[:, k].reshape(-1)
                written = c >= 0
                total[k].index_add_(0, c[written], rows[written])
                count[k].index_add_(0, c[written], torch.ones(int(written.sum()), dtype=torch.float64))
            shrunk = (total + SCENE_PRIOR_FRAMES * self.token_chroma.double()) / (count + SCENE_PRIOR_FRAMES)[..., None]
            out[b] = torch.where((count > 0)[..., None], shrunk, torch.zeros_like(shrunk)).float()
        return out.to(query.device)

    def _token_means(self, codes: list[torch.Tensor], chroma: list[torch.Tensor]) -> torch.Tensor:
        """(K, V, 12): the mean chroma of the frames where each codebook wrote each token (zero where never)."""
        K, V = self.token_chroma.shape[:2]
        total = torch.zeros(K, V, N_CHROMA, dtype=torch.float64)
        count = torch.zeros(K, V, dtype=torch.float64)
        for c, x in zip(codes, chroma, strict=True):
            T = min(c.shape[-1], x.shape[0])
            if c.shape[0] != K or (T and int(c[:, :T].max()) >= V):
                raise ValueError(f"token chroma: codes must be ({K}, T) with values < {V}, got {tuple(c.shape)}")
            for k in range(K):
                total[k].index_add_(0, c[k, :T].long(), x[:T].double())
                count[k].index_add_(0, c[k, :T].long(), torch.ones(T, dtype=torch.float64))
        return (total / count.clamp(min=1)[..., None]).float()

    @property
    def timbre_count(self) -> int:
        """How many per-instrument tables the bank keeps (0: none)."""
        return self.timbre_chroma.shape[0] if hasattr(self, "timbre_chroma") else 0

    def has_token_chroma(self) -> bool:
        return self.track and bool(self.token_chroma.abs().sum() > 0)

    def forward(self, clip: torch.Tensor, clip_mask: torch.Tensor, own: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Retrieve for clip rows (B, Tc, Dc) with clip_mask (B, Tc) -> (profile (B, 12), track (B, Tc, 12) or None
        without `track`). `own` (B,): the bank clip each item is (training items), -1 = none; an item never retrieves
        from its own clip."""
        if self.track:
            excluded = None if own is None else own[:, None] == self.bank_clips[None]
            track = self._retrieve(clip, excluded)
            return masked_mean(track, clip_mask), track
        excluded = None if own is None else own[:, None] == torch.arange(self.size, device=own.device)
        return self._retrieve(masked_mean(clip, clip_mask)[:, None], excluded)[:, 0], None

    def token_correlation(self, rows: torch.Tensor, timbre: torch.Tensor | None = None,
                          table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F, 12) chroma at F frames (the track at their times) -> (B, F, K, V): the Pearson correlation, over the
        12 pitch classes, of each frame's chroma with each token's (the token chroma table, per codebook). With
        `timbre` (B,), an item's index into the timbre tables takes what each token sounds like in that instrument's
        clips instead; -1 keeps the table of all clips. `table` (B, K, V, 12) (`scene_table`) replaces both."""
        tables = self._token_table(timbre) if table is None else table
        spec = "bfc,kvc->bfkv" if tables.dim() == 3 else "bfc,bkvc->bfkv"
        return torch.einsum(spec, standardise(rows), standardise(tables)) / (N_CHROMA - 1)

    def _token_table(self, timbre: torch.Tensor | None) -> torch.Tensor:
        """The token chroma table to score tokens by: (K, V, 12), the table of all clips; or (B, K, V, 12) with
        `timbre` (B,) on a bank with timbre tables, each item's instrument's table (-1: the table of all clips)."""
        if timbre is None or not self.timbre_count:
            return self.token_chroma
        if int(timbre.min()) < -1 or int(timbre.max()) >= self.timbre_count:
            raise ValueError(f"token chroma: timbre must be -1 (all) or below {self.timbre_count}, got "
                             f"{timbre.tolist()}")
        return torch.cat([self.token_chroma[None], self.timbre_chroma])[timbre.long() + 1]

    def mode_penalty(self, profile: torch.Tensor, timbre: torch.Tensor | None = None,
                     table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 12) retrieved profile -> (B, K, V) <= 0: how much more each token sounds the parallel key of the
        retrieved key than the key itself. For each of the 24 keys, a token's contrast is the Krumhansl-Schmuckler
        correlation of its chroma (the token chroma table, or the `timbre` table as in `token_correlation`) with the
        key minus that with its parallel key (C major <-> C minor: the same tonic, the other third, sixth and
        seventh); the penalty is the contrast where it is negative, 0 where the token sounds the key at least as well,
        averaged over the keys the profile reads as (the softmax of `harmony_features`, soft: no argmax to flip).
        So a token that plays the major third in a minor clip is held down, and the tokens the key shares with its
        parallel key (tonic, fourth, fifth) are left alone (`generate(..., mode_guard=w)`, docs/reproducibility.md)."""
        keys = key_profiles().to(profile.device)
        tables = (self._token_table(timbre) if table is None else table).expand(profile.shape[0], -1, -1, -1)
        corr = standardise(tables) @ keys.T / (N_CHROMA - 1)  # (B, K, V, 24)
        parallel = torch.cat([torch.arange(12, 24), torch.arange(12)]).to(profile.device)
        contrast = (corr - corr[..., parallel]).clamp(max=0.0)  # (B, K, V, 24)
        weights = harmony_features(profile.float(), keys)[:, N_CHROMA:]  # (B, 24): the distribution over the keys
        return torch.einsum("bkvj,bj->bkv", contrast, weights)

    def _retrieve(self, query: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
        """Query rows (B, Q, Dc) -> (B, Q, 12): the softmax-weighted (at tau) mean profile of the k bank rows nearest
        each query (cosine), leaving out the bank rows where excluded (B, N) is True. A query with nothing left to
        retrieve takes the bank's mean; an empty bank (an untrained model) gives flat profiles."""
        if not self.size:
            return query.new_full((*query.shape[:2], N_CHROMA), 1.0 / N_CHROMA).float()
        sims = F.normalize(query.float(), dim=-1) @ self.bank_keys.T  # (B, Q, N)
        if excluded is not None:
            sims = sims.masked_fill(excluded[:, None], float("-inf"))
        top, index = sims.topk(min(self.k, sims.shape[-1]), dim=-1)
        weights = (top / self.tau).softmax(-1)  # (B, Q, k)
        out = (weights[..., None] * self.bank_profiles[index]).sum(-2)
        found = torch.isfinite(top).any(-1, keepdim=True)  # a bank of one clip has no neighbour for that clip
        return torch.where(found, out, self.bank_profiles.mean(0))
