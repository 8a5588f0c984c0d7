"""CLIP stream: open_clip image embeddings of frames sampled at `embed.clip_fps`, [T, D] float32, L2-normalised.

Weights, by `embed.clip.pretrained`:
- `none`: a seeded random init of `embed.clip.model`, written ONCE by `init_seeded` (the DVC stage `encoders`) as an
  open_clip local folder, `{embed.encoders_dir}/clip/` (open_clip_config.json + open_clip_model.safetensors), and
  loaded from there with `local-dir:`. Every run and every teammate (through the DVC remote) gets the same bytes, so
  the same features. Random weights carry colour and layout, NOT learned semantics: the embedded profile says so in
  its logs.
- a local file (e.g. `~/weights/ViT-B-32-laion2b_s34b_b79k.bin`): loaded into the named architecture.
- an open_clip tag (e.g. `laion2b_s34b_b79k`): resolved by open_clip through its cache (HF hub cache); with no
  network only an already-cached tag works.

`v2m-tiny-vit` is our small architecture for the embedded profile (a 7x7-patch ViT, ~3.4M vision parameters, about
4 ms an image on one CPU core); any name in `open_clip.list_models()` works too (ViT-B-32 in production).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.config import ClipEncoderConfig
from pipeline.shards import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

VERSION = 2  # bump when preprocessing or pooling changes, so cached features are recomputed
# On a CPU the model runs in float64 and its embeddings are rounded to whole multiples of this: float32 kernels differ
# in their last bits between AVX2 and AVX-512 machines, float64 ones by ~1e-16, far below the grid, so every x86-64
# CPU with AVX2 writes the same bytes (docs/reproducibility.md). 2^-20 is ~1e-6 of a unit-norm embedding's length.
FEATURE_GRID = 2.0**-20
TINY_CONFIGS = {
    "v2m-tiny-vit": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 112, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
        # the text tower is never used by embed; keep it minimal so the saved file stays small
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1},
    },
}
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def model_config(name: str) -> dict:
    """The open_clip model config of an architecture: ours (`TINY_CONFIGS`) or open_clip's registry."""
    import open_clip

    if name in TINY_CONFIGS:
        return json.loads(json.dumps(TINY_CONFIGS[name]))
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"embed.clip.model: unknown architecture {name!r}; use one of {sorted(TINY_CONFIGS)} or "
                         f"open_clip.list_models()")
    return cfg


def seeded_dir(encoders_dir: str | Path) -> Path:
    return Path(encoders_dir) / "clip"


def init_seeded(cfg: ClipEncoderConfig, seed: int, encoders_dir: str | Path) -> Path:
    """Write the seeded random init of `cfg.model` as an open_clip local folder; returns the folder.

    Deterministic: the same (model, seed, torch version) gives byte-identical safetensors.
    """
    import open_clip
    import torch
    from safetensors.torch import save

    model_cfg = model_config(cfg.model)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = seeded_dir(encoders_dir)
    atomic_write_bytes(out / WEIGHTS_FILE, save(state))
    preprocess = {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
                  "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    atomic_write_json(out / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
                                          "v2m": {"model": cfg.model, "seed": seed, "init": "seeded random",
                                                  "weights_sha256": sha256_file(out / WEIGHTS_FILE)}})
    return out


def weights_identity(cfg: ClipEncoderConfig, seed: int, encoders_dir: str | Path) -> str:
    """What the weights are, for the encoder hash: a file's SHA-256, or the tag for an open_clip tag."""
    if cfg.pretrained == "none":
        folder = seeded_dir(encoders_dir)
        meta = _seeded_meta(folder)
        if meta.get("model") != cfg.model or meta.get("seed") != seed:
            raise FileNotFoundError(f"{folder / CONFIG_FILE}: holds {meta.get('model')!r} seed {meta.get('seed')}, "
                                    f"not {cfg.model!r} seed {seed}; run `dvc repro encoders` (or "
                                    "`v2m embed --init-encoders`)")
        return meta["weights_sha256"]
    if Path(cfg.pretrained).expanduser().is_file():
        return sha256_file(Path(cfg.pretrained).expanduser())
    return f"tag:{cfg.pretrained}"


def _seeded_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())["v2m"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise FileNotFoundError(f"{folder}: no seeded CLIP encoder (embed.clip.pretrained is none); create it with "
                                "`dvc repro encoders` (or `v2m embed --init-encoders`)") from None


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs each loading step at INFO on the root logger; keep the stage's log readable."""
    level = logging.root.level
    logging.root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logging.root.setLevel(level)


class ClipEncoder:
    """Frames [T, H, W, 3] uint8 -> embeddings [T, D] float32 (unit norm), with open_clip's own preprocessing."""

    def __init__(self, cfg: ClipEncoderConfig, encoders_dir: str | Path, device: str = "cpu"):
        import open_clip
        import torch

        self.cfg, self.device, self.torch = cfg, device, torch
        if cfg.pretrained == "none":
            name = f"local-dir:{seeded_dir(encoders_dir)}"
            with _quiet_root_logger():
                model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
            log.warning("CLIP stream: RANDOM weights (seeded init of %s from %s). These features carry colour and "
                        "layout, NOT learned semantics; set embed.clip.pretrained for real CLIP features.",
                        cfg.model, seeded_dir(encoders_dir))
        else:
            pretrained = str(Path(cfg.pretrained).expanduser()) if Path(cfg.pretrained).expanduser().is_file() \
                else cfg.pretrained
            if cfg.model in TINY_CONFIGS:
                raise ValueError(f"embed.clip.model {cfg.model!r} has no pretrained weights; use pretrained: none")
            try:
                with _quiet_root_logger():
                    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained,
                                                                                 device=device)
            except Exception as exc:  # noqa: BLE001 - truncated file, another architecture: name the file
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise RuntimeError(f"embed.clip.pretrained {cfg.pretrained!r}: cannot load weights for {cfg.model} "
                                   f"({type(exc).__name__}: {first}). Give a local file of {cfg.model}'s weights "
                                   "(not truncated), or a tag already in the HF cache ($HF_HOME/hub).") from None
        self.dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.model = model.eval().to(self.dtype)
        self.preprocess = preprocess
        self.dim = int(self.model.visual.output_dim)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        from PIL import Image

        torch = self.torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.cfg.batch_size):
                batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[start:start +
                                                                                       self.cfg.batch_size]])
                emb = self.model.encode_image(batch.to(self.device, self.dtype), normalize=True)
                out.append(emb.cpu().double().numpy())
        return (np.rint(np.concatenate(out) / FEATURE_GRID) * FEATURE_GRID).astype(np.float32)  # (T, D)

    def patches(self, frames: np.ndarray, grid: int) -> np.ndarray:
        """Frames [T, H, W, 3] uint8 -> patch embeddings [T, grid * grid * D] float32: the last layer's patch tokens
        (after `ln_post` and through `proj`, like the pooled embedding), area-averaged onto a `grid` x `grid` array of
        cells (row-major, top-left first: the flow descriptor's cells), each cell L2-normalised, cells concatenated.
        What the spatial-fusion ablation reads (docs/baselines.md). Needs an open_clip ViT (patch tokens)."""
        from PIL import Image

        torch = self.torch
        visual = self.model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "grid_size"):
            raise ValueError(f"embed.clip.model {self.cfg.model!r} has no patch tokens (not an open_clip ViT)")
        rows_, cols_ = visual.grid_size
        out = []
        visual.output_tokens = True
        try:
            with torch.inference_mode():
                for start in range(0, len(frames), self.cfg.batch_size):
                    batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[start:start +
                                                                                           self.cfg.batch_size]])
                    tokens = visual(batch.to(self.device, self.dtype))[1]  # (B, N, width), the class token dropped
                    if visual.proj is not None:
                        tokens = tokens @ visual.proj
                    tokens = tokens.reshape(len(batch), rows_, cols_, -1).permute(0, 3, 1, 2)  # (B, D, r, c)
                    cells = torch.nn.functional.adaptive_avg_pool2d(tokens, grid)  # (B, D, grid, grid)
                    cells = torch.nn.functional.normalize(cells.flatten(2).transpose(1, 2), dim=-1)  # (B, P, D)
                    out.append(cells.flatten(1).cpu().double().numpy())
        finally:
            visual.output_tokens = False
        return (np.rint(np.concatenate(out) / FEATURE_GRID) * FEATURE_GRID).astype(np.float32)  # (T, P * D)
