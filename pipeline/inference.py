"""The inference library: music for any video from a trained checkpoint. The generate stage, `v2m generate` and the
benchmarks call it; it reads no params file and writes only the output it is asked for.

    model = load_model("models/v2m.pt", params)               # the checkpoint, its codec and its training params
    feats = video_features(model, video, scratch)              # CLIP + flow streams, as embed computes them
    windows = generate_codes(model, feats, n_frames, params.generate, seed)  # WindowCodes: tokens, window by window
    music = decode_windows(model.codec, windows, n_samples)
    mux(video, music[None], model.codec.sample_rate, out)      # or generate_one(model, video, out, ...) for all of it

Any video ingest reads (any container, resolution, rotation or frame rate) is normalised exactly as ingest normalises a
clip (`pipeline.media.normalise_video`: `base.fps`, `ingest.short_side`, rotation applied) into a scratch file, and
its CLIP and flow streams are computed by the embed stage's encoders (`pipeline.encoders.streams.Encoders`) with the
checkpoint's own `embed` params, so the model sees what it was trained on. The checkpoint records base/embed/tokenize
params; relative paths in them (encoders, fitted codec) are looked up from the working directory, then from the
checkpoint's folder upwards.

Long videos. The model's window is `base.clip_seconds` (its training clips). Past it, windows overlap by
`generate.prompt_seconds`: window i starts where window i-1's last `prompt_seconds` start. Of that overlap, all but
the last `crossfade_seconds` are its prompt (window i-1's tokens, forced, prefilled through the KV cache in one pass);
from there on it writes its own tokens, seeing the video of its own span, so the last `crossfade_seconds` of window
i-1 are written twice. Each window's tokens are decoded on their own and the two windows' audio is crossfaded (raised
cosine) over those frames. Why: a window's first own token, following a prompt it did not write, changes more often
than the tokens inside a window (0.65 against 0.45), a small attack at every seam; under the crossfade it comes in at
no gain (docs/generate.md, "Seams"). VidMuse keeps 0.5 s of context across windows; the default here is half the
window (4 s of an 8 s window).

Output: the input's video stream copied untouched (no re-encode) when the output container can hold its codec
(H.264/HEVC/AV1/VP9 in mp4 or mov, VP8/VP9/AV1 in webm, anything in mkv), else re-encoded (H.264, or VP9 for webm),
which the log says; plus the music (AAC; Opus in webm). The music lasts as long as the video stream, so the output's
duration equals the input's within one frame. A problem with one input or output is a `GenerateError` or a
`MediaError` whose message names the file; every file is written under a temporary name and renamed.
Deterministic for a fixed seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import codecs
from pipeline.config import GenerateConfig, Params, params_from_dict, to_dict, upgrade
from pipeline.encoders.streams import Encoders
from pipeline.encoders.text import caption_embeddings
from pipeline.media import (
    X264_ARGS,
    MediaError,
    load_audio,
    normalise_video,
    probe,
    run_ffmpeg,
    stored_frame_count,
    video_duration,
    write_wav,
)
from pipeline.model import V2M, ModelConfig, key_agreement
from pipeline.runtime import resolve_device, set_threads
from pipeline.shards import Item, atomic_path

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
DECODE_MARGIN_S = 0.12  # decoded before each crossfade, so the decoder's edge effects never reach the mix


class GenerateError(RuntimeError):
    """A problem with one input or output; its message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# temporary files: owned by this process, removed on exit and signals, and after a crash by the next run
# ----------------------------------------------------------------------------------------------------------------------

def _owner() -> str:
    """This process, as it appears in its temporary names: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _dead(owner: str) -> bool:
    """Whether the process named by `_owner()` ran on this host and has ended (only then is its temp ours to remove)."""
    host, _, pid = owner.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


SCRATCH_RE = re.compile(r"^v2m-(?:generate|mux)-(?P<owner>.+-\d+)-[a-z0-9_]{8}$")
OUTPUT_TEMP_RE = re.compile(r"^\.\.?(?P<stem>.+)\.v2m-(?P<owner>.+?-\d+)\.tmp(?:\.|$)")


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A scratch folder in $TMPDIR named after this process (`v2m-{kind}-{host}-{pid}-xxxxxxxx`), removed on exit."""
    return tempfile.TemporaryDirectory(prefix=f"v2m-{kind}-{_owner()}-")


@contextlib.contextmanager
def owned_output(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` (`.{stem}.v2m-{host}-{pid}.tmp{suffix}`, same container) renamed to `dest` on
    success and removed on any exception; a killed process's is removed by the next `clean_stale_temps`."""
    tmp = dest.with_name(f".{dest.stem}.v2m-{_owner()}.tmp{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_own_scratch() -> int:
    """Remove this process's own scratch folders in $TMPDIR: what a signal landing mid-cleanup (an ffmpeg child still
    writing while its folder is removed) could leave. `v2m generate` calls it on its way out. Returns the count."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"v2m-*-{_owner()}-*"):
        if (m := SCRATCH_RE.match(path.name)) and m["owner"] == _owner() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def clean_stale_temps(folders: list[Path]) -> int:
    """Remove what killed `v2m generate` runs of this host left: their scratch folders in $TMPDIR and their temporary
    outputs in `folders`. Only names this module makes, and only of processes that no longer run. Returns the count."""
    removed = 0
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob("v2m-*-*"):
        if (m := SCRATCH_RE.match(path.name)) and path.is_dir() and path.stat().st_uid == os.getuid() \
                and _dead(m["owner"]):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    for folder in {f for f in folders if f.is_dir()}:
        for path in folder.glob(".*.v2m-*.tmp*"):
            if (m := OUTPUT_TEMP_RE.match(path.name)) and path.is_file() and _dead(m["owner"]):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) or folder(s) of earlier generate runs that were killed", removed)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# the model and what it was trained with
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Model:
    """A trained checkpoint ready to generate: the network, its codec, the params its inputs were made with."""

    path: Path
    net: V2M
    system: str
    params: Params  # base, embed, tokenize as trained; the rest from params.yaml
    codec: object  # pipeline.codecs.Codec
    device: torch.device
    encoders: Encoders | None = None  # built on first use

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
    """`generate.model`, or models/full/v2m.pt when that is missing and this one is there."""
    path = Path(cfg.model)
    if not path.exists() and Path("models/full/v2m.pt").exists():
        log.info("%s not found; using models/full/v2m.pt", path)
        return Path("models/full/v2m.pt")
    return path


def load_model(path: str | Path, params: Params | None = None) -> Model:
    """A checkpoint written by the train stage, with its codec and the params its inputs were made with."""
    path, params = Path(path), params or Params()
    if not path.is_file():
        raise GenerateError(f"{path}: no such model checkpoint (train one with `v2m train`, or pass --model)")
    try:  # weights_only: a checkpoint is data (plain types and tensors); one that needs code to load is refused
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["config"]
        net = V2M(ModelConfig.from_dict(config))
        net.load_state_dict(ckpt["model"])
    except Exception as exc:  # noqa: BLE001 - any unreadable or foreign file gets the same one-line answer
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise GenerateError(f"{path}: not a v2m checkpoint ({type(exc).__name__}: {why})") from None
    merged = to_dict(params)
    for section, values in upgrade(ckpt.get("params") or {}).items():  # older checkpoints: older names
        merged[section] = values
    params = params_from_dict(merged, f"{path} (params)")
    embed = dataclasses.replace(params.embed, encoders_dir=_resolve(params.embed.encoders_dir, path))
    tokenize = dataclasses.replace(params.tokenize, model_dir=_resolve(params.tokenize.model_dir, path))
    params = dataclasses.replace(params, embed=embed, tokenize=tokenize)
    device = torch.device(resolve_device(params.generate.device))
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
    return caption_embeddings([{"id": "prompt", "caption": text}])["prompt"]


def prompt_timbre(model: Model, text: str | None) -> int | None:
    """The index of the one instrument of the model's timbre tables (`ModelConfig.timbres`: the text system's) that
    the prompt names, as a whole word in any case; its table then scores the tokens for the harmony bias. None when
    the prompt names none of them or several, or the model has no such tables."""
    names = model.net.cfg.timbres
    if not text or not names:
        return None
    named = [i for i, name in enumerate(names) if re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE)]
    return named[0] if len(named) == 1 else None


# ----------------------------------------------------------------------------------------------------------------------
# features on the fly
# ----------------------------------------------------------------------------------------------------------------------

def video_features(model: Model, path: Path, scratch: Path) -> dict:
    """CLIP and flow streams of any video, computed as the embed stage computes them on an ingested clip."""
    info = probe(path)
    if not info.has_video:
        raise MediaError(path, "no video stream (an audio file?)", "no_video")
    duration, native_fps = video_duration(path)  # of the video stream: what is normalised and checked
    limit = model.params.generate.max_duration_s
    if max(duration, info.duration_s) > limit:
        raise GenerateError(f"{path}: {max(duration, info.duration_s) / 60:.1f} min is longer than "
                            f"generate.max_duration_s ({limit:g} s); cut it (ffmpeg -t) or raise the limit")
    base = model.params.base
    n_frames = max(1, int(math.floor(duration * base.fps + 1e-6)))
    clip, cfg = scratch / "normalised.mp4", model.params.ingest
    normalise_video(path, clip, n_frames, base.fps, cfg.short_side, cfg.video_crf, cfg.video_preset)
    got = stored_frame_count(clip)
    if got < n_frames - 1:
        raise MediaError(path, f"decoded only {got / base.fps:.2f} s of the {duration:.2f} s its header promises "
                         "(truncated or damaged file)")
    set_threads(model.params.generate.threads)
    if model.encoders is None:
        model.encoders = Encoders(model.params.embed, str(model.device))
    clip_rows, clip_meta = model.encoders.clip_streamed(clip)  # a chunk of frames in memory at a time
    flow_rows, flow_meta = model.encoders.flow_streamed(clip)
    feats = {"clip": clip_rows, "clip_fps": clip_meta["fps"], "flow": flow_rows, "flow_fps": flow_meta["fps"],
             "video_duration_s": duration, "fps": native_fps, "info": info,
             "duration_s": max(duration, info.duration_s)}  # the music: as long as the input (a longer audio too)
    if model.net.cfg.scene_dim:  # the scene stream: the timbre's cue
        feats["scene"], meta = model.encoders.scene_streamed(clip)
        feats["scene_fps"] = meta["fps"]
    if model.net.cfg.fusion.mode == "spatial":  # the spatial-fusion ablation also reads the CLIP patch embeddings
        feats["patch"], meta = model.encoders.patch(Item(path.name, "", str(clip)))
        feats["patch_fps"] = meta["fps"]
    return feats


def rows_at(rows: np.ndarray, fps: float, start_s: float, seconds: float) -> np.ndarray:
    """A stream's rows at start_s + k / fps for k < ceil(seconds * fps): linear interpolation, clamped at the ends
    (exact rows when start_s falls on the stream's grid)."""
    n = max(1, math.ceil(seconds * fps - 1e-6))
    pos = np.clip(start_s * fps + np.arange(n), 0, len(rows) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(rows) - 1)
    w = (pos - lo)[:, None].astype(np.float32)
    return ((1 - w) * rows[lo] + w * rows[hi]).astype(np.float32)


def window_batch(feats: dict, start_s: float, seconds: float, text: np.ndarray | None, device,
                 timbre: int | None = None) -> dict:
    """The model's batch (B = 1) for the window [start_s, start_s + seconds), its times counted from the start;
    with `timbre`, the instrument table the harmony bias uses (batch["timbre"])."""
    batch = {}
    for stream in ("clip", "flow", "scene", "patch"):  # scene: models with scene_dim; patch: the spatial ablation
        if stream not in feats:
            continue
        rows = torch.from_numpy(rows_at(feats[stream], feats[f"{stream}_fps"], start_s, seconds))[None]
        batch[stream], batch[f"{stream}_mask"] = rows, torch.ones(rows.shape[:2], dtype=torch.bool)
        batch[f"{stream}_fps"] = torch.tensor([float(feats[f"{stream}_fps"])])
    # the whole video's CLIP rows: the long-term context of the VidMuse-style baseline (the others do not read it)
    batch["long_clip"] = torch.from_numpy(np.array(feats["clip"], np.float32))[None]
    batch["long_clip_mask"] = torch.ones(batch["long_clip"].shape[:2], dtype=torch.bool)
    if text is not None:
        batch["text"], batch["text_mask"] = torch.from_numpy(text[None]), torch.tensor([True])
    if timbre is not None:
        batch["timbre"] = torch.tensor([timbre])
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


@dataclass(frozen=True)
class WindowCodes:
    """The music of a video as tokens, window by window (`generate_codes`), for `decode_windows`.

    codes [K, T]: the music as one stream (window i's own tokens from starts[i] + given on, after window i-1's);
    starts: each window's first frame; given: frames of each later window taken from the one before (its prompt);
    overlap: the frames after those that both windows write (window i-1's last ones), over which their audio is
    crossfaded; tails[i - 1] [K, overlap]: window i-1's tokens there (codes holds window i's)."""

    codes: np.ndarray
    starts: list[int]
    given: int = 0
    overlap: int = 0
    tails: tuple[np.ndarray, ...] = ()

    def seams(self) -> list[tuple[int, int]]:
        """Frames [first, end) of each crossfade: where window i's own tokens start and window i-1's end."""
        return [(s + self.given, s + self.given + self.overlap) for s in self.starts[1:]]


def window_plan(model: Model, cfg: GenerateConfig) -> tuple[int, int, int]:
    """(window, given, overlap) in frames for `cfg` (see WindowCodes); GenerateError when they do not fit."""
    fr = model.frame_rate
    window = max(1, int(round(model.params.base.clip_seconds * fr)))
    prompt = max(0, int(round(cfg.prompt_seconds * fr)))
    if window - prompt < fr:
        raise GenerateError(f"generate.prompt_seconds {cfg.prompt_seconds:g} must leave at least 1 s of the model's "
                            f"{window / fr:g} s window")
    if not prompt:
        return window, 0, 0  # windows one after the other: nothing to continue, nothing to crossfade
    overlap = max(1, int(round(cfg.crossfade_seconds * fr)))
    if overlap >= prompt:
        raise GenerateError(f"generate.crossfade_seconds {cfg.crossfade_seconds:g} must be shorter than "
                            f"generate.prompt_seconds {cfg.prompt_seconds:g}: a window continues the music before its "
                            "crossfade")
    return window, prompt - overlap, overlap


def generate_codes(model: Model, feats: dict, n_frames: int, cfg: GenerateConfig, seed: int,
                   text: np.ndarray | None = None, progress: bool = True, timbre: int | None = None) -> WindowCodes:
    """The music [K, n_frames] of the whole video as tokens, window by window (`WindowCodes`). `text`: the prompt's
    embedding (`text_embedding`); `timbre`: the instrument it names (`prompt_timbre`), whose token chroma table the
    harmony bias then uses. Each window keeps the best of `cfg.candidates` draws by the retrieved key (`pick_draw`;
    models with a harmony bank, and not when the prompt names an instrument: one draw there)."""
    fr = model.frame_rate
    window, given, overlap = window_plan(model, cfg)
    sampling = cfg.sampling
    if sampling.problem("generate.sampling"):
        raise GenerateError(sampling.problem("generate.sampling"))
    bias = sampling.harmony_bias if model.net.has_token_chroma() else 0.0
    guard = sampling.mode_guard if model.net.has_token_chroma() else 0.0
    if (sampling.harmony_bias or sampling.mode_guard) and not model.net.has_token_chroma():
        _warn_once(f"generate.sampling.harmony_bias {sampling.harmony_bias:g} and mode_guard "
                   f"{sampling.mode_guard:g} not applied: the model has no token "
                   "chroma table (trained without harmony_track, or before the table existed: retrain to use it)")
    if cfg.candidates < 1:
        raise GenerateError(f"generate.candidates {cfg.candidates} must be >= 1 (1 = a single draw)")
    # a prompt that names an instrument asks for a timbre the scene does not show: the draws are not chosen by the
    # scene's key there (it cost the ablation group's text steering a clip or two of instrument accuracy per seed)
    draws = cfg.candidates if model.net.harmony is not None and timbre is None else 1
    if cfg.candidates > 1 and model.net.harmony is None:
        _warn_once(f"generate.candidates {cfg.candidates} not applied: the model has no harmony bank to rank the "
                   "draws by (trained with harmony_knn: 0); one draw per window")
    starts = plan_windows(n_frames, window, given + overlap)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    codes = torch.zeros(model.net.cfg.decoder.num_codebooks, 0, dtype=torch.long, device=model.device)
    tails = []
    for i, start in enumerate(tqdm(starts, desc="windows", unit="win", leave=False, disable=not progress or None)):
        n = min(window, n_frames - start)
        batch = window_batch(feats, start / fr, n / fr, text, model.device, timbre)
        prompt = codes[None, :, start : start + given] if i else None
        if draws > 1:  # the window's draws side by side, one batch
            batch = {k: v.repeat(draws, *[1] * (v.dim() - 1)) for k, v in batch.items()}
            prompt = None if prompt is None else prompt.repeat(draws, 1, 1)
        out = model.net.generate(batch, n, sampling.guidance, sampling.temperature, sampling.top_k, gen, cfg.use_cache,
                                 prompt, sampling.plausibility, bias, guard)
        if i and overlap:  # window i-1's own last frames, which window i writes again
            tails.append(codes[:, start + given : start + given + overlap].cpu().numpy())
        codes = torch.cat([codes[:, :start], out[pick_draw(model, batch, out) if draws > 1 else 0]], dim=1)
    if len(starts) == 1:
        given = overlap = 0
    return WindowCodes(codes.cpu().numpy(), starts, given, overlap, tuple(tails))


def pick_draw(model: Model, batch: dict, draws: torch.Tensor) -> int:
    """Which of a window's draws (D, K, n) to keep: the one whose music reads most surely as the key the model
    retrieved from the window's video and, for a model that sees motion, moves at the tempo the video moves at. Each
    draw is decoded by the codec (the music as it will sound: melvq's audio without Griffin-Lim reads as another key
    for 6 of the 40 val + test clips' true tokens), its CQT chroma profile taken (`rhythm.chroma_profile`, what the
    key metric reads) and scored by `harmony.key_agreement` with the harmony bank's profile for the window (the same
    for every draw); a draw whose tracked tempo (`rhythm.estimate_beats`) is within 4 % of the video's (`video_tempo`)
    gains TEMPO_MATCH. Ties and silent draws go to the first. The score uses the video and the draws only, never a
    label (docs/generate.md, "Candidates"). The kept draw's audio is remembered, so that `decode_windows` does not
    decode a one-window video twice."""
    from pipeline.metrics.rhythm import chroma_profile, estimate_beats

    with torch.no_grad():
        retrieved, _ = model.net.harmony(batch["clip"][:1], batch["clip_mask"][:1])
    seen = video_tempo(model, batch)
    scores, audio = [], []
    for codes in draws.cpu().numpy():
        audio.append(model.codec.decode(codes))
        try:
            heard = chroma_profile(audio[-1], model.codec.sample_rate)
        except ValueError:  # digital silence has no key
            scores.append(float("-inf"))
            continue
        score = float(key_agreement(retrieved.cpu(), torch.from_numpy(heard)[None])[0])
        if seen is not None:
            bpm = estimate_beats(audio[-1], model.codec.sample_rate)[0]
            score += TEMPO_MATCH * float(abs(bpm - seen) <= TEMPO_TOLERANCE * seen)
        scores.append(score)
    best = max(range(len(scores)), key=lambda d: (scores[d], -d))
    _DECODED.clear()
    _DECODED[_decode_key(model.codec, draws[best].cpu().numpy())] = audio[best]
    return best


# `pick_draw`: what a draw whose tempo matches the video's gains, against key agreement in [0, 1] (on the demo's model,
# val + test: tempo 0.85 -> 0.975, beat F1 0.880 -> 0.926, key 0.925 -> 0.925; docs/generate.md, "Candidates")
TEMPO_MATCH = 0.5
TEMPO_TOLERANCE = 0.04  # the tempo metric's (MIREX Acc1)


def video_tempo(model: Model, batch: dict) -> float | None:
    """The tempo (BPM) the window's motion shows, for a model that sees motion (None for the others: the no_motion
    ablation must not get it from here): librosa's beat tracker on the flow rows' mean speed (`flow.mean_speed`), the
    tempo of the tracked beats (`rhythm.tempo_from_beats`). On SynthV2M it is the labelled tempo for all of 101 clips
    checked (within 4 %, no octave error). None when the window has too few flow rows to track."""
    import librosa

    from pipeline.encoders.flow import mean_speed
    from pipeline.metrics.rhythm import tempo_from_beats

    flow_cfg = model.params.embed.flow
    if (not model.net.cfg.fusion.use_motion or batch.get("flow") is None
            or batch["flow"].shape[-1] != flow_cfg.grid ** 2 * (flow_cfg.direction_bins + 2)):
        return None  # no motion seen, or rows that are not the embed stage's flow descriptor
    speed = mean_speed(batch["flow"][0].cpu().numpy(), flow_cfg).astype(np.float64)
    fps = float(batch["flow_fps"][0])
    if len(speed) < 4 * fps or not np.isfinite(speed).all() or speed.max() <= 0:
        return None
    tempo, beats = librosa.beat.beat_track(onset_envelope=speed, sr=fps, hop_length=1, units="time")
    bpm = tempo_from_beats(beats, float(np.atleast_1d(tempo)[0]))
    return bpm if bpm > 0 else None


# the last kept draw's audio (one entry): generate_codes decodes every draw to choose one, decode_windows would decode
# the kept one again
_DECODED: dict[tuple, np.ndarray] = {}


def _decode_key(codec, codes: np.ndarray) -> tuple:
    return id(codec), codes.shape, np.ascontiguousarray(codes, dtype=np.int64).tobytes()


def decode_windows(codec, windows: WindowCodes, n_samples: int) -> np.ndarray:
    """Audio [n_samples] of `windows` (`generate_codes`): each window's tokens decoded on their own, from a little
    before its crossfade (DECODE_MARGIN_S, so the decoder's edge effects never reach the mix) to its end, and
    consecutive windows crossfaded (raised cosine) over the frames both wrote. One window, or windows that do not
    overlap, are decoded as one stream."""
    codes, hop, fr = windows.codes, codec.hop_length, codec.frame_rate
    T = codes.shape[1]
    if len(windows.starts) == 1 or not windows.overlap:
        wav = _DECODED.pop(_decode_key(codec, codes), None)  # the kept draw, already decoded to choose it
        wav = codec.decode(codes) if wav is None else wav
    else:
        margin, m = int(math.ceil(DECODE_MARGIN_S * fr)), windows.overlap
        seams = windows.seams()
        wav = np.zeros(T * hop, np.float32)
        for i, start in enumerate(windows.starts):
            lo = max(start, seams[i - 1][0] - margin) if i else 0
            end = seams[i][1] if i < len(seams) else T
            tokens = codes[:, lo:end]
            if i < len(seams):  # its own last frames, which the next window wrote again in `codes`
                tokens = np.concatenate([codes[:, lo : seams[i][0]], windows.tails[i]], axis=1)
            part = codec.decode(tokens).astype(np.float32)[: (end - lo) * hop]
            t = lo + (np.arange(len(part)) + 0.5) / hop  # in frames
            gain = np.ones(len(part), np.float32)
            if i:
                gain *= _ramp((t - seams[i - 1][0]) / m)
            if i < len(seams):
                gain *= 1 - _ramp((t - seams[i][0]) / m)
            wav[lo * hop : lo * hop + len(part)] += gain * part
    wav = np.asarray(wav, np.float32)[:n_samples]
    return np.pad(wav, (0, n_samples - len(wav)))


def _ramp(x: np.ndarray) -> np.ndarray:
    """Raised-cosine fade-in over x in [0, 1] (0 before, 1 after); with its complement it sums to 1."""
    return np.sin(0.5 * np.pi * np.clip(x, 0.0, 1.0)) ** 2


# ----------------------------------------------------------------------------------------------------------------------
# output files
# ----------------------------------------------------------------------------------------------------------------------

def mux(video: Path, audio: np.ndarray, sample_rate: int, out: Path, name: Path | None = None) -> str:
    """Write `out`: video's first video stream (copied when `out`'s container takes its codec) + audio [C, N].
    `name`: the path errors name (the final output, when `out` is a temporary name). Returns "copy" or "re-encode"."""
    suffix = out.suffix.lower()
    codec = probe(video).video_codec
    allowed = COPYABLE.get(suffix, set())
    modes = ["copy", "re-encode"] if allowed is None or codec in allowed else ["re-encode"]
    if modes == ["re-encode"]:
        log.warning("%s: its %s video cannot go into %s: re-encoding the video", video, codec, suffix)
    audio_args = ["-c:a", "libopus", "-b:a", "128k", "-ar", "48000"] if suffix == ".webm" else \
        ["-c:a", "aac", "-b:a", "160k"]
    with atomic_path(out) as tmp, scratch_dir("mux") as scratch:
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
                run_ffmpeg([*args, str(tmp)], name or out, reason="mux")
                break
            except MediaError as exc:
                if mode != "copy":
                    raise
                log.warning("%s: stream copy into %s failed (%s): re-encoding the video", video, suffix, exc)
    return mode


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


# ----------------------------------------------------------------------------------------------------------------------
# music for one video
# ----------------------------------------------------------------------------------------------------------------------

def generate_one(model: Model, src: Path, dest: Path, cfg: GenerateConfig, seed: int, text: np.ndarray | None,
                 wav_only: bool = False, keep_audio: bool = False, progress: bool = True,
                 timbre: int | None = None) -> dict:
    """Music for one video, written to `dest`; returns what was done (durations, windows, copy or re-encode)."""
    check_writable(dest, wav_only)
    clean_stale_temps([dest.parent])
    t0 = time.perf_counter()
    with scratch_dir("generate") as scratch, owned_output(dest) as tmp:
        feats = video_features(model, src, Path(scratch))
        sr = model.codec.sample_rate
        n_samples = int(round(feats["duration_s"] * sr))
        n_frames = model.codec.num_frames(n_samples)
        windows = generate_codes(model, feats, n_frames, cfg, seed, text, progress, timbre)
        music = decode_windows(model.codec, windows, n_samples)
        audio = music[None]
        if keep_audio and feats["info"].has_audio:
            original, _ = load_audio(src, sr, mono=False)
            original = np.pad(original[:, :n_samples], ((0, 0), (0, max(0, n_samples - original.shape[1]))))
            audio = music[None] + 10 ** (cfg.mix_db / 20) * original
            audio /= max(1.0, float(np.abs(audio).max()) / 0.99)
        elif keep_audio:
            log.warning("%s: no audio stream to keep; the music alone", src)
        if wav_only:
            write_wav(tmp, audio, sr)
            mode = "wav"
        else:
            mode = mux(src, audio, sr, tmp, name=dest)
    return {"input": str(src), "output": str(dest), "duration_in_s": feats["duration_s"],
            "windows": len(windows.starts), "prompt_s": windows.given / model.frame_rate,
            "crossfade_s": windows.overlap / model.frame_rate, "video": mode, "codes": windows.codes,
            "seconds": time.perf_counter() - t0}
