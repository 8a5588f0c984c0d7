"""Codec round trip: encode -> decode vs the original, scored with the project's metrics (pipeline/metrics).

Per clip: chroma cosine (audiocraft's definition, mono 32 kHz: `metrics.chroma`), beat F1 of the reconstruction's
tracked beats against the labelled beats (SynthV2M) or, without labels, against the beats tracked on the original,
and onset F1 of the reconstruction's onsets against the original's (`metrics.rhythm`, 70 ms / 50 ms windows). Chroma
is pooled over all frames of all clips (as audiocraft does), beat and onset F1 are means over clips. With labelled
beats, `beat_f1_original` is the beat tracker's own score on the original: the ceiling for `beat_f1`.

`report` writes metrics/codec.json and the spectrogram figure for the tokenize stage, and skips the work when the
codec state, the clips and the settings are those of the last report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.codecs import Codec
from pipeline.config import TokenizeConfig, to_dict
from pipeline.media import MediaError, load_audio
from pipeline.metrics import chroma, rhythm
from pipeline.shards import OK, FeatureStore, atomic_path, atomic_write_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aac"}


def score_clip(original: np.ndarray, decoded: np.ndarray, sample_rate: int, beats: np.ndarray | None) -> dict:
    """Metrics of one round trip: mono [N] original and decoded audio at `sample_rate`; `beats`: labelled times."""
    decoded = chroma.fit_to_reference(decoded, len(original)).astype(np.float32)
    a, b = original, decoded
    if sample_rate != chroma.SAMPLE_RATE:
        import librosa

        a, b = (librosa.resample(x, orig_sr=sample_rate, target_sr=chroma.SAMPLE_RATE) for x in (original, decoded))
    score = chroma.chroma_cosine_clip(b, a, chroma.SAMPLE_RATE)
    out = {"chroma_sum": score.cosine_sum, "chroma_frames": score.frames}
    tracked = rhythm.estimate_beats(original, sample_rate)[1]
    reference = beats if beats is not None and len(beats) else tracked
    out["beat_f1"] = rhythm.beat_f1(rhythm.estimate_beats(decoded, sample_rate)[1], reference)
    if beats is not None and len(beats):
        out["beat_f1_original"] = rhythm.beat_f1(tracked, reference)
    out["onset_f1"] = rhythm.onset_f1(rhythm.estimate_onsets(decoded, sample_rate),
                                      rhythm.estimate_onsets(original, sample_rate))
    return out


def measure(codec: Codec, clips: list[dict]) -> tuple[dict, dict]:
    """Round trip of clips {id, audio [N], beats (or None), codes [K, T] (or None: encoded here)}.

    Returns (pooled metrics, timing {encode_s, decode_s, audio_s}); the decoded audio goes back into each clip.
    """
    per_clip, timing = [], {"encode_s": 0.0, "decode_s": 0.0, "audio_s": 0.0}
    for clip in clips:
        started = time.perf_counter()
        codes = codec.encode(clip["audio"])
        timing["encode_s"] += time.perf_counter() - started
        if clip.get("codes") is not None and not np.array_equal(clip["codes"], codes):
            log.warning("%s: re-encoding gives other codes than the store holds", clip["id"])
        started = time.perf_counter()
        clip["decoded"] = codec.decode(codes if clip.get("codes") is None else clip["codes"])
        timing["decode_s"] += time.perf_counter() - started
        timing["audio_s"] += len(clip["audio"]) / codec.sample_rate
        per_clip.append(score_clip(clip["audio"], clip["decoded"], codec.sample_rate, clip.get("beats")))
    frames = sum(c["chroma_frames"] for c in per_clip)
    pooled = {"chroma": sum(c["chroma_sum"] for c in per_clip) / frames if frames else float("nan")}
    for key in ("beat_f1", "onset_f1", "beat_f1_original"):
        values = [c[key] for c in per_clip if key in c and not math.isnan(c[key])]
        if values:
            pooled[key] = float(np.mean(values))
    pooled.update(clips=len(clips), seconds=round(timing["audio_s"], 2))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in pooled.items()}, timing


def eval_clips(manifest: pd.DataFrame, store: FeatureStore, split: str, max_clips: int, sample_rate: int) -> list:
    """The first `max_clips` ok tracks of `split` (sorted ids), with their stored codes and labelled beats."""
    rows = manifest[(manifest["status"] == OK) & (manifest["split"] == split)].sort_values("id").head(max_clips)
    tokens = store.load(list(rows["id"])) if len(rows) else {}
    clips = []
    for row in rows.to_dict("records"):
        beats = row.get("beat_times")
        beats = np.asarray(json.loads(beats), float) if isinstance(beats, str) and beats.strip() else None
        audio = load_audio(row["music_path"], sample_rate)[0][0]
        clips.append({"id": row["id"], "audio": audio, "beats": beats, "codes": np.asarray(tokens[row["id"]]).T,
                      "hash": row.get("music_sha256", "")})
    return clips


def real_tracks(folder: Path, max_seconds: float, sample_rate: int) -> tuple[list, str]:
    """(clips, "") from the audio files in `folder` (first `max_seconds` each), or ([], the reason there are none)."""
    if not folder.is_dir():
        return [], f"{folder}: no such folder"
    clips = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS):
        try:
            audio = load_audio(path, sample_rate, duration_s=max_seconds)[0][0]
        except MediaError as exc:
            log.warning("tokenize: real track left out: %s", exc)
            continue
        clips.append({"id": path.name, "audio": audio, "beats": None, "hash": sha256_file(path)})
    return clips, "" if clips else f"{folder}: no readable audio files"


def report(codec: Codec, encoder_hash: str, manifest: pd.DataFrame, store: FeatureStore,
           cfg: TokenizeConfig) -> dict:
    """Write `cfg.metrics_path` (codec facts + round trip on the eval split and on real music) and the figure."""
    metrics_path, figure_path = Path(cfg.metrics_path), Path(cfg.figure_path)
    synth = eval_clips(manifest, store, cfg.eval_split, cfg.eval_max_clips, codec.sample_rate)
    real, why_no_real = real_tracks(Path(cfg.real_music_dir), cfg.real_max_seconds, codec.sample_rate)
    key = stable_hash(json.dumps([encoder_hash, [(c["id"], c["hash"]) for c in synth + real], to_dict(cfg)],
                                 sort_keys=True))  # the settings too: decode-only ones change the round trip
    if metrics_path.exists() and figure_path.exists():
        previous = json.loads(metrics_path.read_text())
        if previous.get("eval_key") == key:
            log.info("tokenize: round trip unchanged since the last run (%s)", metrics_path)
            return previous
    bits = codec.frame_rate * codec.num_codebooks * math.log2(codec.codebook_size)
    result = {**codec.describe(), "tokens_per_second": codec.frame_rate * codec.num_codebooks,
              "bitrate_kbps": round(bits / 1000, 3), "round_trip": {}, "notes": {}, "eval_key": key}
    timing = {"encode_s": 0.0, "decode_s": 0.0, "audio_s": 0.0}
    for name, clips, why in (("synthv2m", synth, f"no ok tracks in split {cfg.eval_split!r}"),
                             ("real", real, why_no_real)):
        if not clips:
            result["round_trip"][name] = None
            result["notes"][name] = why
            log.warning("tokenize: no round trip on %s: %s", name, why)
            continue
        result["round_trip"][name], took = measure(codec, clips)
        timing = {k: timing[k] + took[k] for k in timing}
    if timing["audio_s"]:  # logged, not written: a timing is machine-local and metrics/codec.json is a DVC output
        log.info("tokenize: round trip encodes at %.1fx and decodes at %.1fx real time",
                 timing["audio_s"] / max(timing["encode_s"], 1e-9), timing["audio_s"] / max(timing["decode_s"], 1e-9))
    shown = (synth or real)[:1]
    if shown:
        write_figure(figure_path, shown[0], codec)
    atomic_write_json(metrics_path, result)
    return result


def write_figure(path: Path, clip: dict, codec: Codec) -> None:
    """Log-mel spectrograms of one clip: original above, decoded below, labelled beats marked; atomic PNG."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sr, hop = codec.sample_rate, 320
    decoded = chroma.fit_to_reference(clip["decoded"], len(clip["audio"]))
    mels = [librosa.power_to_db(librosa.feature.melspectrogram(y=np.asarray(y, np.float64), sr=sr, n_fft=2048,
                                                               hop_length=hop, n_mels=128, fmax=sr / 2))
            for y in (clip["audio"], decoded)]
    top = float(mels[0].max())
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.6), sharex=True)
    for ax, mel, title in zip(axes, mels, ("original", f"{codec.name} round trip "
                                           f"({codec.num_codebooks} x {codec.codebook_size} at "
                                           f"{codec.frame_rate:g} Hz)"), strict=True):
        image = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
                          extent=(0, mel.shape[1] * hop / sr, 0, mel.shape[0]))
        for beat in clip.get("beats") if clip.get("beats") is not None else []:
            ax.axvline(beat, color="cyan", lw=0.6, alpha=0.6)
        ax.set_title(f"{clip['id']}: {title}", fontsize=9, loc="left")
        ax.set_ylabel("mel band")
    axes[-1].set_xlabel("time (s)" + ("; cyan: labelled beats" if clip.get("beats") is not None else ""))
    fig.colorbar(image, ax=axes, label="dB", shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
