"""Per-clip scoring without pretrained models: the public API behind `v2m metrics` (cli.py), the evaluate stage and
scripts/score_checkpoint.py.

    result = score_pair(stem, generated_wav, reference_wav, video_mp4, clip_labels(row), frozenset({"chroma", ...}))
    result.values   # {"chroma": ..., "av_align": ..., "beat_f1": ..., "onset_f1": ..., "tempo_acc": ..., ...}
    result.chroma   # the ChromaScore, pooled over clips frame-weighted with chroma.pool
    result.problems # what could not be scored, and why (unreadable, silent, shorter than the reference, undefined)

Metric names `score_pair` knows: chroma, av_align, beat_f1, onset_f1, tempo_acc (with tempo_double and tempo_half),
key_acc. Ground truth (beats, tempo, key) comes from `Labels`; without them beat_f1 compares with beats estimated from
the reference audio and tempo_acc / key_acc are left out. KLD and FAD need models and are computed by the callers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.media import MediaError, load_audio, rms_db
from pipeline.metrics import av_align, chroma, rhythm

SILENCE_DB = -60.0


@dataclass
class Labels:
    """A clip's ground truth: tempo (BPM), beat times [N] (s) and key; None = unknown."""

    tempo_bpm: float | None = None
    beats: np.ndarray | None = None
    key: rhythm.Key | None = None


@dataclass
class PairResult:
    """One clip's scores: {metric: value}, the chroma score to pool, and the problems met (by name and reason)."""

    stem: str
    values: dict = field(default_factory=dict)
    chroma: chroma.ChromaScore | None = None
    problems: list[str] = field(default_factory=list)


def parse_beats(text) -> np.ndarray | None:
    """Beat times [N] (s, sorted) from a JSON list or ';'-separated seconds; None when empty or missing."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return None
    text = str(text).strip()
    values = json.loads(text) if text.startswith("[") else [t for t in text.split(";") if t.strip()]
    return np.asarray(sorted(float(v) for v in values), dtype=np.float64)


def clip_labels(row: dict) -> Labels:
    """The scoring labels (tempo, beats, key) of one ingest manifest row (SynthV2M label columns; absent or empty
    ones are None)."""
    import pandas as pd

    tempo, key = row.get("tempo_bpm"), str(row.get("key") or "")
    return Labels(tempo_bpm=float(tempo) if tempo not in (None, "") and not pd.isna(tempo) else None,
                  beats=parse_beats(row.get("beat_times")),
                  key=rhythm.parse_key(key, str(row.get("mode") or "major")) if key else None)


def default_flow_cache() -> Path:
    """Where AV-Align keeps each video's flow trajectory: $V2M_CACHE_DIR/av_align_flow, else
    $XDG_CACHE_HOME/v2m/av_align_flow (~/.cache/v2m/av_align_flow)."""
    base = os.environ.get("V2M_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "v2m"
    return Path(base) / "av_align_flow"


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Audio [C, N] at its own rate; `MediaError` when it cannot be decoded or holds no samples."""
    try:
        audio, sr = load_audio(path, mono=False)
    except sf.SoundFileError as exc:  # load_audio reads .wav with soundfile directly
        raise MediaError(path, f"audio cannot be decoded ({exc})") from None
    if audio.shape[-1] == 0:
        raise MediaError(path, "no audio samples", "empty")
    return audio, sr


def mono_at(audio: np.ndarray, sr: int, target: int) -> np.ndarray:
    """[C, N] audio at `sr` -> mono [M] at `target` (channel mean, soxr_hq), as the reference implementations."""
    import librosa

    y = audio.mean(axis=0)  # audiocraft's convert_audio and librosa.to_mono both average the channels
    return y if sr == target else librosa.resample(y, orig_sr=sr, target_sr=target, res_type="soxr_hq")


def score_pair(stem: str, generated: Path, reference: Path, video: Path | None, labels: Labels | None,
               wanted: frozenset[str], flow_cache: Path | None = None) -> PairResult:
    """All per-clip metrics that need no pretrained model, for one stem.

    Args:
        stem: the clip's name, kept in the result.
        generated, reference: audio files (any format FFmpeg reads); the generated audio is cut to the reference's
            length for beats, tempo, onsets and key, and zero-padded (chroma) when shorter, which is a problem.
        video: the clip's video for av_align (None: not scored).
        labels: ground truth, or None (beats then estimated from the reference; tempo and key not scored).
        wanted: the metric names to compute.
        flow_cache: folder for AV-Align's per-video flow (None: recomputed).

    Returns:
        A PairResult; an unreadable file gives no values and an "unreadable: ..." problem.
    """
    result = PairResult(stem)
    try:
        gen, gen_sr = read_audio(generated)
        ref, ref_sr = read_audio(reference)
    except MediaError as exc:
        result.problems.append(f"unreadable: {exc}")
        return result
    for name, audio, path in (("generated", gen, generated), ("reference", ref, reference)):
        if rms_db(audio) < SILENCE_DB:
            result.problems.append(f"silent {name} audio ({rms_db(audio):.0f} dBFS): {path}")
    ref_seconds = ref.shape[-1] / ref_sr
    if gen.shape[-1] / gen_sr < ref_seconds - 0.05:
        result.problems.append(f"generated is shorter than the reference ({gen.shape[-1] / gen_sr:.2f} s < "
                               f"{ref_seconds:.2f} s): zero-padded for chroma and kld")
    gen_cut = gen[:, : int(round(ref_seconds * gen_sr))]
    values = result.values

    if "chroma" in wanted:
        result.chroma = chroma.chroma_cosine_clip(mono_at(gen, gen_sr, chroma.SAMPLE_RATE),
                                                  mono_at(ref, ref_sr, chroma.SAMPLE_RATE))
        values["chroma"] = result.chroma.value
    if "av_align" in wanted and video is not None:
        try:
            score = av_align.av_align(av_align.video_peaks(video, flow_cache), gen, gen_sr)
        except MediaError as exc:
            result.problems.append(f"av_align: {exc}")
        else:
            if math.isnan(score):
                result.problems.append("av_align undefined: no audio onsets and no video peaks")
            else:
                values["av_align"] = score
    if wanted & {"beat_f1", "tempo_acc", "tempo_double", "tempo_half"}:
        tempo, beats = rhythm.estimate_beats(gen_cut, gen_sr)
        ref_beats = labels.beats if labels is not None else rhythm.estimate_beats(ref, ref_sr)[1]
        if "beat_f1" in wanted and ref_beats is not None:
            f1 = rhythm.beat_f1(beats, ref_beats)
            if math.isnan(f1):
                result.problems.append("beat_f1 undefined: the reference has no beats")
            else:
                values["beat_f1"] = f1
        if labels is not None and labels.tempo_bpm:
            acc = rhythm.tempo_accuracy(tempo, labels.tempo_bpm)
            values.update(tempo_acc=float(acc.correct), tempo_double=float(acc.double), tempo_half=float(acc.half))
    if "onset_f1" in wanted:
        f1 = rhythm.onset_f1(rhythm.estimate_onsets(gen_cut, gen_sr), rhythm.estimate_onsets(ref, ref_sr))
        if math.isnan(f1):
            result.problems.append("onset_f1 undefined: the reference has no onsets")
        else:
            values["onset_f1"] = f1
    if "key_acc" in wanted and labels is not None and labels.key is not None:
        try:
            values["key_acc"] = rhythm.key_accuracy(rhythm.estimate_key(gen_cut, gen_sr), labels.key)
        except ValueError as exc:
            values["key_acc"] = 0.0
            result.problems.append(f"key_acc: {exc} (scored 0)")
    return result
