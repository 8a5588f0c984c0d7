"""V2M: the conditioner (fusion.TemporalFusion) + the fuser choice + the decoder (decoder.MusicDecoder), and the preset
registry (`list_presets`, `load_preset`, `create_model`), open_clip style: architectures are small YAML files in
pipeline/model/presets/.

How the video enters the decoder (audiocraft's fuser split):
- cross-attention, always: every decoder layer attends to the memory (B, M, d);
- `interpolate: true` in addition: the fused streams are interpolated to the time of every token step (step s of the
  delayed sequence writes frame s of codebook 0, at s / frame_rate seconds) and added to the decoder input. This is
  audiocraft's `input_interpolate` fuser (and DyViM's), and it gives the decoder the motion *at that instant* without
  having to learn where to look.

Harmony: key is a property of the whole clip, and an autoregressive decoder mostly copies it from the tokens it has
already written, so from the video alone it learned little of it (docs/studies/harmony.md). So
the music's pitch-class profile (the time-averaged chroma, 12 values summing to 1, `rhythm.chroma_profile`) is
predicted from what the scene looks like and added to the decoder input at every step, embedded together with its
correlations to the 24 major/minor key templates (`_harmony_features`). Two predictors:
- `harmony_knn: k` (the embedded default): the similarity-weighted mean profile of the k training clips whose mean
  CLIP embedding is nearest (cosine; softmax at `harmony_tau` over the k). The bank (their embeddings and profiles)
  is a buffer of the checkpoint, filled by train (`set_harmony_bank`); in training a clip never retrieves itself
  (batch["bank_index"]). Scene-to-key is many-to-one and not linear in CLIP space: on SynthV2M the 3 nearest clips
  name the key for 0.95 of val clips where a ridge probe of the same embeddings manages 0.40.
- `harmony_track: true` (with harmony_knn; the embedded default): the same retrieval per CLIP row instead of per clip.
  The bank holds every CLIP row of the training clips with the chroma of the half second of music around its time
  (`rhythm.chroma_track`); each row of a clip takes the mean chroma of its k nearest bank rows of other clips. Their
  mean over the clip is the profile above, and the rows themselves, standardised and embedded, are interpolated to
  every token step and added too: what sounds now, not only the key. On SynthV2M the objects' colour shows the chord
  of each bar, and the nearest rows of other clips name the chord root for ~0.9 of rows. Train also fills
  `token_chroma` (K, V, 12), the mean chroma of the training music where each token was written; `generate(...,
  harmony_bias=w)` adds w x the correlation of each token's row with the track at its frame's time to its logit.
- `harmony > 0`: a small head on the pooled CLIP stream, trained against the true profile with a KL loss of that
  weight (0.45-0.65 key accuracy on val after the demo's 400 steps: too little data for it).
In training a fraction `harmony_teacher` of items feed the decoder the true profile (it learns what a profile means
from the start) and the rest the predicted one (so it learns to live with the predictor's errors); at inference the
prediction. The null condition of classifier-free guidance hides it.

Classifier-free guidance: in training a fraction `cond_dropout` of items get the null condition (memory and context
zeroed, `Conditioning.drop`); at inference logits = uncond + guidance * (cond - uncond).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline.model.decoder import DecoderConfig, MusicDecoder, delay_pattern, load_musicgen_decoder, undelay
from pipeline.model.fusion import Conditioning, FusionConfig, TemporalFusion, rows_at

N_CHROMA = 12
KEY_SHARPNESS = 20.0  # softmax scale of the key correlations (in [-1, 1]): a 0.1 lead is a 7x odds ratio


def _key_profiles() -> torch.Tensor:
    """(24, 12) the Krumhansl-Kessler major then minor profiles rotated to every tonic, each standardised."""
    from pipeline.metrics.rhythm import KK_MAJOR, KK_MINOR

    rows = [torch.roll(torch.tensor(p, dtype=torch.float32), t) for p in (KK_MAJOR, KK_MINOR) for t in range(12)]
    out = torch.stack(rows)
    return (out - out.mean(-1, keepdim=True)) / out.std(-1, keepdim=True)


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid rows: rows (B, T, D), mask (B, T) True = valid -> (B, D)."""
    valid = mask[..., None].to(rows.dtype)
    return (rows * valid).sum(1) / valid.sum(1).clamp(min=1.0)


PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    interpolate: bool = True  # add the video context interpolated to the token frame rate to the decoder input
    cond_dropout: float = 0.1  # fraction of training items with the null condition (classifier-free guidance)
    # training only: this fraction of the decoder's input tokens is replaced by random ones, so that it leans on the
    # condition more than on its own past (which at generation holds its own mistakes); 0 = off
    token_noise: float = 0.0
    frame_rate: float = 25.0  # token frames per second (set from the codec)
    pretrained: str = ""  # "" = from scratch | musicgen (decoder weights from train.pretrained_dir)
    harmony: float = 0.0  # weight of the pitch-class-profile loss; 0 = no harmony head (see the module docstring)
    harmony_knn: int = 0  # > 0: the profile is the mean of the k nearest training clips' instead (no head, no loss)
    harmony_tau: float = 0.05  # softmax temperature over the neighbours' cosine similarities
    harmony_bank: int = 0  # training clips in the neighbour bank (set by train)
    harmony_teacher: float = 0.5  # fraction of training items whose decoder gets the true profile, not the predicted
    harmony_into: str = "input"  # input: added to the decoder input at every step | memory: one more memory row
    # with harmony_knn: the bank holds every CLIP row of the training clips with the chroma of the music around its
    # time, each row of a clip retrieves its own neighbours, and the decoder also gets that harmony track at every step
    harmony_track: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model config: unknown key(s) {sorted(unknown)}")
        return cls(decoder=DecoderConfig(**data.pop("decoder", {})), fusion=FusionConfig(**data.pop("fusion", {})),
                   **data)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of preset `name`; `overrides` replace top-level fields or update the `decoder` / `fusion` dicts."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in overrides.items():
        if key in ("decoder", "fusion"):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return ModelConfig.from_dict(data)


class V2M(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.fusion.d_model != cfg.decoder.d_model:
            cfg = dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, d_model=cfg.decoder.d_model))
        if cfg.harmony_track and (not cfg.harmony_knn or cfg.harmony_into != "input"):
            raise ValueError("harmony_track needs harmony_knn > 0 and harmony_into: input")
        self.cfg = cfg
        self.fusion = TemporalFusion(cfg.fusion)
        self.decoder = MusicDecoder(cfg.decoder)
        self.ctx_proj = nn.Linear(cfg.decoder.d_model, cfg.decoder.d_model) if cfg.interpolate else None
        d = cfg.decoder.d_model
        if cfg.harmony_knn:
            self.register_buffer("bank_keys", torch.zeros(cfg.harmony_bank, cfg.fusion.clip_dim))
            self.register_buffer("bank_profiles", torch.zeros(cfg.harmony_bank, N_CHROMA))
            if cfg.harmony_track:  # bank row -> its training clip's index, so that a clip never retrieves itself
                self.register_buffer("bank_clips", torch.zeros(cfg.harmony_bank, dtype=torch.long))
                self.track_in = nn.Linear(N_CHROMA, d)
                # the mean chroma of the music at the frames where each token was written, per codebook: what each
                # token sounds like (set by train, `set_token_chroma`; all zero = unknown, `harmony_bias` is then 0)
                self.register_buffer("token_chroma", torch.zeros(cfg.decoder.num_codebooks, cfg.decoder.codebook_size,
                                                                 N_CHROMA))
        elif cfg.harmony:
            self.harmony_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, N_CHROMA))
        if cfg.harmony_knn or cfg.harmony:
            self.harmony_in = nn.Linear(N_CHROMA + 2 * N_CHROMA, d)
            self.register_buffer("key_profiles", _key_profiles(), persistent=False)

    @property
    def special(self) -> int:
        return self.decoder.special

    @property
    def uses_harmony(self) -> bool:
        return bool(self.cfg.harmony_knn or self.cfg.harmony)

    @torch.no_grad()
    def set_harmony_bank(self, clip_means: torch.Tensor, profiles: torch.Tensor,
                         clips: torch.Tensor | None = None) -> None:
        """Fill the neighbour bank: mean CLIP embeddings (N, Dc) of the training clips and their profiles (N, 12);
        with `harmony_track`, CLIP rows (N, Dc), the chroma around each row's time (N, 12) and the index of the
        training clip each row comes from, `clips` (N,)."""
        if tuple(clip_means.shape) != tuple(self.bank_keys.shape):
            raise ValueError(f"harmony bank: expected {tuple(self.bank_keys.shape)} embeddings, "
                             f"got {tuple(clip_means.shape)}")
        if self.cfg.harmony_track:
            if clips is None or tuple(clips.shape) != (self.bank_keys.shape[0],):
                raise ValueError(f"harmony bank: harmony_track needs the clip index of each of the "
                                 f"{self.bank_keys.shape[0]} rows")
            self.bank_clips.copy_(clips.long())
        self.bank_keys.copy_(F.normalize(clip_means.float(), dim=-1))
        self.bank_profiles.copy_(profiles.float())

    def set_token_chroma(self, codes: list[torch.Tensor], chroma: list[torch.Tensor]) -> None:
        """Fill `token_chroma` (K, V, 12) from training music: codes[i] (K, T_i) a clip's tokens and chroma[i]
        (T_i, 12) the music's chroma at each of its frames (`rhythm.frame_chroma`, rows summing to 1). Row (k, v) is
        the mean chroma over the frames where codebook k wrote token v; a token never written keeps a zero row."""
        if not self.cfg.harmony_track:
            raise ValueError("token chroma: only models with harmony_track have the table")
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
        self.token_chroma.copy_((total / count.clamp(min=1)[..., None]).float())

    def has_token_chroma(self) -> bool:
        return self.cfg.harmony_track and bool(self.token_chroma.abs().sum() > 0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; a checkpoint written before the token chroma table existed keeps this model's table (empty
        for a new model; the one train just filled when it resumes from such a checkpoint)."""
        if self.cfg.harmony_track and "token_chroma" not in state_dict:
            state_dict = {**state_dict, "token_chroma": self.token_chroma.clone()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _harmony_bias_rows(self, batch: dict, n_frames: int, weight: float) -> torch.Tensor:
        """(B, n_frames, K, V): weight x the Pearson correlation, over the 12 pitch classes, between the retrieved
        harmony track at each frame's time and each token's chroma (`token_chroma`, per codebook)."""
        track = self._knn_track(batch)  # (B, Tc, 12)
        seconds = (torch.arange(n_frames, device=track.device) / self.cfg.frame_rate)[None].expand(track.shape[0], -1)
        rows = rows_at(track, batch["clip_mask"], batch["clip_fps"], seconds)  # (B, n_frames, 12)

        def standard(x: torch.Tensor) -> torch.Tensor:
            return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp(min=1e-6)

        corr = torch.einsum("bfc,kvc->bfkv", standard(rows), standard(self.token_chroma)) / (N_CHROMA - 1)
        return weight * corr

    def _retrieve(self, query: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
        """Query rows (B, Q, Dc) -> (B, Q, 12): the softmax-weighted (at harmony_tau) mean profile of the harmony_knn
        bank rows nearest each query (cosine), leaving out the bank rows where excluded (B, N) is True. A query with
        nothing left to retrieve takes the bank's mean; an empty bank (an untrained model) gives flat profiles."""
        if not self.bank_keys.shape[0]:
            return query.new_full((*query.shape[:2], N_CHROMA), 1.0 / N_CHROMA).float()
        sims = F.normalize(query.float(), dim=-1) @ self.bank_keys.T  # (B, Q, N)
        if excluded is not None:
            sims = sims.masked_fill(excluded[:, None], float("-inf"))
        top, index = sims.topk(min(self.cfg.harmony_knn, sims.shape[-1]), dim=-1)
        weights = (top / self.cfg.harmony_tau).softmax(-1)  # (B, Q, k)
        out = (weights[..., None] * self.bank_profiles[index]).sum(-2)
        found = torch.isfinite(top).any(-1, keepdim=True)  # a bank of one clip has no neighbour for that clip
        return torch.where(found, out, self.bank_profiles.mean(0))

    def _knn_profile(self, batch: dict) -> torch.Tensor:
        """(B, 12): the retrieved profile for each item's mean CLIP embedding; an item never retrieves its own bank
        row (batch["bank_index"], -1 = not in the bank)."""
        own = batch.get("bank_index")
        excluded = None if own is None else own[:, None] == torch.arange(self.bank_keys.shape[0], device=own.device)
        return self._retrieve(_masked_mean(batch["clip"], batch["clip_mask"])[:, None], excluded)[:, 0]

    def _knn_track(self, batch: dict) -> torch.Tensor:
        """(B, Tc, 12): the retrieved chroma for every CLIP row (harmony_track), never from rows of the item's own
        clip (batch["bank_index"])."""
        own = batch.get("bank_index")
        return self._retrieve(batch["clip"], None if own is None else own[:, None] == self.bank_clips[None])

    def condition(self, batch: dict, keep: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of a batch (see `TemporalFusion.forward` for the keys); keep (B,) False = null condition.

        With the harmony head, `cond.harmony_logits` (B, 12) is its prediction and `cond.harmony` (B, d) the embedded
        profile the decoder gets: in training, batch["harmony"] (B, 12) (the true profiles) for a random fraction
        `harmony_teacher` of items, the (detached) prediction for the rest and at inference."""
        cond = self.fusion(batch["clip"], batch["clip_mask"], batch["clip_fps"], batch.get("flow"),
                           batch.get("flow_mask"), batch.get("flow_fps"), batch.get("text"), batch.get("text_mask"))
        track = None
        if self.cfg.harmony_track:
            track = self._knn_track(batch)
            profile = _masked_mean(track, batch["clip_mask"])
        elif self.cfg.harmony_knn:
            profile = self._knn_profile(batch)
        elif self.cfg.harmony:
            rows, mask = cond.streams[0][:2]  # the CLIP stream: what the scene looks like (flow rows outnumber it)
            cond.harmony_logits = self.harmony_head(_masked_mean(rows, mask))
            profile = cond.harmony_logits.detach().softmax(-1)
        if self.uses_harmony:
            truth = batch.get("harmony")
            if self.training and truth is not None and self.cfg.harmony_teacher > 0:
                teach = torch.rand(profile.shape[0], device=profile.device) < self.cfg.harmony_teacher
                profile = torch.where(teach[:, None], truth.to(profile), profile)
                if track is not None and batch.get("harmony_track") is not None:
                    track = torch.where(teach[:, None, None], batch["harmony_track"].to(track), track)
            cond.harmony = self.harmony_in(self._harmony_features(profile))
            if track is not None:  # standardised per row, like the profile: which pitch classes stand out now
                z = (track - track.mean(-1, keepdim=True)) / track.std(-1, keepdim=True).clamp(min=1e-6)
                cond.harmony_track = (self.track_in(z), batch["clip_mask"], batch["clip_fps"])
            if self.cfg.harmony_into == "memory":
                cond.memory = torch.cat([cond.memory, cond.harmony[:, None]], dim=1)
                cond.mask = torch.cat([cond.mask, cond.mask.new_ones(cond.mask.shape[0], 1)], dim=1)
                cond.harmony = None
        return cond if keep is None else cond.drop(keep)

    def _harmony_features(self, profile: torch.Tensor) -> torch.Tensor:
        """(B, 12) profile -> (B, 36): the profile standardised over its 12 bins (contrast, whatever its spread) and a
        distribution over the 24 keys, a softmax of its Krumhansl-Schmuckler correlations (x KEY_SHARPNESS). The
        profiles of parallel keys (C major, C minor) differ in a few per cent of their mass, too little for the
        decoder to act on from the profile alone; the key correlations make that difference explicit."""
        z = (profile - profile.mean(-1, keepdim=True)) / profile.std(-1, keepdim=True).clamp(min=1e-6)
        corr = z @ self.key_profiles.T / (N_CHROMA - 1)  # (B, 24) Pearson correlations
        return torch.cat([z, (KEY_SHARPNESS * corr).softmax(-1)], dim=-1)

    def harmony_loss(self, cond: Conditioning, truth: torch.Tensor) -> torch.Tensor:
        """KL(true profile || predicted), mean over items: truth (B, 12) rows summing to 1."""
        logp = cond.harmony_logits.float().log_softmax(-1)
        return (truth * (truth.clamp(min=1e-8).log() - logp)).sum(-1).mean()

    def _extra(self, cond: Conditioning, steps: torch.Tensor) -> torch.Tensor | None:
        """What is added to the decoder input at delayed steps (S,) -> (B, S, d): the interpolated context and the
        harmony embedding; None when there is neither."""
        out = None
        if self.ctx_proj is not None:
            seconds = (steps.float() / self.cfg.frame_rate)[None].expand(cond.memory.shape[0], -1)
            out = self.ctx_proj(cond.context_at(seconds))
        if cond.harmony is not None:
            h = cond.harmony[:, None].expand(-1, steps.shape[0], -1)
            if cond.harmony_track is not None:
                seconds = (steps.float() / self.cfg.frame_rate)[None].expand(h.shape[0], -1)
                h = h + rows_at(*cond.harmony_track, seconds)
            out = h if out is None else out + h
        return out

    def forward(self, batch: dict, keep: torch.Tensor | None = None, aux: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits. batch["codes"] (B, K, T) -> (logits (B, K, T + K - 1, card), targets same shape
        without the card axis, -100 where nothing is scored: delay padding and frames beyond code_mask (B, T)).
        `aux`, a dict, receives the auxiliary losses ("harmony" when the head is on and batch["harmony"] is given),
        computed on every item, null-conditioned ones included (their prediction is made before the drop)."""
        codes = batch["codes"]
        B, K, T = codes.shape
        targets = delay_pattern(codes, self.special)  # (B, K, S)
        bos = torch.full((B, K, 1), self.special, dtype=codes.dtype, device=codes.device)
        inputs = torch.cat([bos, targets[..., :-1]], dim=-1)  # step s sees steps < s
        if self.training and self.cfg.token_noise > 0:
            noisy = (torch.rand(inputs.shape, device=codes.device) < self.cfg.token_noise) & (inputs != self.special)
            inputs = torch.where(noisy, torch.randint_like(inputs, self.cfg.decoder.codebook_size), inputs)
        cond = self.condition(batch)
        if aux is not None and cond.harmony_logits is not None and batch.get("harmony") is not None:
            aux["harmony"] = self.harmony_loss(cond, batch["harmony"])
        cond = cond if keep is None else cond.drop(keep)
        steps = torch.arange(inputs.shape[-1], device=codes.device)
        logits = self.decoder(inputs, cond.memory, cond.mask, self._extra(cond, steps))
        valid = batch.get("code_mask", torch.ones(B, T, dtype=torch.bool, device=codes.device))
        valid = delay_pattern(valid[:, None].expand(B, K, T).long(), 0).bool()  # (B, K, S)
        targets = targets.masked_fill(~valid | (targets == self.special), -100)
        return logits, targets

    def frame_losses(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy per (item, codebook, frame) in frame order -> (loss (B, K, T), scored (B, K, T) bool)."""
        logits, targets = self(batch, keep)
        loss = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), ignore_index=-100, reduction="none")
        loss = undelay(loss.view(targets.shape))
        return loss, undelay(targets) != -100

    @torch.no_grad()
    def guided_logits(self, batch: dict, guidance: float) -> torch.Tensor:
        """Teacher-forced logits with classifier-free guidance: uncond + guidance * (cond - uncond)."""
        B = batch["codes"].shape[0]
        both = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
        keep = torch.arange(2 * B, device=batch["codes"].device) < B
        logits, _ = self(both, keep)
        cond, uncond = logits[:B], logits[B:]
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def generate(self, batch: dict, n_frames: int, guidance: float = 3.0, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, use_cache: bool = True,
                 prompt: torch.Tensor | None = None, plausibility: float = 0.0, harmony_bias: float = 0.0
                 ) -> torch.Tensor:
        """Sample codes (B, K, n_frames) for the conditioning in `batch` (no "codes" needed), with classifier-free
        guidance (guidance 1 = conditional only, no doubled batch) and a KV cache (`use_cache=False` recomputes the
        whole prefix each step: slow, for tests). temperature 0 = greedy.

        `prompt` (B, K, P) codes, P <= n_frames: the first P frames are these (a continuation, e.g. the previous
        window's last frames of a long video) and the model writes the rest after them. With the delay pattern the
        prompt fills delayed steps 0 .. P-1 whole and the first cells of the next K - 1 steps; with the cache the
        prompt's steps go through the decoder in one pass (prefill), so a prompt costs about one step.

        `plausibility` (with guidance): only tokens whose conditional probability is at least this fraction of the
        conditional model's first choice are sampled. `harmony_bias` (models with harmony_track and a token chroma
        table): the final logits of the token for frame f get harmony_bias x the correlation between what the
        token sounds like (`token_chroma`) and the retrieved harmony track at f's time
        (docs/studies/harmony-bias.md)."""
        B = batch["clip"].shape[0]
        K, device = self.cfg.decoder.num_codebooks, batch["clip"].device
        P = 0 if prompt is None else prompt.shape[-1]
        if not 0.0 <= plausibility <= 1.0:
            raise ValueError(f"plausibility must be in [0, 1] (a fraction of the first choice's probability), "
                             f"got {plausibility:g}")
        if harmony_bias < 0 or (harmony_bias > 0 and not self.cfg.harmony_track):
            raise ValueError(f"harmony_bias must be >= 0 and needs a model with harmony_track, got {harmony_bias:g}"
                             f" (harmony_track: {self.cfg.harmony_track})")
        if P > n_frames or (prompt is not None and tuple(prompt.shape[:2]) != (B, K)):
            raise ValueError(f"prompt must be (B={B}, K={K}, P <= {n_frames}), got {tuple(prompt.shape)}")
        bias = self._harmony_bias_rows(batch, n_frames, harmony_bias) if harmony_bias > 0 else None
        cfg_on = guidance != 1.0
        if cfg_on:
            batch = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
            cond = self.condition(batch, torch.arange(2 * B, device=device) < B)
        else:
            cond = self.condition(batch)
        S = n_frames + K - 1
        seq = torch.full((cond.memory.shape[0], K, S + 1), self.special, dtype=torch.long, device=device)
        forced = torch.zeros(K, S + 1, dtype=torch.bool, device=device)  # cells of seq fixed by the prompt
        if P:
            delayed = delay_pattern(prompt.to(device=device, dtype=torch.long), self.special)  # (B, K, P + K - 1)
            known = delay_pattern(torch.ones(1, K, P, dtype=torch.long, device=device), 0)[0].bool()
            forced[:, 1 : P + K] = known
            seq[:, :, 1 : P + K] = torch.where(known, torch.cat([delayed, delayed]) if cfg_on else delayed,
                                               seq[:, :, 1 : P + K])
        cache = self.decoder.new_cache() if use_cache else None
        if P and use_cache:  # prefill: steps 0 .. P-1 are all known, their inputs are positions 0 .. P-1
            steps = torch.arange(P, device=device)
            self.decoder(seq[..., :P], cond.memory, cond.mask, self._extra(cond, steps), cache=cache, offset=0)
        for s in range(P, S):  # with or without the cache, the same draws in the same order
            start = s if use_cache else 0
            steps = torch.arange(start, s + 1, device=device)
            logits = self.decoder(seq[..., start : s + 1], cond.memory, cond.mask, self._extra(cond, steps),
                                  cache=cache, offset=start)[:, :, -1].float()  # (B', K, card)
            if cfg_on:
                cond_logits = logits[:B]
                logits = logits[B:] + guidance * (cond_logits - logits[B:])
                if plausibility > 0:
                    floor = cond_logits.max(-1, keepdim=True).values + math.log(plausibility)
                    logits = logits.masked_fill(cond_logits < floor, float("-inf"))
            k = torch.arange(K, device=device)
            if bias is not None:  # codebook k writes frame s - k at step s
                frame = (s - k).clamp(0, n_frames - 1)
                logits = logits + bias[:, frame, k]  # (B, K, V)
            nxt = _sample(logits, temperature, top_k, generator)  # (B, K)
            in_range = (s - k >= 0) & (s - k < n_frames)  # the delay pattern's special cells stay special
            nxt = torch.where(in_range[None], nxt, torch.full_like(nxt, self.special))
            nxt = torch.cat([nxt, nxt]) if cfg_on else nxt
            seq[:, :, s + 1] = torch.where(forced[None, :, s + 1], seq[:, :, s + 1], nxt)
        return undelay(seq[:B, :, 1:])


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, K, V) -> tokens (B, K)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).flatten(0, 1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])


def create_model(cfg: ModelConfig, pretrained_dir: str | Path = "") -> V2M:
    """Build V2M; the `musicgen` preset loads the MusicGen decoder weights from `pretrained_dir` (required)."""
    model = V2M(cfg)
    if cfg.pretrained == "musicgen":
        if not pretrained_dir:
            raise FileNotFoundError(
                "the musicgen-small preset needs MusicGen-small weights: download facebook/musicgen-small on a "
                "machine with network access (`huggingface-cli download facebook/musicgen-small --local-dir DIR`), "
                "copy DIR here and set train.pretrained_dir: DIR in params.yaml")
        load_musicgen_decoder(model.decoder, pretrained_dir)
    elif cfg.pretrained:
        raise ValueError(f"model.pretrained: unknown {cfg.pretrained!r} (use '' or 'musicgen')")
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
