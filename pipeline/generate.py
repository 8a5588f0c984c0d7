"""generate: music for any video, and the generate stage. Params: base (seed), generate; the checkpoint brings the rest.

    v2m generate VIDEO [VIDEO ...] -o OUT [--model CKPT] [--text "..."] [--seed S] [--cfg G] [--top-k K]
                 [--temperature T] [--keep-audio [--mix-db DB]] [--wav]
    v2m generate --stage        the eval split -> data/generated/{system}/{id}.{wav,mp4} + manifest.csv

Any video ingest reads (any container, resolution, rotation or frame rate) is normalised exactly as ingest normalises a
clip (`base.fps`, `ingest.short_side`, rotation applied) into a scratch file, and its CLIP and flow streams are
computed by the embed stage's encoders with the checkpoint's own `embed` params, so the model sees what it was
trained on. The checkpoint records base/embed/tokenize params; relative paths in them (encoders, fitted codec) are
looked up from the working directory, then from the checkpoint's folder upwards.

Long videos. The model's window is `base.clip_seconds` (its training clips). Past it, windows overlap by
`generate.prompt_seconds`: window i starts where window i-1's last `prompt_seconds` start, those tokens are its
prompt (forced, prefilled through the KV cache in one pass) and it writes the rest, seeing the video of its own span.
VidMuse keeps 0.5 s of context across windows; the default here is half the window (4 s of an 8 s window). Each
window's tokens are decoded on their own and consecutive windows' audio is crossfaded (raised cosine,
`crossfade_seconds`) in the middle of the prompt region, where both windows hold the *same* tokens: the crossfade
blends two renderings of one piece of music, never two different continuations, and hides the decoder's edges.

Output: the input's video stream copied untouched (no re-encode) when the output container can hold its codec
(H.264/HEVC/AV1/VP9 in mp4 or mov, VP8/VP9/AV1 in webm, anything in mkv), else re-encoded (H.264, or VP9 for webm),
which the log says; plus the music (AAC; Opus in webm). The music lasts as long as the video stream, so the output's
duration equals the input's within one frame. `--keep-audio` mixes the original soundtrack under the music at
`--mix-db`; `--wav` writes the music alone.

Bad input (missing, not a video, no video stream, corrupt, unwritable output) ends in one line naming the file and the
problem and a non-zero exit status, and leaves no partial output (every file is written under a temporary name and
renamed). A batch goes on past a bad file and lists the failures at the end. Deterministic for a fixed seed.

The stage reads the cached features of the eval split (exactly the training-time inputs), writes the trained systems
(`generate.systems`), two baselines with no learning of their own, `retrieval` (the music of the training clip whose
mean CLIP embedding is nearest, by cosine) and `random` (a seeded random training clip's music), both cut or looped to
length, and `reference` (the true music through the codec: encode + decode, the decoder's ceiling). One manifest.csv
row per (system, id): status ok / failed, reason, error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import GenerateConfig, Params, load_params, params_from_dict, to_dict
from pipeline.media import X264_ARGS, MediaError, load_audio, probe, run_ffmpeg, write_wav
from pipeline.shards import FAILED, OK, atomic_path, load_features, report_rows, stable_hash, write_manifest

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning that a batch of videos would otherwise repeat for every one."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm")
# video codecs each container takes by stream copy; None = any. Others are re-encoded (and the log says so).
COPYABLE = {".mp4": {"h264", "hevc", "av1", "vp9", "mpeg4"}, ".m4v": {"h264", "hevc", "mpeg4"},
            ".mov": {"h264", "hevc", "mpeg4", "prores", "mjpeg"}, ".webm": {"vp8", "vp9", "av1"}, ".mkv": None}
STAGE_COLUMNS = ["system", "id", "status", "reason", "error", "wav_path", "mp4_path", "duration_s", "source_id"]
BASELINES = ("retrieval", "random")
DECODE_MARGIN_S = 0.12  # decoded beyond each crossfade, so neither chunk's edge effects reach the mix
DECODE_CHUNK_S = 30.0  # audio is decoded in chunks of at least this long (bounded memory; melvq is ~3x slower on 3 s)


class GenerateError(RuntimeError):
    """A problem with one input or output; its message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# the model and what it was trained with
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Model:
    path: Path
    net: torch.nn.Module  # V2M
    system: str
    params: Params  # base, embed, tokenize as trained; the rest from params.yaml
    codec: object  # pipeline.codecs.Codec
    device: torch.device
    encoders: object = None  # pipeline.embed.Encoders, built on first use

    @property
    def frame_rate(self) -> float:
        return float(self.net.cfg.frame_rate)

    @property
    def has_text(self) -> bool:
        return bool(self.net.cfg.fusion.text_dim)


def _resolve(path: str, anchor: Path) -> str:
    """A relative path from a checkpoint's params: as is when it exists here, else under an ancestor of `anchor`."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    for parent in anchor.resolve().parents:
        if (parent / path).exists():
            return str(parent / path)
    return path


def default_model(cfg: GenerateConfig) -> Path:
    path = Path(cfg.model)
    if not path.exists() and Path("models/full/v2m.pt").exists():
        log.info("%s not found; using models/full/v2m.pt", path)
        return Path("models/full/v2m.pt")
    return path


def load_model(path: str | Path, params: Params | None = None) -> Model:
    """A checkpoint written by the train stage, with its codec and the params its inputs were made with."""
    from pipeline import codecs
    from pipeline.encoders import resolve_device
    from pipeline.model import V2M, ModelConfig

    path, params = Path(path), params or Params()
    if not path.is_file():
        raise GenerateError(f"{path}: no such model checkpoint (train one with `v2m train`, or pass --model)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        config = ckpt["config"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise GenerateError(f"{path}: not a v2m checkpoint ({type(exc).__name__}: {exc})") from None
    merged = to_dict(params)
    for section, values in (ckpt.get("params") or {}).items():
        merged[section] = values
    params = params_from_dict(merged, f"{path} (params)")
    embed = dataclasses.replace(params.embed, encoders_dir=_resolve(params.embed.encoders_dir, path))
    tokenize = dataclasses.replace(params.tokenize, model_dir=_resolve(params.tokenize.model_dir, path))
    params = dataclasses.replace(params, embed=embed, tokenize=tokenize)
    device = torch.device(resolve_device(params.generate.device))
    net = V2M(ModelConfig.from_dict(config))
    net.load_state_dict(ckpt["model"])
    net.eval().to(device)
    info = ckpt.get("codec") or {}
    name = info.get("codec") or info.get("name") or params.tokenize.codec
    try:
        codec = codecs.create_codec(name, tokenize)
        if codec.needs_fit:
            codec.load(Path(tokenize.model_dir) / name)
    except Exception as exc:  # noqa: BLE001 - the codec is part of the model: without it there is no audio
        raise GenerateError(f"{path}: cannot load its codec {name!r} from {tokenize.model_dir} "
                            f"({type(exc).__name__}: {exc})") from None
    if not math.isclose(codec.frame_rate, net.cfg.frame_rate):
        raise GenerateError(f"{path}: model frame rate {net.cfg.frame_rate} != codec {name} {codec.frame_rate}")
    return Model(path, net, ckpt.get("system", ""), params, codec, device)


def text_embedding(model: Model, text: str | None) -> np.ndarray | None:
    """Sentence embedding (384,) of a prompt, as training embedded captions; None without text."""
    if not text:
        return None
    if not model.has_text:
        raise GenerateError(f"{model.path}: this model was trained without text (train.text: false), so --text cannot "
                            "steer it; use a checkpoint trained with train.text: true")
    from pipeline.train import caption_embeddings

    return caption_embeddings([{"id": "prompt", "caption": text}])["prompt"]


# ----------------------------------------------------------------------------------------------------------------------
# features on the fly
# ----------------------------------------------------------------------------------------------------------------------

def video_duration(path: str | Path) -> tuple[float, float]:
    """(duration, fps) of the first video stream, from its packets' timestamps (no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        first, end = None, 0.0
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            t0 = float(packet.pts * packet.time_base)
            first = t0 if first is None else min(first, t0)
            end = max(end, t0 + float((packet.duration or 0) * packet.time_base or 1 / fps))
        promised = float(stream.duration * stream.time_base) if stream.duration else 0.0
    if first is None:
        raise MediaError(path, "no video packets (empty or damaged video stream)")
    if promised and end - first < promised - 2 / fps:
        raise MediaError(path, f"its video stream stops at {end - first:.2f} s of the {promised:.2f} s its header "
                         "promises (truncated or damaged file)")
    return end - first, fps


def video_features(model: Model, path: Path, scratch: Path) -> dict:
    """CLIP and flow streams of any video, computed as the embed stage computes them on an ingested clip."""
    from pipeline import embed, ingest
    from pipeline.encoders import set_threads
    from pipeline.shards import Item

    info = probe(path)
    if not info.has_video:
        raise MediaError(path, "no video stream (an audio file?)", "no_video")
    duration, native_fps = video_duration(path)  # of the video stream: what is normalised and checked
    base = model.params.base
    n_frames = max(1, int(math.floor(duration * base.fps + 1e-6)))
    clip = scratch / "normalised.mp4"
    ingester = ingest.Ingester(base, model.params.ingest, scratch / "ingest", scratch)
    ingester._transcode(path, 0.0, n_frames / base.fps, n_frames, False, clip, scratch / "unused.wav")
    got = ingest._frame_count(clip)
    if got < n_frames - 1:
        raise MediaError(path, f"decoded only {got / base.fps:.2f} s of the {duration:.2f} s its header promises "
                         "(truncated or damaged file)")
    set_threads(model.params.generate.torch_threads)
    if model.encoders is None:
        model.encoders = embed.Encoders(model.params.embed, str(model.device))
    item = Item(path.name, "", str(clip))
    clip_rows, clip_meta = model.encoders.clip(item)
    flow_rows, flow_meta = model.encoders.flow(item)
    return {"clip": clip_rows, "clip_fps": clip_meta["fps"], "flow": flow_rows, "flow_fps": flow_meta["fps"],
            "video_duration_s": duration, "fps": native_fps, "info": info,
            "duration_s": max(duration, info.duration_s)}  # the music: as long as the input (a longer audio too)


def rows_at(rows: np.ndarray, fps: float, start_s: float, seconds: float) -> np.ndarray:
    """A stream's rows at start_s + k / fps for k < ceil(seconds * fps): linear interpolation, clamped at the ends
    (exact rows when start_s falls on the stream's grid)."""
    n = max(1, math.ceil(seconds * fps - 1e-6))
    pos = np.clip(start_s * fps + np.arange(n), 0, len(rows) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(rows) - 1)
    w = (pos - lo)[:, None].astype(np.float32)
    return ((1 - w) * rows[lo] + w * rows[hi]).astype(np.float32)


def window_batch(feats: dict, start_s: float, seconds: float, text: np.ndarray | None, device) -> dict:
    """The model's batch (B = 1) for the window [start_s, start_s + seconds), its times counted from the start."""
    batch = {}
    for stream in ("clip", "flow"):
        rows = torch.from_numpy(rows_at(feats[stream], feats[f"{stream}_fps"], start_s, seconds))[None]
        batch[stream], batch[f"{stream}_mask"] = rows, torch.ones(rows.shape[:2], dtype=torch.bool)
        batch[f"{stream}_fps"] = torch.tensor([float(feats[f"{stream}_fps"])])
    if text is not None:
        batch["text"], batch["text_mask"] = torch.from_numpy(text[None]), torch.tensor([True])
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# windows: tokens, then audio
# ----------------------------------------------------------------------------------------------------------------------

def plan_windows(n_frames: int, window: int, prompt: int) -> list[int]:
    """Start frames of the windows covering n_frames: window i starts `prompt` frames before window i-1 ends."""
    prompt = min(max(0, prompt), window - 1)
    starts = [0]
    while starts[-1] + window < n_frames:
        starts.append(starts[-1] + window - prompt)
    return starts


def generate_codes(model: Model, feats: dict, n_frames: int, cfg: GenerateConfig, seed: int,
                   text: np.ndarray | None = None, progress: bool = True) -> tuple[np.ndarray, list[int], int]:
    """Codes [K, n_frames] for the whole video, window by window -> (codes, window starts, prompt frames)."""
    fr = model.frame_rate
    window = max(1, int(round(model.params.base.clip_seconds * fr)))
    prompt = max(0, int(round(cfg.prompt_seconds * fr)))
    if not 0.0 <= cfg.plausibility <= 1.0:
        raise GenerateError(f"generate.plausibility {cfg.plausibility:g} must be in [0, 1] (0 = every token)")
    if cfg.harmony_bias < 0:
        raise GenerateError(f"generate.harmony_bias {cfg.harmony_bias:g} must be >= 0 (0 = none)")
    bias = cfg.harmony_bias if model.net.has_token_chroma() else 0.0
    if cfg.harmony_bias and not bias:
        _warn_once(f"generate.harmony_bias {cfg.harmony_bias:g} not applied: the model has no token chroma table "
                   "(trained without harmony_track, or before the table existed: retrain to use it)")
    if window - prompt < fr:
        raise GenerateError(f"generate.prompt_seconds {cfg.prompt_seconds:g} must leave at least 1 s of the model's "
                            f"{window / fr:g} s window")
    starts = plan_windows(n_frames, window, prompt)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    codes = torch.zeros(model.net.cfg.decoder.num_codebooks, 0, dtype=torch.long, device=model.device)
    for i, start in enumerate(tqdm(starts, desc="windows", unit="win", leave=False, disable=not progress or None)):
        n = min(window, n_frames - start)
        batch = window_batch(feats, start / fr, n / fr, text, model.device)
        given = codes[None, :, start : start + prompt] if i else None
        out = model.net.generate(batch, n, cfg.guidance, cfg.temperature, cfg.top_k, gen, cfg.use_cache, given,
                                 cfg.plausibility, bias)
        codes = torch.cat([codes[:, :start], out[0]], dim=1)
    return codes.cpu().numpy(), starts, prompt if len(starts) > 1 else 0


def decode_windows(codec, codes: np.ndarray, starts: list[int], prompt: int, n_samples: int,
                   crossfade_s: float) -> np.ndarray:
    """Audio [n_samples] of codes [K, T], decoded in chunks of whole windows (>= DECODE_CHUNK_S): a chunk ends in the
    middle of a window overlap, where both sides hold the same (prompt) tokens, and consecutive chunks are crossfaded
    there over `crossfade_s`. The token stream itself is continuous, so a seam blends two renderings of one music."""
    T, hop, fr = codes.shape[1], codec.hop_length, codec.frame_rate
    if len(starts) == 1 or prompt == 0 or T < 1.5 * DECODE_CHUNK_S * fr:
        wav = codec.decode(codes)
    else:
        half = max(1, min(prompt, int(round(crossfade_s * fr)))) / 2  # frames each side of the seam
        margin = int(math.ceil(DECODE_MARGIN_S * fr))
        chunk = DECODE_CHUNK_S * fr
        bounds = [0.0]
        for seam in (s + prompt / 2 for s in starts[1:]):  # frames (may be x.5), in the middle of shared tokens
            if seam - bounds[-1] >= chunk and T - seam >= chunk / 2:
                bounds.append(seam)
        bounds.append(float(T))
        wav = np.zeros(T * hop, np.float32)
        for i in range(len(bounds) - 1):
            lo = max(0, int(math.floor(bounds[i] - half)) - margin) if i else 0
            hi = min(T, int(math.ceil(bounds[i + 1] + half)) + margin) if i < len(bounds) - 2 else T
            part = codec.decode(codes[:, lo:hi]).astype(np.float32)
            t = (lo * hop + np.arange(len(part))) / hop  # in frames
            gain = np.ones(len(part), np.float32)
            if i:
                gain *= _ramp((t - (bounds[i] - half)) / (2 * half))
            if i < len(bounds) - 2:
                gain *= 1 - _ramp((t - (bounds[i + 1] - half)) / (2 * half))
            wav[lo * hop : lo * hop + len(part)] += gain * part
    wav = np.asarray(wav, np.float32)[:n_samples]
    return np.pad(wav, (0, n_samples - len(wav)))


def _ramp(x: np.ndarray) -> np.ndarray:
    """Raised-cosine fade-in over x in [0, 1] (0 before, 1 after); with its complement it sums to 1."""
    return np.sin(0.5 * np.pi * np.clip(x, 0.0, 1.0)) ** 2


# ----------------------------------------------------------------------------------------------------------------------
# output files
# ----------------------------------------------------------------------------------------------------------------------

def mux(video: Path, audio: np.ndarray, sample_rate: int, out: Path) -> str:
    """Write `out`: video's first video stream (copied when `out`'s container takes its codec) + audio [C, N].
    Returns "copy" or "re-encode"."""
    suffix = out.suffix.lower()
    codec = probe(video).video_codec
    allowed = COPYABLE.get(suffix, set())
    modes = ["copy", "re-encode"] if allowed is None or codec in allowed else ["re-encode"]
    if modes == ["re-encode"]:
        log.warning("%s: its %s video cannot go into %s: re-encoding the video", video, codec, suffix)
    audio_args = ["-c:a", "libopus", "-b:a", "128k", "-ar", "48000"] if suffix == ".webm" else \
        ["-c:a", "aac", "-b:a", "160k"]
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="v2m-mux-") as scratch:
        wav = Path(scratch) / "music.wav"
        write_wav(wav, audio, sample_rate)
        for mode in modes:
            if mode == "copy":
                video_args = ["-c:v", "copy"]
            elif suffix == ".webm":
                video_args = ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "32", "-deadline", "realtime",
                              "-cpu-used", "8"]
            else:
                video_args = [*X264_ARGS, "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"]
            args = ["-i", str(video), "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", *video_args, *audio_args,
                    "-map_metadata", "0"]
            args += ["-movflags", "+faststart"] if suffix in (".mp4", ".m4v", ".mov") else []
            try:
                run_ffmpeg([*args, str(tmp)], out, reason="mux")
                break
            except MediaError as exc:
                if mode != "copy":
                    raise
                log.warning("%s: stream copy into %s failed (%s): re-encoding the video", video, suffix, exc)
    return mode


def output_path(src: Path, out: Path, many: bool, wav_only: bool) -> Path:
    """Where a video's result goes: `out` itself for one input and a file name, else out/{stem}{ext}."""
    if not many and out.suffix and not out.is_dir():
        return out
    suffix = ".wav" if wav_only else (src.suffix.lower() if src.suffix.lower() in VIDEO_SUFFIXES else ".mkv")
    return out / f"{src.stem}{suffix}"


def check_writable(path: Path, wav_only: bool) -> None:
    """Fail before any work when `path` cannot be written (a folder, no permission, an unknown container)."""
    suffix = path.suffix.lower()
    if wav_only and suffix != ".wav":
        raise GenerateError(f"{path}: --wav writes a .wav file")
    if not wav_only and suffix not in VIDEO_SUFFIXES:
        raise GenerateError(f"{path}: unknown output container {suffix or '(none)'}; use one of "
                            f"{', '.join(VIDEO_SUFFIXES)} (or --wav)")
    if path.is_dir():
        raise GenerateError(f"{path}: is a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise GenerateError(f"{path}: cannot write here ({parent} is not a writable folder)")


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """[..., N] cut or looped to n samples (a baseline's music)."""
    if audio.shape[-1] == 0:
        return np.zeros((*audio.shape[:-1], n), np.float32)
    reps = -(-n // audio.shape[-1])
    return np.concatenate([audio] * reps, axis=-1)[..., :n] if reps > 1 else audio[..., :n]


# ----------------------------------------------------------------------------------------------------------------------
# `v2m generate VIDEO ...`
# ----------------------------------------------------------------------------------------------------------------------

def generate_one(model: Model, src: Path, dest: Path, cfg: GenerateConfig, seed: int, text: np.ndarray | None,
                 wav_only: bool = False, keep_audio: bool = False, progress: bool = True) -> dict:
    """Music for one video, written to `dest`; returns what was done (durations, windows, copy or re-encode)."""
    check_writable(dest, wav_only)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="v2m-generate-") as scratch:
        feats = video_features(model, src, Path(scratch))
        sr = model.codec.sample_rate
        n_samples = int(round(feats["duration_s"] * sr))
        n_frames = model.codec.num_frames(n_samples)
        codes, starts, prompt = generate_codes(model, feats, n_frames, cfg, seed, text, progress)
        music = decode_windows(model.codec, codes, starts, prompt, n_samples, cfg.crossfade_seconds)
        audio = music[None]
        if keep_audio and feats["info"].has_audio:
            original, _ = load_audio(src, sr, mono=False)
            original = np.pad(original[:, :n_samples], ((0, 0), (0, max(0, n_samples - original.shape[1]))))
            audio = music[None] + 10 ** (cfg.mix_db / 20) * original
            audio /= max(1.0, float(np.abs(audio).max()) / 0.99)
        elif keep_audio:
            log.warning("%s: no audio stream to keep; the music alone", src)
        if wav_only:
            write_wav(dest, audio, sr)
            mode = "wav"
        else:
            mode = mux(src, audio, sr, dest)
    return {"input": str(src), "output": str(dest), "duration_in_s": feats["duration_s"],
            "windows": len(starts), "prompt_s": prompt / model.frame_rate, "video": mode, "codes": codes,
            "seconds": time.perf_counter() - t0}


def run_files(inputs: list[Path], out: Path, model: Model, cfg: GenerateConfig, seed: int, text: str | None,
              wav_only: bool, keep_audio: bool) -> tuple[list[dict], list[str]]:
    """Every input in turn; a bad one is reported and skipped. Returns (results, failure lines)."""
    many = len(inputs) > 1
    if many and out.suffix and not out.is_dir():
        raise GenerateError(f"{out}: several inputs need an output folder, not a file")
    vector = text_embedding(model, text)
    results, failures = [], []
    for src in tqdm(inputs, desc="generate", unit="file", disable=None if len(inputs) > 1 else True):
        dest = output_path(src, out, many, wav_only)
        try:
            result = generate_one(model, src, dest, cfg, seed, vector, wav_only, keep_audio)
        except (MediaError, GenerateError) as exc:
            failures.append(str(exc))
            log.error("%s", exc)
            continue
        except OSError as exc:
            failures.append(f"{dest if exc.filename is None else exc.filename}: {exc.strerror or exc}")
            log.error("%s", failures[-1])
            continue
        results.append(result)
        log.info("%s -> %s: %.2f s, %d window(s), video %s, %.1f s", src, dest, result["duration_in_s"],
                 result["windows"], result["video"], result["seconds"])
    return results, failures


# ----------------------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------------------

def run_stage(params: Params, out_dir: Path | None = None, models_dir: Path | None = None,
              baselines: bool = True) -> pd.DataFrame:
    """The eval split through every system (checkpoints models_dir/{system}/v2m.pt, default train.out_dir), then the
    baselines and the reference unless `baselines` is False -> out_dir/{system}/{id}.{wav,mp4}."""
    cfg, seed = params.generate, params.base.seed
    out_dir = Path(out_dir or cfg.out_dir)
    models_dir = Path(models_dir or params.train.out_dir)
    upstream = pd.read_parquet(Path(params.ingest.out_dir) / "manifest.parquet")
    upstream = upstream[upstream["status"] == OK]
    clip, flow = load_features(Path(params.embed.out_dir) / "clip"), load_features(Path(params.embed.out_dir) / "flow")
    have = set(clip) & set(flow)
    rows = {r["id"]: r for r in upstream.to_dict("records") if r["id"] in have}
    eval_ids = sorted(i for i, r in rows.items() if r["split"] == cfg.split)[: cfg.max_clips or None]
    train_ids = sorted(i for i, r in rows.items() if r["split"] == "train")
    if not eval_ids:
        raise SystemExit(f"generate: no ok clips of split {cfg.split!r} with features")
    fps = {s: float(pd.read_parquet(Path(params.embed.out_dir) / "manifest.parquet").set_index("id")
                    .loc[eval_ids[0], f"{s}_fps"]) for s in ("clip", "flow")}
    music_dir = Path(params.tokenize.music_dir)
    sr = params.base.sample_rate
    records: list[dict] = []

    def emit(system: str, item_id: str, make, source_id: str = "") -> None:
        t0 = time.perf_counter()
        wav_path, mp4_path = out_dir / system / f"{item_id}.wav", out_dir / system / f"{item_id}.mp4"
        rec = {"system": system, "id": item_id, "status": OK, "reason": "", "error": "", "wav_path": str(wav_path),
               "mp4_path": str(mp4_path), "source_id": source_id}
        try:
            audio, rate = make()
            n = int(round(float(rows[item_id]["duration_s"]) * rate))
            audio = fit_length(np.atleast_2d(audio), n)
            write_wav(wav_path, audio, rate)
            mux(Path(rows[item_id]["clip_path"]), audio, rate, mp4_path)
            rec["duration_s"] = n / rate
        except Exception as exc:  # noqa: BLE001 - one bad item is a failed row; the rest go on
            reason = getattr(exc, "reason", type(exc).__name__)
            rec.update(status=FAILED, reason=reason, error=str(exc)[:500], wav_path="", mp4_path="")
            log.error("generate %s/%s: %s", system, item_id, exc)
        log.debug("generate %s/%s: %.2f s", system, item_id, time.perf_counter() - t0)  # not in the DVC output
        records.append(rec)

    models = {}
    for system in cfg.systems:
        try:
            models[system] = load_model(models_dir / system / "v2m.pt", params)
        except GenerateError as exc:
            for item_id in eval_ids:
                records.append({"system": system, "id": item_id, "status": FAILED, "reason": "no_model",
                                "error": str(exc)})
    for system, model in models.items():
        torch.set_num_threads(cfg.torch_threads or max(1, os.cpu_count() or 1))
        for item_id in tqdm(eval_ids, desc=f"generate {system}", unit="clip", disable=None):
            def make(model=model, item_id=item_id):
                feats = {"clip": np.asarray(clip[item_id]), "flow": np.asarray(flow[item_id]),
                         "clip_fps": fps["clip"], "flow_fps": fps["flow"]}
                n_samples = int(round(float(rows[item_id]["duration_s"]) * model.codec.sample_rate))
                codes, starts, prompt = generate_codes(model, feats, model.codec.num_frames(n_samples), cfg,
                                                       _item_seed(seed, item_id), None, progress=False)
                wav = decode_windows(model.codec, codes, starts, prompt, n_samples, cfg.crossfade_seconds)
                return wav, model.codec.sample_rate
            emit(system, item_id, make)

    if not baselines:
        eval_ids = []
    codec = next(iter(models.values())).codec if models else _stage_codec(params)
    means = {i: _unit(np.asarray(clip[i]).mean(0)) for i in train_ids + eval_ids}
    train_matrix = np.stack([means[i] for i in train_ids]) if train_ids else None
    for item_id in tqdm(eval_ids, desc="generate baselines", unit="clip", disable=None):
        emit("reference", item_id,
             lambda i=item_id: (codec.decode(codec.encode(load_audio(music_dir / f"{i}.wav", codec.sample_rate)[0])),
                                codec.sample_rate))
        if train_matrix is None:
            continue
        nearest = train_ids[int(np.argmax(train_matrix @ means[item_id]))]
        emit("retrieval", item_id, lambda j=nearest: load_audio(music_dir / f"{j}.wav", sr, mono=False), nearest)
        rng = np.random.default_rng([seed, int(stable_hash(item_id), 16)])
        chosen = train_ids[int(rng.integers(len(train_ids)))]
        emit("random", item_id, lambda j=chosen: load_audio(music_dir / f"{j}.wav", sr, mono=False), chosen)
    frame = pd.DataFrame(records, columns=STAGE_COLUMNS)
    write_manifest(out_dir / "manifest.csv", frame.to_dict("records"), columns=STAGE_COLUMNS)
    return frame


def _item_seed(seed: int, item_id: str) -> int:
    """Per-clip seed: the same clip gets the same music whatever else is in the split."""
    return int(stable_hash(f"{seed}:{item_id}"), 16) % (2**63)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _stage_codec(params: Params):
    from pipeline import codecs

    return codecs.load_codec(params.tokenize.codec, params.tokenize)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m generate", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="video files")
    parser.add_argument("-o", "--out", type=Path, help="output file (one input) or folder")
    parser.add_argument("--model", type=Path, help="checkpoint (default: generate.model, models/v2m.pt)")
    parser.add_argument("--text", help="a text prompt (models trained with train.text: true)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: base.seed)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance (default: generate.guidance)")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy")
    parser.add_argument("--plausibility", type=float, help="with guidance, sample only tokens at least this fraction "
                        "as likely as the conditional model's first choice; 0 = all")
    parser.add_argument("--harmony-bias", type=float, help="weight of the tokens' agreement with the retrieved "
                        "harmony (models with a harmony track); 0 = none")
    parser.add_argument("--prompt-seconds", type=float, help="context carried into each next window")
    parser.add_argument("--no-cache", action="store_true", help="no KV cache (slow; for comparison)")
    parser.add_argument("--keep-audio", action="store_true", help="mix the original soundtrack under the music")
    parser.add_argument("--mix-db", type=float, help="level of the kept soundtrack vs the music (default -12)")
    parser.add_argument("--wav", action="store_true", help="write the music alone, as .wav")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stage", action="store_true", help="run the DVC stage: the eval split, every system")
    parser.add_argument("--models", type=Path, help="with --stage: folder of {system}/v2m.pt (default: train.out_dir)")
    parser.add_argument("--no-baselines", action="store_true", help="with --stage: the trained systems only")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    if args.stage:
        out_dir = args.out or Path(params.generate.out_dir)
        frame = run_stage(params, out_dir, args.models, baselines=not args.no_baselines)
        return report_rows("generate", frame, params.generate.max_fail_ratio,
                           label=lambda rec: f"{rec['system']}/{rec['id']}", suffix=f" -> {out_dir}")
    if not args.inputs or args.out is None:
        parser.error("give one or more videos and -o OUT (or --stage)")
    overrides = {k: v for k, v in {"guidance": args.cfg, "top_k": args.top_k, "temperature": args.temperature,
                                   "plausibility": args.plausibility, "harmony_bias": args.harmony_bias,
                                   "prompt_seconds": args.prompt_seconds, "mix_db": args.mix_db}.items()
                 if v is not None}
    if args.no_cache:
        overrides["use_cache"] = False
    params = dataclasses.replace(params, generate=dataclasses.replace(params.generate, **overrides))
    try:
        model = load_model(args.model or default_model(params.generate), params)
        torch.set_num_threads(params.generate.torch_threads or max(1, os.cpu_count() or 1))
        results, failures = run_files(args.inputs, args.out, model, model.params.generate,
                                      params.base.seed if args.seed is None else args.seed, args.text, args.wav,
                                      args.keep_audio)
    except GenerateError as exc:
        print(f"v2m generate: {exc}", file=sys.stderr)
        return 2
    for res in results:
        print(f"{res['input']} -> {res['output']} ({res['duration_in_s']:.2f} s, {res['windows']} window(s), "
              f"video {res['video']})")
    if failures:
        print(f"v2m generate: {len(failures)} of {len(args.inputs)} input(s) failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
