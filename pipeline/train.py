"""train: data/features/{clip,flow} + data/tokens/{codec} (+ data/music) -> models/{system}/v2m.pt,
metrics/train/{system}.json and loss curves (CSV for `dvc plots`). Params: base, train (model presets in
pipeline/model/presets/).

Systems (`SYSTEMS`): `full` (CLIP + flow) and `no_motion` (CLIP only: `fusion.use_motion: false`), the ablation;
dvc.yaml's train stage trains both. The ablation group (`make ablations`, docs/baselines.md) adds `no_clip` (motion
only, no harmony bank: it retrieves by CLIP), `vidmuse` (the VidMuse-style baseline: CLIP only through the
long-short-term fusion, `ablations.vidmuse`, no harmony bank), `spatial` (the spatial-fusion ablation: full with
patch-level CLIP and flow tokens, `fusion.mode: spatial`; it reads the patch stream, `--patches DIR`) and, with
`--fraction P`, the full system on P per cent of the train split (`fraction_ids`: the first P per cent of a fixed
order, so 25 % is inside 50 %).

Training reads only cached features and tokens by id (no video or audio is decoded; pipeline/dataset.py), with
splits, captions and beat times from the ingest manifest. An id missing from any store is left out, and the count is
logged.

Harmony (`train.harmony_knn`, `train.harmony_track`, `train.harmony`; pipeline/model/harmony.py): the pitch-class
profile of every training clip's music is computed from `tokenize.music_dir` (the audio the tokens came from) as the
target, and with `harmony_knn` train builds the HarmonyBank of the training clips and gives it to the model, whose
checkpoint keeps it.

Steps, top to bottom: `setup_distributed` (rank, device, threads), `check_settings`, a `Trainer` (data, harmony bank,
model, optimizer, EMA), `resume` from last.pt, then per step `train_step` (`get_batch` -> forward, which returns the
loss -> backward -> clip -> AdamW -> EMA), at every checkpoint `evaluate` and `save_checkpoint`, at the end `select`
and `export`.

Reproducible and resumable: the batch and the condition-dropout draws of step n are a function of (seed, n) only, and
a checkpoint (config, step, model, optimizer, EMA, RNG state, curves) is written atomically every `train.ckpt_every`
steps, so a rerun after a kill (even SIGKILL) resumes and ends at the same step with the same weights. A checkpoint
made under other params or data is not resumed from. Under torchrun the model is wrapped in DDP (gloo on CPU, NCCL
on GPU) and each process takes its slice of the global batch, so the curve matches one process with the whole batch.

Validation, at every checkpoint: `val_loss` (all token frames), `onset_val_loss` (frames within 40 ms of a true beat,
where motion matters; the overall loss is dominated by timbre and key) and `val_beat_f1` (a few validation clips
generated, decoded by the codec and beat-tracked; needs the codec from pipeline.codecs). v2m.pt holds the final
weights (`train.select: last`, the default) or, with `select: val_beat_f1`, the checkpoint with the best val_beat_f1
(kept in best.pt as training goes); metrics report that checkpoint's row, with `steps` (trained) and `selected_step`.
Validation-only settings (VALIDATION_ONLY) are not part of the checkpoint's fingerprint: changing them resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import codecs
from pipeline.config import Params, TrainConfig, VidMuseConfig, fraction_size, load_params, to_dict
from pipeline.dataset import add_harmony, collate, load_dataset, load_swaps
from pipeline.encoders.text import TEXT_DIM, caption_embeddings
from pipeline.model import V2M, HarmonyBank, ModelConfig, create_model, load_preset, num_params, scene_summary
from pipeline.runtime import cores_per_process, dist_env, local_rank, resolve_device
from pipeline.shards import (
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    params_hash,
    stable_hash,
)

log = logging.getLogger(__name__)

# system -> what it changes in the preset's model config (docs/baselines.md)
SYSTEMS: dict[str, dict] = {
    "full": {},
    "no_motion": {"fusion": {"use_motion": False}},
    # no_clip sees no scene at all (nor its shapes: no scene stream); the VidMuse-style baseline is its own design
    "no_clip": {"fusion": {"use_clip": False, "direction": "none"}, "harmony_knn": 0, "harmony_track": False,
                "scene_dim": 0},
    "vidmuse": {"fusion": {"use_motion": False, "mode": "long_short"}, "harmony_knn": 0, "harmony_track": False,
                "scene_dim": 0},
    "spatial": {"fusion": {"mode": "spatial"}},  # needs the patch stream: --patches
    # text steering: the caption as a condition (a memory row) and a learned token prior; needs the swaps: --swaps.
    # Its timbre is the caption's: it does not read the scene stream, whose timbre a swapped item's music contradicts
    "text": {"fusion": {"text_dim": TEXT_DIM}, "text_prior": True, "scene_dim": 0},
}
ONSET_WINDOW_S = 0.04
VALIDATION_ONLY = ("select", "beat_clips", "beat_every", "sampling")


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------

def onset_frames(items: list[dict], n_frames: int, frame_rate: float) -> torch.Tensor:
    """(B, T) bool: token frames whose centre is within 40 ms of a true beat."""
    centres = (np.arange(n_frames) + 0.5) / frame_rate
    out = np.zeros((len(items), n_frames), bool)
    for b, it in enumerate(items):
        if len(it["beats"]):
            out[b] = (np.abs(centres[:, None] - it["beats"][None]) <= ONSET_WINDOW_S).any(1)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------------------------------
# model, harmony bank, schedule
# ----------------------------------------------------------------------------------------------------------------------

def model_config(cfg: TrainConfig, system: str, codec: dict, clip_dim: int, flow_dim: int,
                 flow_cells: int = 1, vidmuse: VidMuseConfig | None = None, scene_dim: int = 0) -> ModelConfig:
    """The model config of `system` (SYSTEMS): the preset's, with train's overrides and the system's changes;
    `vidmuse` sets the vidmuse system's window and summary; `scene_dim`, the scene stream's width, is the model's
    with train.scene (unless the system never reads the scene)."""
    if system not in SYSTEMS:
        raise ValueError(f"train: unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    decoder = {"num_codebooks": codec["num_codebooks"], "codebook_size": codec["codebook_size"]}
    fusion = {"clip_dim": clip_dim, "flow_dim": flow_dim, "text_dim": TEXT_DIM if cfg.text else 0}
    if cfg.direction:
        fusion["direction"] = cfg.direction
    if cfg.flow_pool:
        fusion["flow_cells"] = flow_cells
    if cfg.flow_time:
        fusion["flow_time"] = cfg.flow_time
    if cfg.flow_norm:
        fusion["flow_norm"] = cfg.flow_norm
    extra = {"scene_dim": scene_dim} if cfg.scene and scene_dim else {}
    for key in ("interpolate", "harmony_track", "harmony", "harmony_knn"):  # null = the preset's
        if getattr(cfg, key) is not None:
            extra[key] = getattr(cfg, key)
    change = SYSTEMS[system]
    fusion.update(change.get("fusion", {}))
    if fusion.get("mode") == "spatial":  # a token per cell of the flow descriptor's grid, and the patches on it
        fusion["flow_cells"] = flow_cells
    extra.update({k: v for k, v in change.items() if k != "fusion"})
    if system == "vidmuse":
        vidmuse = vidmuse or VidMuseConfig()
        fusion.update(short_s=vidmuse.short_s, long_rows=vidmuse.long_rows, n_layers=vidmuse.layers)
        if vidmuse.harmony:  # full's harmony bank (train's overrides or the preset's)
            for key in ("harmony_knn", "harmony_track"):
                extra.pop(key)
                if getattr(cfg, key) is not None:
                    extra[key] = getattr(cfg, key)
    mcfg = load_preset(cfg.preset, decoder=decoder, fusion=fusion, frame_rate=codec["frame_rate"], **extra)
    if mcfg.scene_dim and mcfg.harmony_track and cfg.scene_knn:  # the harmony bias's tables: the nearest scenes'
        mcfg = dataclasses.replace(mcfg, timbre_knn=cfg.scene_knn)
    return mcfg


def fraction_ids(ids: list[str], percent: int) -> list[str]:
    """The first `percent` per cent (rounded, at least one) of `ids` in a fixed order (their stable hash, then the id):
    the same clips on every machine and for every run, and a smaller share is inside a larger one."""
    order = sorted(ids, key=lambda i: (stable_hash(i), i))
    return sorted(order[: fraction_size(len(ids), percent)])


def scene_keys(train_items: list[dict]) -> torch.Tensor:
    """(N, 2 D): each training clip's scene summary (`scene_summary`, the mean and spread of its scene rows)."""
    return torch.cat([scene_summary(torch.from_numpy(np.array(it["scene"], np.float32))[None],
                                    torch.ones(1, len(it["scene"]), dtype=torch.bool)) for it in train_items])


def build_harmony(train_items: list[dict], mcfg: ModelConfig, device: torch.device
                  ) -> tuple[ModelConfig, HarmonyBank | None]:
    """The kNN harmony bank of the training clips (mcfg.harmony_knn; the items need `add_harmony`) and mcfg with its
    size (and, for the text system, the instruments of its timbre tables: every train item has its label, which
    `steering_captions` checked; with timbre_knn, the clips' scene keys, tokens and frame chroma, `fill_scene`); None
    without harmony_knn. item["bank_index"] names each item's clip in the bank: it never retrieves itself."""
    if not mcfg.harmony_knn:
        return mcfg, None
    if mcfg.harmony_track:  # every CLIP row of every training clip, with the chroma around its time
        keys = np.concatenate([it["clip"] for it in train_items])
        chroma = np.concatenate([it["harmony_track"] for it in train_items])
        clips = np.repeat(np.arange(len(train_items)), [len(it["clip"]) for it in train_items])
    else:  # each training clip's mean CLIP row, with its music's profile
        keys = np.stack([it["clip"].mean(0) for it in train_items])
        chroma, clips = np.stack([it["harmony"] for it in train_items]), None
    # the text system (text_prior) also keeps a token chroma table per instrument, for prompts that name one
    timbres = tuple(sorted({it["instrument"] for it in train_items})) if mcfg.text_prior and mcfg.harmony_track else ()
    mcfg = dataclasses.replace(mcfg, harmony_bank=len(keys), timbres=timbres)
    if mcfg.timbre_knn:
        frames = max(it["codes"].shape[1] for it in train_items)
        mcfg = dataclasses.replace(mcfg, timbre_bank=(len(train_items), frames))
    bank = HarmonyBank.from_config(mcfg).to(device)
    bank.fill(*(None if x is None else torch.from_numpy(x).to(device) for x in (keys, chroma, clips)))
    if mcfg.harmony_track:
        bank.fill_token_chroma([torch.from_numpy(it["codes"]) for it in train_items],
                               [torch.from_numpy(it["frame_chroma"]) for it in train_items],
                               [timbres.index(it["instrument"]) for it in train_items] if timbres else None)
    if mcfg.timbre_knn:  # standardised as V2M.fit_scene standardises the queries
        pooled = scene_keys(train_items).double()
        keys = (pooled - pooled.mean(0)) / pooled.std(0, correction=0).clamp(min=1e-6)
        bank.fill_scene(keys.float().to(device), [torch.from_numpy(it["codes"]) for it in train_items],
                        [torch.from_numpy(it["frame_chroma"]) for it in train_items])
    for i, it in enumerate(train_items):
        it["bank_index"] = i
    return mcfg, bank


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def draw(step: int, seed: int, n_items: int, batch_size: int, cond_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: item indices (batch_size,) and condition keep flags; a function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n_items, (batch_size,), generator=g), torch.rand(batch_size, generator=g) >= cond_dropout


def steering_captions(items: list[dict], caption: str) -> list[dict]:
    """The text system's items: each caption is `caption` naming the clip's instrument (the manifest's)."""
    missing = sorted(it["id"] for it in items if not it.get("instrument"))
    if missing:
        raise SystemExit(f"train --system text: {len(missing)} clip(s) have no instrument label in the manifest "
                         f"(e.g. {missing[0]}); text steering needs SynthV2M's labels")
    return [{**it, "caption": caption.format(instrument=it["instrument"])} for it in items]


def swap_items(chosen: list[dict], swaps: dict[str, dict[str, np.ndarray]], rate: float, seed: int,
               step: int) -> list[dict]:
    """The text system's batch: each item, with probability `rate`, replaced by one of its timbre swaps (the same
    score on another instrument, `v2m swaps`), whose caption names that instrument and is never dropped
    (`text_force`). A function of (seed, step), drawn from its own generator so the other draws stay as they are."""
    g = torch.Generator().manual_seed(seed * 7_000_003 + step)
    swap = (torch.rand(len(chosen), generator=g) < rate).tolist()
    pick = torch.randint(1 << 20, (len(chosen),), generator=g).tolist()
    out = []
    for it, yes, k in zip(chosen, swap, pick, strict=True):
        options = swaps.get(it["id"], {})
        if yes and options:
            instrument = sorted(options)[k % len(options)]
            codes = options[instrument]
            if codes.shape != it["codes"].shape:
                raise SystemExit(f"train: the swap of {it['id']} on {instrument} has codes {codes.shape}, the clip "
                                 f"{it['codes'].shape}: the swaps were made with another codec or clip length; "
                                 "rerun `v2m swaps`")
            it = {**it, "codes": codes, "text_key": f"prompt:{instrument}", "text_force": True}
        out.append(it)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model: V2M, items: list[dict], codec: dict, cfg: TrainConfig, device, text, decode=None) -> dict:
    """val_loss, onset_val_loss over `items`; val_beat_f1 on the first cfg.beat_clips of them when `decode` is given."""
    model.eval()
    total = onset = n_total = n_onset = 0.0
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, text).items()}
        loss, scored = model.frame_losses(batch)  # (B, K, T)
        near = onset_frames(chunk, loss.shape[-1], codec["frame_rate"]).to(device)[:, None] & scored
        total, n_total = total + loss[scored].sum().item(), n_total + scored.sum().item()
        onset, n_onset = onset + loss[near].sum().item(), n_onset + near.sum().item()
    out = {"val_loss": total / max(1, n_total), "onset_val_loss": onset / n_onset if n_onset else None,
           "val_beat_f1": None}
    if decode is not None and cfg.beat_clips:
        from pipeline.metrics.rhythm import beat_f1, estimate_beats

        chunk = items[: cfg.beat_clips]
        batch = {k: v.to(device) for k, v in collate(chunk, text).items() if k not in ("codes", "code_mask")}
        g = torch.Generator(device=device).manual_seed(0)
        s = cfg.sampling
        codes = model.generate(batch, chunk[0]["codes"].shape[1], s.guidance, s.temperature, s.top_k, g,
                               plausibility=s.plausibility,
                               harmony_bias=s.harmony_bias if model.has_token_chroma() else 0.0)
        scores = []
        for it, c in zip(chunk, codes.cpu(), strict=True):
            wav, sr = decode(c[:, : it["codes"].shape[1]])
            scores.append(beat_f1(estimate_beats(wav, sr)[1], it["beats"]))
        out["val_beat_f1"] = float(np.mean(scores))
    model.train()
    return out


def load_codec(params: Params, name: str) -> codecs.Codec | None:
    """codecs.load_codec, or None when the codec cannot load: training goes on without val_beat_f1, and says why."""
    try:
        return codecs.load_codec(name, params.tokenize)
    except Exception as exc:  # noqa: BLE001
        log.warning("codec %r not available (%s: %s): val_beat_f1 is not computed", name, type(exc).__name__, exc)
        return None


# ----------------------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------------------

def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world, device) of this process: joins the torchrun group (NCCL on GPU, else gloo), takes its GPU and
    its share of the cores as torch threads (more threads than cores was 7x slower: docs/timings.md)."""
    rank, world = dist_env()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    device = torch.device(resolve_device(cfg.device))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank())
    per_process = cores_per_process(world)  # more threads than cores was 7x slower (docs/timings.md)
    torch.set_num_threads(min(cfg.threads, per_process) if cfg.threads else per_process)
    return rank, world, device


def check_settings(cfg: TrainConfig, world: int) -> None:
    """Stop before the first step on settings that would only fail later (at the first validation, say)."""
    if cfg.select not in ("val_beat_f1", "last"):
        raise SystemExit(f"train.select: {cfg.select!r} is not one of val_beat_f1, last")
    if cfg.sampling.problem("train.sampling"):  # else the first validation, ckpt_every steps in, would stop on it
        raise SystemExit(cfg.sampling.problem("train.sampling"))
    if cfg.beat_every < 0:
        raise SystemExit(f"train.beat_every {cfg.beat_every} must be >= 0 (0 = at every checkpoint)")
    if cfg.batch_size % world:
        raise SystemExit(f"train: batch_size {cfg.batch_size} is not divisible by the {world} processes")


class Trainer:
    """One system's run: its data, model (with the harmony bank), optimizer and EMA, and the progress a checkpoint
    carries (step, curves, the best checkpoint so far). The steps, in the order `train` calls them: resume,
    train_step (get_batch -> forward -> backward -> clip -> optimizer -> EMA), evaluate, save_checkpoint, export."""

    def __init__(self, params: Params, system: str, items: list[dict], codec: dict, out_dir: Path,
                 device: torch.device, rank: int = 0, world: int = 1,
                 swaps: dict[str, dict[str, np.ndarray]] | None = None):
        cfg = self.cfg = params.train
        self.params, self.system, self.codec, self.seed = params, system, codec, params.base.seed
        self.device, self.rank, self.world = device, rank, world
        self.last, self.best_path, self.out_dir = out_dir / "last.pt", out_dir / "best.pt", out_dir
        self.train_items = [it for it in items if it["split"] == "train"]
        self.val_items = [it for it in items if it["split"] == "val"] or self.train_items[: max(1, cfg.beat_clips)]
        self.swaps = swaps
        if system == "text":  # every caption names the clip's instrument; a swapped item's, its swap's
            items = steering_captions(items, params.ablations.caption)
            named = sorted({it["instrument"] for it in items} | {i for v in (swaps or {}).values() for i in v})
            prompts = [{"id": f"prompt:{i}", "caption": params.ablations.caption.format(instrument=i)} for i in named]
            self.text = caption_embeddings(items + prompts)
        else:
            self.text = caption_embeddings(items) if cfg.text else None
        scene_dim = items[0]["scene"].shape[1] if "scene" in items[0] else 0
        mcfg = model_config(cfg, system, codec, items[0]["clip"].shape[1], items[0]["flow"].shape[1],
                            params.embed.flow.grid ** 2, params.ablations.vidmuse, scene_dim)
        if cfg.scene and SYSTEMS[system].get("scene_dim", 1) and not all("scene" in it for it in items):
            raise SystemExit(f"train: train.scene is on and {system} reads the scene stream, but "
                             f"{sum('scene' not in it for it in items)} clip(s) have no scene rows in "
                             f"{params.embed.out_dir}/scene: run `v2m embed` (or set train.scene: false)")
        if mcfg.harmony or mcfg.harmony_knn:
            add_harmony(self.train_items, Path(params.tokenize.music_dir),
                        mcfg.frame_rate if mcfg.harmony_track else None,
                        workers=1 if world > 1 else cfg.threads or cores_per_process(1))
        self.mcfg, harmony = build_harmony(self.train_items, mcfg, device)
        torch.manual_seed(self.seed)
        self.model = create_model(self.mcfg, cfg.pretrained_dir, harmony).to(device)
        if self.mcfg.scene_dim:  # the scene prior's input standardisation: the training clips' (a buffer)
            self.model.fit_scene(scene_keys(self.train_items).to(device))
        self.optimizer = make_optimizer(self.model, cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema_decay else None
        # settings that only change validation or which checkpoint is exported do not make a checkpoint stale
        # train.scene and scene_knn are left out: the model config says whether the model reads the scene (scene_dim,
        # timbre_knn), so the systems that never do keep their checkpoints
        fingerprint = {"train": {k: v for k, v in to_dict(cfg).items()
                                 if k not in VALIDATION_ONLY + ("scene", "scene_knn")},
                       "seed": self.seed, "model": self.mcfg.to_dict(), "system": system,
                       "ids": [it["id"] for it in self.train_items], "world": world}
        if system == "text":  # what the swaps and captions are (other systems' fingerprints stay as they were)
            fingerprint["steer"] = {"caption": params.ablations.caption, "swap_rate": params.ablations.swap_rate,
                                    "swaps": stable_hash(json.dumps({k: {i: c.tolist() for i, c in v.items()}
                                                                     for k, v in sorted((swaps or {}).items())}))}
        self.fingerprint = params_hash(fingerprint)
        self.step, self.history, self.evals = 0, [], []
        self.best = {"step": None, "val_beat_f1": -1.0}  # the selected checkpoint (train.select: val_beat_f1) so far
        self.seconds, self.tokens_per_s = 0.0, 0.0  # logged only: machine-local facts stay out of DVC outputs
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                         else contextlib.nullcontext())

    @property
    def selected(self) -> V2M:
        """The weights validated and exported: the EMA's with train.ema_decay, else the model's."""
        return self.ema or self.model

    def resume(self) -> None:
        """Continue from last.pt when it was made under the same params and data (its fingerprint); then wrap the
        model in DDP under torchrun."""
        ckpt = {}
        if self.last.exists():
            try:  # weights_only: a last.pt that needs code to load is not ours; training starts over
                ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file: start over, and say why
                log.warning("%s: not resumed, not a plain checkpoint (%s: %s)", self.last, type(exc).__name__,
                            str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
            if ckpt.get("fingerprint") == self.fingerprint:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                if self.ema is not None:
                    self.ema.load_state_dict(ckpt["ema"])
                torch.set_rng_state(ckpt["rng"])
                self.step, self.history, self.evals = ckpt["step"], ckpt["history"], ckpt["evals"]
                self.best = ckpt.get("best", self.best)
                log.info("%s: resuming from step %d (%s)", self.system, self.step, self.last)
            else:
                log.info("%s: %s was made with other params or data; starting afresh", self.system, self.last)
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        if self.rank == 0:
            log.info("%s: %s preset, %.2fM parameters, %d train / %d val clips, %d process(es)", self.system,
                     self.cfg.preset, num_params(self.model) / 1e6, len(self.train_items), len(self.val_items),
                     self.world)

    def get_batch(self) -> tuple[dict, torch.Tensor]:
        """This process's slice of the global batch of this step, on the device, and its condition keep flags (B,)."""
        cfg, local = self.cfg, self.cfg.batch_size // self.world
        index, keep = draw(self.step, self.seed, len(self.train_items), cfg.batch_size, self.mcfg.cond_dropout)
        mine = slice(self.rank * local, (self.rank + 1) * local)
        index, keep = index[mine], keep[mine]
        chosen = [self.train_items[i] for i in index.tolist()]
        if self.swaps:
            chosen = swap_items(chosen, self.swaps, self.params.ablations.swap_rate, self.seed, self.step)
        batch = {k: v.to(self.device) for k, v in collate(chosen, self.text).items()}
        return batch, keep.to(self.device)

    def train_step(self) -> float:
        """One optimizer step; returns the token loss of the global batch (logged every train.log_every steps)."""
        cfg, t0 = self.cfg, time.perf_counter()
        batch, keep = self.get_batch()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        with self.autocast:
            _, loss, aux = self.net(batch, keep)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p, 1 - cfg.ema_decay)
        self.step += 1
        tokens = aux["tokens"]
        if self.world > 1:  # log the loss of the global batch, not of this rank's slice
            tokens = tokens.detach().clone()
            torch.distributed.all_reduce(tokens)
            tokens /= self.world
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.tokens_per_s = self.world * int(batch["code_mask"].sum()) * self.mcfg.decoder.num_codebooks / dt
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self.history.append({"step": self.step, "train_loss": round(tokens.item(), 5),
                                 "lr": lr_at(self.step - 1, cfg),
                                 **({"harmony_loss": round(aux["harmony"].item(), 5)} if "harmony" in aux else {})})
        return tokens.item()

    def evaluate(self, decode=None) -> dict:
        """Validate the selected weights (rank 0) and, with train.select: val_beat_f1, keep them in best.pt when they
        score best so far. Returns the row added to the eval curve."""
        self.evals.append({"step": self.step, **validate(self.selected, self.val_items, self.codec, self.cfg,
                                                         self.device, self.text, decode)})
        score = self.evals[-1].get("val_beat_f1")
        if self.cfg.select == "val_beat_f1" and score is not None and score > self.best["val_beat_f1"]:
            # written before last.pt, so a resumed run never points at a best.pt it did not write
            self.best = {"step": self.step, "val_beat_f1": score}
            atomic_torch_save(self.best_path, {"fingerprint": self.fingerprint, **self.best,
                                               "model": self.selected.state_dict()})
        return self.evals[-1]

    def beat_due(self) -> bool:
        """Whether this checkpoint's validation scores val_beat_f1: at least train.beat_every steps after the last
        one that did (every checkpoint with 0), and always at the last step. From the eval curve: a resumed run
        scores the same checkpoints."""
        cfg = self.cfg
        last = max((e["step"] for e in self.evals if e.get("val_beat_f1") is not None), default=0)
        return not cfg.beat_every or self.step - last >= cfg.beat_every or self.step >= cfg.max_steps

    def save_checkpoint(self) -> None:
        """last.pt (rank 0), everything a rerun needs to resume and end at the same weights."""
        if self.rank == 0:
            atomic_torch_save(self.last, {
                "fingerprint": self.fingerprint, "config": self.mcfg.to_dict(), "train": to_dict(self.cfg),
                "system": self.system, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": torch.get_rng_state(), "history": self.history, "evals": self.evals, "codec": self.codec,
                "best": self.best})

    def select(self) -> tuple[dict, dict]:
        """The exported checkpoint: (its weights, its metrics row). The final weights, or with train.select:
        val_beat_f1 best.pt's (rank 0) when it is another step than the last."""
        chosen, state, best = (self.evals[-1] if self.evals else {}), self.selected.state_dict(), self.best
        if self.rank == 0 and self.cfg.select == "val_beat_f1" and best["step"] not in (None, self.step):
            saved = torch.load(self.best_path, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") == self.fingerprint and saved.get("step") == best["step"]:
                state = saved["model"]
                chosen = next(e for e in self.evals if e["step"] == best["step"])
                log.info("%s: v2m.pt is step %d of %d (best val_beat_f1 %.3f; train.select)", self.system,
                         best["step"], self.step, best["val_beat_f1"])
        result = {**{k: v for k, v in chosen.items() if k != "step"}, "steps": self.step,
                  "selected_step": chosen.get("step", self.step)}
        return state, result

    def export(self, state: dict, result: dict, metrics_dir: Path) -> None:
        """v2m.pt and the metrics (rank 0). v2m.pt carries what inference needs to rebuild the inputs exactly as in
        training: the encoders' and codec's params."""
        if self.rank != 0:
            return
        params = self.params
        atomic_torch_save(self.out_dir / "v2m.pt", {
            "config": self.mcfg.to_dict(), "system": self.system, "step": result["selected_step"],
            "steps_trained": self.step, "model": state, "codec": self.codec, "train": to_dict(self.cfg),
            "params": {"base": to_dict(params.base), "ingest": to_dict(params.ingest), "embed": to_dict(params.embed),
                       "tokenize": to_dict(params.tokenize)}})
        write_metrics(metrics_dir, self.system, result, self.history, self.evals)


def train(params: Params, system: str, items: list[dict], codec: dict, out_dir: Path, metrics_dir: Path,
          decode=None, swaps: dict[str, dict[str, np.ndarray]] | None = None) -> dict:
    """Train (or resume) one system; returns its metrics row. Writes out_dir/{last,v2m}.pt and metrics_dir files."""
    cfg = params.train
    rank, world, device = setup_distributed(cfg)
    check_settings(cfg, world)
    trainer = Trainer(params, system, items, codec, out_dir, device, rank, world, swaps)
    trainer.resume()
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc=f"train {system}", unit="step",
               disable=None if rank == 0 else True)
    trainer.model.train()
    while trainer.step < cfg.max_steps:
        loss = trainer.train_step()
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{trainer.tokens_per_s:,.0f}")
        if trainer.step % cfg.ckpt_every == 0 or trainer.step == cfg.max_steps:
            if rank == 0:
                row = trainer.evaluate(decode if trainer.beat_due() else None)
                bar.write(f"{system} step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                         if isinstance(v, float)))
            trainer.save_checkpoint()
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    state, result = trainer.select()
    log.info("%s: %d steps, %.1f s in this run (%.0f tokens/s at its last step)", system, trainer.step,
             trainer.seconds, trainer.tokens_per_s)
    trainer.export(state, result, metrics_dir)
    return result


def write_metrics(metrics_dir: Path, system: str, result: dict, history: list[dict], evals: list[dict]) -> None:
    atomic_write_json(metrics_dir / f"{system}.json", {system: result})
    atomic_write_text(metrics_dir / f"{system}_loss.csv", pd.DataFrame(history).to_csv(index=False))
    atomic_write_text(metrics_dir / f"{system}_eval.csv", pd.DataFrame(evals).to_csv(index=False))


def report(metrics_dir: Path, out: Path) -> dict:
    """Merge metrics/train/{system}.json into one {system: {...}} file and the eval curves into one long CSV."""
    merged, curves = {}, []
    for path in sorted(metrics_dir.glob("*.json")):
        merged.update(json.loads(path.read_text()))
        curve = metrics_dir / f"{path.stem}_eval.csv"
        if curve.exists() and curve.stat().st_size > 1:
            curves.append(pd.read_csv(curve).assign(system=path.stem))
    atomic_write_json(out, merged)
    if curves:
        atomic_write_text(out.with_name("train_curves.csv"), pd.concat(curves).to_csv(index=False))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--system", choices=list(SYSTEMS), default="full")
    parser.add_argument("--features", help="feature folder with clip/ and flow/ (default: embed.out_dir)")
    parser.add_argument("--tokens", help="token store (default: {tokenize.out_dir}/{tokenize.codec})")
    parser.add_argument("--manifest", help="ingest manifest with split/caption/beat_times (default: ingest's)")
    parser.add_argument("--out", help="model folder (default: train.out_dir/SYSTEM)")
    parser.add_argument("--metrics", help="metrics folder (default: train.metrics_dir)")
    parser.add_argument("--seed", type=int, help="training seed (default: base.seed); the seed study trains each of "
                        "seed_study.seeds this way")
    parser.add_argument("--fraction", type=int, metavar="PERCENT", help="train on this per cent of the train split "
                        "(the data-size curve of the ablation group; the validation clips stay all)")
    parser.add_argument("--patches", metavar="DIR", help="the patch stream's store (`v2m embed --streams patch --out "
                        "D`: D/patch), which the spatial system reads and the others do not")
    parser.add_argument("--swaps", metavar="DIR", help="the timbre swaps (`v2m swaps`: ablations.swaps_dir), which "
                        "the text system trains on and the others do not")
    parser.add_argument("--report", metavar="JSON", help="only merge the metrics folder's systems into JSON")
    parser.add_argument("--export", metavar="PT", help="with --report: copy the full system's v2m.pt to PT (the "
                        "default model of `v2m generate`, models/v2m.pt)")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    if args.seed is not None:
        params = dataclasses.replace(params, base=dataclasses.replace(params.base, seed=args.seed))
    cfg = params.train
    metrics_dir = Path(args.metrics or cfg.metrics_dir)
    if args.report:
        print(json.dumps(report(metrics_dir, Path(args.report)), indent=2))
        if args.export:
            source = Path(cfg.out_dir) / "full" / "v2m.pt"
            if not source.exists():
                raise SystemExit(f"train --export: {source} does not exist; run `v2m train --system full` first")
            with atomic_path(Path(args.export)) as tmp:
                shutil.copyfile(source, tmp)
            log.info("train: %s -> %s", source, args.export)
        return 0
    tokens_dir = Path(args.tokens or params.tokenize.store_dir)
    codec_obj = load_codec(params, tokens_dir.name) if cfg.beat_clips else None
    spatial = SYSTEMS[args.system].get("fusion", {}).get("mode") == "spatial"
    if spatial != bool(args.patches):
        raise SystemExit(f"train: --system {args.system} " + ("reads the patch stream: give --patches DIR (`v2m embed "
                         "--streams patch --out D` writes D/patch)" if spatial else "does not read --patches"))
    steer = args.system == "text"
    if steer != bool(args.swaps):
        raise SystemExit(f"train: --system {args.system} " + ("trains on the timbre swaps: give --swaps DIR (`v2m "
                         "swaps` writes ablations.swaps_dir)" if steer else "does not read --swaps"))
    if steer and params.ablations.problem():
        raise SystemExit(f"train: {params.ablations.problem()}")
    swaps = load_swaps(Path(args.swaps)) if steer else None
    items, codec = load_dataset(Path(args.features or params.embed.out_dir), tokens_dir,
                                Path(args.manifest or Path(params.ingest.out_dir) / "manifest.parquet"),
                                codec_obj.describe() if codec_obj is not None else None,
                                Path(args.patches) if args.patches else None)
    if args.fraction is not None:
        keep = set(fraction_ids([it["id"] for it in items if it["split"] == "train"], args.fraction))
        items = [it for it in items if it["split"] != "train" or it["id"] in keep]
        log.info("train: --fraction %d: %d train clips", args.fraction, len(keep))
    decode = None
    if codec_obj is not None:
        decode = lambda codes: (codec_obj.decode(codes.numpy()), codec_obj.sample_rate)  # noqa: E731
    out_dir = Path(args.out or Path(cfg.out_dir) / args.system)
    result = train(params, args.system, items, codec, out_dir, metrics_dir, decode, swaps)
    if dist_env()[0] == 0:
        print(f"train {args.system}: " + json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    sys.exit(main())
