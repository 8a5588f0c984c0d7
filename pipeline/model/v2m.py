"""V2M: the conditioner (fusion.TemporalFusion) + the fuser choice + the decoder (decoder.MusicDecoder), and the preset
registry (`list_presets`, `load_preset`, `create_model`), open_clip style: architectures are small YAML files in
pipeline/model/presets/.

How the video enters the decoder (audiocraft's fuser split):
- cross-attention, always: every decoder layer attends to the memory (B, M, d);
- `interpolate: true` in addition: the fused streams are interpolated to the time of every token step (step s of the
  delayed sequence writes frame s of codebook 0, at s / frame_rate seconds) and added to the decoder input. This is
  audiocraft's `input_interpolate` fuser (and DyViM's), and it gives the decoder the motion *at that instant* without
  having to learn where to look.

Harmony (docs/studies/harmony.md): the music's pitch-class profile (12 values summing to 1) is added to the decoder
input at every step, embedded together with its correlations to the 24 major/minor key templates
(`harmony.harmony_features`). Where it comes from:
- `harmony_knn: k` (the embedded default): retrieved by the HarmonyBank (pipeline/model/harmony.py), the component V2M
  receives at construction (`V2M(cfg, harmony=bank)`; an empty one of the configured size when none is given, for a
  checkpoint to fill): the k training clips whose mean CLIP embedding is nearest. Train fills it (`HarmonyBank.fill`);
  in training a clip never retrieves itself (batch["bank_index"]).
- `harmony_track: true` (with harmony_knn; the embedded default): the bank retrieves per CLIP row, the chroma of what
  sounds at that moment; those rows, standardised and embedded, are interpolated to every token step and added too.
  `generate(..., harmony_bias=w)` adds w x the correlation of each token's chroma (the bank's token chroma table) with
  the track at its frame's time to its logit.
- `harmony > 0`: a small head on the pooled CLIP stream, trained against the true profile with a KL loss of that
  weight (0.45-0.65 key accuracy on val after the demo's 400 steps: too little data for it).
Timbre (docs/baselines.md, "Timbre"): with `scene_dim` the model reads the scene stream (batch["scene"], the
edge-orientation spectra of pipeline/encoders/scene.py: which shapes the scene shows, SynthV2M's cue for the
instrument). Its mean and spread over the clip, standardised by the training clips', go through a small MLP to a bias
on every logit (`scene_prior`, zero until learned, off in the null condition), as the text system's caption does with
its prior. With `timbre_knn: k` the harmony bias's token chroma table is counted over the music of the k training
clips whose scenes are nearest (`HarmonyBank.scene_table`): the chord is pushed with the tokens of the scene's timbre.

In training a fraction `harmony_teacher` of items feed the decoder the true profile (it learns what a profile means
from the start) and the rest the predicted one (so it learns to live with the predictor's errors); at inference the
prediction. The null condition of classifier-free guidance hides it.

Loss: `forward` returns (logits, loss, aux), the loss computed there only (`token_loss`, + the head's KL), as nanoGPT's
model does; `frame_losses` is the same cross-entropy per token frame, for validation.

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
from pipeline.model.fusion import Conditioning, FusionConfig, make_fusion, rows_at
from pipeline.model.harmony import N_CHROMA, HarmonyBank, harmony_features, key_profiles, masked_mean, standardise

PRESETS_DIR = Path(__file__).parent / "presets"
LATER_FIELDS = ("text_prior", "timbres", "scene_dim", "timbre_knn", "timbre_bank")
SCENE_HIDDEN = 64  # the scene prior's hidden width  # ModelConfig fields saved only when they differ from the default


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
    harmony_knn: int = 0  # > 0: the profile is retrieved from the k nearest training clips instead (HarmonyBank)
    harmony_tau: float = 0.05  # softmax temperature over the neighbours' cosine similarities
    harmony_bank: int = 0  # HarmonyBank rows: training clips, or their CLIP rows with harmony_track (set by train)
    harmony_teacher: float = 0.5  # fraction of training items whose decoder gets the true profile, not the predicted
    harmony_into: str = "input"  # input: added to the decoder input at every step | memory: one more memory row
    # with harmony_knn: the bank holds every CLIP row of the training clips with the chroma of the music around its
    # time, each row of a clip retrieves its own neighbours, and the decoder also gets that harmony track at every step
    harmony_track: bool = False
    # with fusion.text_dim: the caption also adds a learned bias to every logit, a prior over the tokens it names
    # (text steering, docs/baselines.md); written to a checkpoint's config only when set
    text_prior: bool = False
    # with harmony_track: the instruments of the bank's per-instrument token chroma tables (set by train for the text
    # system from the SynthV2M labels); a prompt that names one of them takes its table for the harmony bias
    timbres: tuple[str, ...] = ()
    # > 0: the model reads the scene stream (batch["scene"] (B, Tc, scene_dim), pipeline/encoders/scene.py): its mean
    # and spread over the clip, standardised by the training clips' (buffers scene_mean, scene_std), go through a small
    # MLP to a bias on every logit, a prior over the tokens of the timbre the scene shows (docs/baselines.md, "Timbre")
    scene_dim: int = 0
    # with scene_dim and harmony_track: the harmony bias's token chroma table is counted over the music of the
    # timbre_knn training clips whose scenes are nearest (HarmonyBank.scene_table); 0 = the table of all clips
    timbre_knn: int = 0
    timbre_bank: tuple[int, int] = (0, 0)  # (training clips, their most token frames): set by train

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in LATER_FIELDS:  # fields added later are saved only when set: older checkpoints keep their bytes
            if data[name] == getattr(ModelConfig, name):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model config: unknown key(s) {sorted(unknown)}")
        for name in ("timbres", "timbre_bank"):
            if name in data:
                data[name] = tuple(data[name])
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
    def __init__(self, cfg: ModelConfig, harmony: HarmonyBank | None = None):
        """The model of `cfg`; with cfg.harmony_knn it retrieves the harmony from `harmony` (a HarmonyBank; an empty
        one of the configured size when None, for a checkpoint's buffers to fill)."""
        super().__init__()
        if cfg.fusion.d_model != cfg.decoder.d_model:
            cfg = dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, d_model=cfg.decoder.d_model))
        if cfg.harmony_track and (not cfg.harmony_knn or cfg.harmony_into != "input"):
            raise ValueError("harmony_track needs harmony_knn > 0 and harmony_into: input")
        if cfg.timbres and not cfg.harmony_track:
            raise ValueError("timbres (per-instrument token chroma tables) need harmony_track")
        if cfg.timbre_knn and not (cfg.scene_dim and cfg.harmony_track):
            raise ValueError("timbre_knn (token chroma tables of the nearest scenes) needs scene_dim and harmony_track")
        if cfg.harmony_knn and harmony is None:
            harmony = HarmonyBank.from_config(cfg)
        if harmony is not None:
            got = (harmony.size, harmony.key_dim, harmony.k, harmony.tau, harmony.track, harmony.timbre_count,
                   harmony.scene_k)
            want = (cfg.harmony_bank, cfg.fusion.clip_dim, cfg.harmony_knn, cfg.harmony_tau, cfg.harmony_track,
                    len(cfg.timbres), cfg.timbre_knn)
            if got != want:
                raise ValueError(f"harmony bank (size, key_dim, k, tau, track, timbre tables, scene k) {got} does not "
                                 f"match the model config's (harmony_bank, fusion.clip_dim, harmony_knn, harmony_tau, "
                                 f"harmony_track, len(timbres), timbre_knn) {want}")
        self.cfg = cfg
        # registered first, so that its buffers come first in the state dict as they did when they were V2M's own
        self.harmony = harmony
        self.fusion = make_fusion(cfg.fusion)
        self.decoder = MusicDecoder(cfg.decoder)
        self.ctx_proj = nn.Linear(cfg.decoder.d_model, cfg.decoder.d_model) if cfg.interpolate else None
        d = cfg.decoder.d_model
        if cfg.text_prior:
            if not cfg.fusion.text_dim:
                raise ValueError("text_prior needs a model with text (fusion.text_dim > 0; train.text: true)")
            dec = cfg.decoder
            self.text_prior = nn.Linear(d, dec.num_codebooks * dec.codebook_size)
            nn.init.zeros_(self.text_prior.weight), nn.init.zeros_(self.text_prior.bias)  # no bias until learned
        if cfg.harmony_track:
            self.track_in = nn.Linear(N_CHROMA, d)
        elif cfg.harmony and not cfg.harmony_knn:
            self.harmony_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, N_CHROMA))
        if cfg.harmony_knn or cfg.harmony:
            self.harmony_in = nn.Linear(N_CHROMA + 2 * N_CHROMA, d)
            self.register_buffer("key_profiles", key_profiles(), persistent=False)
        if cfg.scene_dim:  # built last: the other modules' initial weights are those of a model without it
            dec = cfg.decoder
            self.register_buffer("scene_mean", torch.zeros(2 * cfg.scene_dim))
            self.register_buffer("scene_std", torch.ones(2 * cfg.scene_dim))
            self.scene_prior = nn.Sequential(nn.Linear(2 * cfg.scene_dim, SCENE_HIDDEN), nn.GELU(),
                                             nn.Linear(SCENE_HIDDEN, dec.num_codebooks * dec.codebook_size))
            nn.init.zeros_(self.scene_prior[-1].weight), nn.init.zeros_(self.scene_prior[-1].bias)  # none until learned
        if harmony is not None:
            # the bank's buffers keep the names they had as V2M's own (bank_keys, bank_profiles, bank_clips,
            # token_chroma; not harmony.bank_keys ...): older checkpoints load as they are, and the same weights
            # still save to the same bytes
            self.register_state_dict_post_hook(_bank_names_out)
            self.register_load_state_dict_pre_hook(_bank_names_in)

    @property
    def special(self) -> int:
        return self.decoder.special

    @property
    def uses_harmony(self) -> bool:
        return bool(self.cfg.harmony_knn or self.cfg.harmony)

    def has_token_chroma(self) -> bool:
        """Whether the harmony bank has a token chroma table, which `generate(..., harmony_bias=w)` needs."""
        return self.harmony is not None and self.harmony.has_token_chroma()

    @torch.no_grad()
    def fit_scene(self, pooled: torch.Tensor) -> None:
        """Set the scene standardisation from the training clips' pooled scene rows (N, 2 scene_dim)
        (`scene_summary`): their mean and (population) standard deviation per feature."""
        self.scene_mean.copy_(pooled.double().mean(0).float())
        self.scene_std.copy_(pooled.double().std(0, correction=0).clamp(min=1e-6).float())

    def _scene_bias(self, batch: dict) -> torch.Tensor:
        """(B, K, V): the scene prior's logit bias for the batch's scene rows."""
        if batch.get("scene") is None:
            raise ValueError("this model reads the scene stream (scene_dim > 0): the batch needs 'scene' (B, Tc, "
                             f"{self.cfg.scene_dim}) and 'scene_mask' (`v2m embed` writes it; features/scene)")
        dec = self.cfg.decoder
        return self.scene_prior(self._scene_key(batch)).view(-1, dec.num_codebooks, dec.codebook_size)

    def _scene_key(self, batch: dict) -> torch.Tensor:
        """(B, 2 scene_dim): the batch's scene summary, standardised by the training clips' statistics."""
        return (scene_summary(batch["scene"], batch["scene_mask"]) - self.scene_mean) / self.scene_std

    def _harmony_bias(self, batch: dict, n_frames: int, weight: float, mode_guard: float = 0.0) -> torch.Tensor:
        """(B, n_frames, K, V): weight x the correlation between the retrieved harmony track at each frame's time and
        each token's chroma (`HarmonyBank.token_correlation`), plus mode_guard x the token's mode penalty under the
        retrieved profile (`HarmonyBank.mode_penalty`, the same at every frame). With timbre_knn (and no prompt's
        timbre table), what each token sounds like is counted over the music of the nearest scenes
        (`HarmonyBank.scene_table`)."""
        profile, track = self.harmony(batch["clip"], batch["clip_mask"], batch.get("bank_index"))  # (B, Tc, 12)
        seconds = (torch.arange(n_frames, device=track.device) / self.cfg.frame_rate)[None].expand(track.shape[0], -1)
        rows = rows_at(track, batch["clip_mask"], batch["clip_fps"], seconds)  # (B, n_frames, 12)
        timbre, table = batch.get("timbre"), None
        if self.cfg.timbre_knn and (timbre is None or not self.harmony.timbre_count):  # the nearest scenes' music
            table = self.harmony.scene_table(self._scene_key(batch))
        bias = weight * self.harmony.token_correlation(rows, timbre, table)
        if mode_guard:
            bias = bias + mode_guard * self.harmony.mode_penalty(profile, timbre, table)[:, None]
        return bias

    def condition(self, batch: dict, keep: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of a batch (see `TemporalFusion.forward` for the keys); keep (B,) False = null condition.

        With the harmony head, `cond.harmony_logits` (B, 12) is its prediction and `cond.harmony` (B, d) the embedded
        profile the decoder gets: in training, batch["harmony"] (B, 12) (the true profiles) for a random fraction
        `harmony_teacher` of items, the (detached) prediction for the rest and at inference."""
        extra = {}
        if self.cfg.fusion.mode == "long_short":  # the whole video's CLIP rows, when the batch is one window of it
            extra = {"long_clip": batch.get("long_clip"), "long_mask": batch.get("long_clip_mask")}
        elif self.cfg.fusion.mode == "spatial":  # the CLIP patch embeddings (`v2m embed --streams patch`)
            extra = {k: batch.get(k) for k in ("patch", "patch_mask", "patch_fps")}
        if batch.get("text_force") is not None:
            extra["text_force"] = batch["text_force"]
        cond = self.fusion(batch["clip"], batch["clip_mask"], batch["clip_fps"], batch.get("flow"),
                           batch.get("flow_mask"), batch.get("flow_fps"), batch.get("text"), batch.get("text_mask"),
                           **extra)
        if self.cfg.scene_dim:
            cond.scene = self._scene_bias(batch)
        track = None
        if self.harmony is not None:  # the retrieved profile (B, 12), and with harmony_track the track (B, Tc, 12)
            profile, track = self.harmony(batch["clip"], batch["clip_mask"], batch.get("bank_index"))
        elif self.cfg.harmony:
            rows, mask = cond.streams[0][:2]  # the CLIP stream: what the scene looks like (flow rows outnumber it)
            cond.harmony_logits = self.harmony_head(masked_mean(rows, mask))
            profile = cond.harmony_logits.detach().softmax(-1)
        if self.uses_harmony:
            truth = batch.get("harmony")
            if self.training and truth is not None and self.cfg.harmony_teacher > 0:
                teach = torch.rand(profile.shape[0], device=profile.device) < self.cfg.harmony_teacher
                profile = torch.where(teach[:, None], truth.to(profile), profile)
                if track is not None and batch.get("harmony_track") is not None:
                    track = torch.where(teach[:, None, None], batch["harmony_track"].to(track), track)
            cond.harmony = self.harmony_in(harmony_features(profile, self.key_profiles))
            if track is not None:  # standardised per row, like the profile: which pitch classes stand out now
                cond.harmony_track = (self.track_in(standardise(track)), batch["clip_mask"], batch["clip_fps"])
            if self.cfg.harmony_into == "memory":
                cond.memory = torch.cat([cond.memory, cond.harmony[:, None]], dim=1)
                cond.mask = torch.cat([cond.mask, cond.mask.new_ones(cond.mask.shape[0], 1)], dim=1)
                cond.harmony = None
        return cond if keep is None else cond.drop(keep)

    def harmony_loss(self, cond: Conditioning, truth: torch.Tensor) -> torch.Tensor:
        """KL(true profile || predicted), mean over items: truth (B, 12) rows summing to 1."""
        logp = cond.harmony_logits.float().log_softmax(-1)
        return (truth * (truth.clamp(min=1e-8).log() - logp)).sum(-1).mean()

    def _text_bias(self, cond: Conditioning) -> torch.Tensor | None:
        """(B, K, 1, V): the text prior's logit bias of each item's caption (zero where it has none or is dropped);
        None for a model without text_prior."""
        if not self.cfg.text_prior or cond.text is None:
            return None
        row, mask = cond.text
        dec = self.cfg.decoder
        bias = self.text_prior(row) * mask[:, None].to(row.dtype)
        return bias.view(-1, dec.num_codebooks, 1, dec.codebook_size)

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

    def forward(self, batch: dict, keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher-forced logits and the training loss (the one place it is computed).

        batch["codes"] (B, K, T); keep (B,) False = null condition. Returns logits (B, K, S, card) over the delayed
        steps S = T + K - 1; loss, the mean cross-entropy of the scored tokens (`token_loss`; delay padding and frames
        beyond batch["code_mask"] (B, T) are not scored) + cfg.harmony x the harmony head's KL; and `aux`, its parts:
        "tokens", the cross-entropy, and with the head and batch["harmony"], "harmony", the KL (on every item,
        null-conditioned ones included: their prediction is made before the drop)."""
        logits, targets, aux = self._teacher_forced(batch, keep)
        aux["tokens"] = token_loss(logits, targets)
        loss = aux["tokens"] + self.cfg.harmony * aux["harmony"] if "harmony" in aux else aux["tokens"]
        return logits, loss, aux

    def frame_losses(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_loss` per (item, codebook, frame), in frame order -> (loss (B, K, T), scored (B, K, T) bool)."""
        logits, targets, _ = self._teacher_forced(batch, keep)
        loss = undelay(token_loss(logits, targets, reduction="none").view(targets.shape))
        return loss, undelay(targets) != -100

    def _teacher_forced(self, batch: dict, keep: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """-> logits (B, K, S, card), targets (B, K, S) (the delayed codes, -100 where nothing is scored) and the
        harmony head's KL as aux["harmony"] (with the head and batch["harmony"])."""
        codes = batch["codes"]
        B, K, T = codes.shape
        targets = delay_pattern(codes, self.special)  # (B, K, S)
        bos = torch.full((B, K, 1), self.special, dtype=codes.dtype, device=codes.device)
        inputs = torch.cat([bos, targets[..., :-1]], dim=-1)  # step s sees steps < s
        if self.training and self.cfg.token_noise > 0:
            noisy = (torch.rand(inputs.shape, device=codes.device) < self.cfg.token_noise) & (inputs != self.special)
            inputs = torch.where(noisy, torch.randint_like(inputs, self.cfg.decoder.codebook_size), inputs)
        cond = self.condition(batch)
        aux = {}
        if cond.harmony_logits is not None and batch.get("harmony") is not None:
            aux["harmony"] = self.harmony_loss(cond, batch["harmony"])
        cond = cond if keep is None else cond.drop(keep)
        steps = torch.arange(inputs.shape[-1], device=codes.device)
        logits = self.decoder(inputs, cond.memory, cond.mask, self._extra(cond, steps))
        text_bias = self._text_bias(cond)
        if text_bias is not None:
            logits = logits + text_bias
        if cond.scene is not None:
            logits = logits + cond.scene[:, :, None]
        valid = batch.get("code_mask", torch.ones(B, T, dtype=torch.bool, device=codes.device))
        valid = delay_pattern(valid[:, None].expand(B, K, T).long(), 0).bool()  # (B, K, S)
        return logits, targets.masked_fill(~valid | (targets == self.special), -100), aux

    @torch.no_grad()
    def guided_logits(self, batch: dict, guidance: float) -> torch.Tensor:
        """Teacher-forced logits with classifier-free guidance: uncond + guidance * (cond - uncond)."""
        B = batch["codes"].shape[0]
        both = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
        keep = torch.arange(2 * B, device=batch["codes"].device) < B
        logits, _, _ = self._teacher_forced(both, keep)
        cond, uncond = logits[:B], logits[B:]
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def generate(self, batch: dict, n_frames: int, guidance: float = 3.0, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, use_cache: bool = True,
                 prompt: torch.Tensor | None = None, plausibility: float = 0.0, harmony_bias: float = 0.0,
                 mode_guard: float = 0.0) -> torch.Tensor:
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
        token sounds like (the bank's `token_chroma`) and the retrieved harmony track at f's time
        (docs/studies/harmony-bias.md); batch["timbre"] (B,), with a bank that has timbre tables: each item's index
        into `cfg.timbres`, whose table replaces the table of all clips (-1 keeps it; `inference.prompt_timbre`).
        `mode_guard` (the same models): the logits also get mode_guard x each token's mode penalty, how much more it
        sounds the parallel key of the retrieved key than the key (`HarmonyBank.mode_penalty`, <= 0)."""
        B = batch["clip"].shape[0]
        K, device = self.cfg.decoder.num_codebooks, batch["clip"].device
        P = 0 if prompt is None else prompt.shape[-1]
        if not 0.0 <= plausibility <= 1.0:
            raise ValueError(f"plausibility must be in [0, 1] (a fraction of the first choice's probability), "
                             f"got {plausibility:g}")
        if harmony_bias < 0 or (harmony_bias > 0 and not self.cfg.harmony_track):
            raise ValueError(f"harmony_bias must be >= 0 and needs a model with harmony_track, got {harmony_bias:g}"
                             f" (harmony_track: {self.cfg.harmony_track})")
        if mode_guard < 0 or (mode_guard > 0 and not self.cfg.harmony_track):
            raise ValueError(f"mode_guard must be >= 0 and needs a model with harmony_track, got {mode_guard:g}"
                             f" (harmony_track: {self.cfg.harmony_track})")
        if P > n_frames or (prompt is not None and tuple(prompt.shape[:2]) != (B, K)):
            raise ValueError(f"prompt must be (B={B}, K={K}, P <= {n_frames}), got {tuple(prompt.shape)}")
        bias = self._harmony_bias(batch, n_frames, harmony_bias, mode_guard) if harmony_bias or mode_guard else None
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
        text_bias = self._text_bias(cond)  # (B', K, 1, V) or None
        text_bias = None if text_bias is None else text_bias[:, :, 0].float()
        if cond.scene is not None:  # the scene prior: like the text prior, zero in the null condition's half
            text_bias = cond.scene.float() if text_bias is None else text_bias + cond.scene.float()
        cache = self.decoder.new_cache() if use_cache else None
        if P and use_cache:  # prefill: steps 0 .. P-1 are all known, their inputs are positions 0 .. P-1
            steps = torch.arange(P, device=device)
            self.decoder(seq[..., :P], cond.memory, cond.mask, self._extra(cond, steps), cache=cache, offset=0)
        for s in range(P, S):  # with or without the cache, the same draws in the same order
            start = s if use_cache else 0
            steps = torch.arange(start, s + 1, device=device)
            logits = self.decoder(seq[..., start : s + 1], cond.memory, cond.mask, self._extra(cond, steps),
                                  cache=cache, offset=start)[:, :, -1].float()  # (B', K, card)
            if text_bias is not None:
                logits = logits + text_bias
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


def scene_summary(scene: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scene rows (B, T, D) with mask (B, T) -> (B, 2 D): each feature's mean and standard deviation over the valid
    rows (what shapes the clip shows, and how much that changes)."""
    m = mask[..., None].to(scene.dtype)
    n = m.sum(1).clamp(min=1)
    mean = (scene * m).sum(1) / n
    var = (((scene - mean[:, None]) ** 2) * m).sum(1) / n
    return torch.cat([mean, var.sqrt()], dim=-1)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, K, S, card) against targets (B, K, S), in float32; targets -100 are not scored.
    reduction "mean": over the scored tokens; "none": (B * K * S,)."""
    return F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


def _bank_names_out(module: V2M, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the harmony bank's buffers under V2M's own prefix (harmony.bank_keys -> bank_keys), in
    place and in order; the bank's metadata entry goes too, so that the saved bytes are the same as before."""
    inner = prefix + "harmony."
    renamed = [(prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(renamed)
    getattr(state_dict, "_metadata", {}).pop(inner[:-1], None)


def _bank_names_in(module: V2M, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook, the inverse of `_bank_names_out`. A checkpoint written before the token chroma table
    existed keeps this model's table (empty for a new model; the one train just filled when it resumes from such a
    checkpoint)."""
    for name, buffer in module.harmony.named_buffers():
        old, new = prefix + name, prefix + "harmony." + name
        if old in state_dict:
            state_dict[new] = state_dict.pop(old)
        elif name == "token_chroma" and new not in state_dict:
            state_dict[new] = buffer.clone()


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


def create_model(cfg: ModelConfig, pretrained_dir: str | Path = "", harmony: HarmonyBank | None = None) -> V2M:
    """Build V2M (with the harmony bank `harmony`, see V2M); the `musicgen` preset loads the MusicGen decoder weights
    from `pretrained_dir` (required)."""
    model = V2M(cfg, harmony)
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
