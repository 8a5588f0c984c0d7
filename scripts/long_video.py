"""Long videos: music for a SynthV2M video whose tempo and key change at known times, scored window by window.

    python scripts/long_video.py [--model models/full/v2m.pt] [--segments 3] [--segment-seconds 60]
                                 [--span-seconds 10] [--seed 0] [--json metrics/long_video.json]
                                 [--report reports/long_video.md] [--compare-crossfade 0.04]
                                 [--also-models models/seeds/1/full/v2m.pt ...]

The video is `--segments` SynthV2M scores of `--segment-seconds` each, played one after the other (each drawn with
`synth.make_spec`, the next one taken only when its tempo differs by >= 15 % and its key by tonic or mode from the one
before), rendered as `v2m synth` renders (picture and music; the music is only the labels' source). v2m generates
its music as `v2m generate` does for any video (`inference.video_features`, windows of the model's length continuing
`generate.prompt_seconds` of the previous one, crossfaded decoding). Then:

- every `--span-seconds` span (spans never straddle a segment change): key (`rhythm.estimate_key`) and tempo
  (`rhythm.estimate_beats` + `tempo_accuracy`, 4 %) against that segment's labels, beat F1 against its beats, and
  the instrument the evaluate stage's tagger hears against the one the segment's scene shows (when the tagger is
  there);
- seams: at each crossfade's start (where a window's own tokens start), middle and end, and at every 0.1 s inside
  the windows at least 0.5 s from a crossfade (the control), the spectral jump = 1 - cosine of the mean log-mel
  spectra of the 150 ms before and after, and the onset strength there relative to the clip's median. A seam is
  audible if these stand out from the in-window values: the share of seams above the control's 90th percentile
  (0.10 by chance) and its binomial tail probability.

`--compare-crossfade S` generates the video's music again with `generate.crossfade_seconds` = S (0.04 = one frame,
what the seams were before the crossfade existed) and scores its seams the same way; `--also-models` runs everything
for more checkpoints (the other training seeds' models) and adds a row for each.

Writes the JSON and a Markdown report (table, per-span rows, a plot beside it). No stage depends on it; the numbers of
the demo's model are in the report it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import inference  # noqa: E402
from pipeline.config import BaseConfig, load_params  # noqa: E402
from pipeline.media import encode_video  # noqa: E402
from pipeline.metrics.rhythm import beat_f1, estimate_beats, estimate_key, tempo_accuracy  # noqa: E402
from pipeline.metrics.tagger import load_tagger  # noqa: E402
from pipeline.shards import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from pipeline.synth import ClipSpec, make_spec, render_audio, render_frames  # noqa: E402

JUMP_S = 0.15  # spectra compared each side of a point
CONTROL_STEP_S, CONTROL_GAP_S = 0.1, 0.5  # the control points: every 0.1 s, at least 0.5 s from any crossfade
FPS, SIZE = 24, 256


def pick_segments(n: int, seconds: float, seed: int, synth_cfg) -> list[ClipSpec]:
    """n scores of `seconds` each, consecutive ones differing in tempo (>= 15 %) and key (tonic or mode)."""
    base = BaseConfig(clip_seconds=seconds)
    specs: list[ClipSpec] = []
    index = 20_000
    while len(specs) < n:
        spec = make_spec(seed, index, synth_cfg, base)
        index += 1
        if specs:
            prev = specs[-1]
            if abs(spec.tempo_bpm / prev.tempo_bpm - 1) < 0.15 or (spec.key, spec.mode) == (prev.key, prev.mode):
                continue
        specs.append(spec)
    return specs


def render_long(specs: list[ClipSpec], path: Path, sample_rate: int, size: int = SIZE) -> np.ndarray:
    """The scores one after the other as one mp4 (picture + music); returns the music [N]."""

    def frames():
        for spec in specs:
            yield from render_frames(spec, FPS, size, size)

    audio = np.concatenate([render_audio(spec, sample_rate) for spec in specs])
    encode_video(path, frames(), FPS, audio[None], sample_rate)
    return audio


def spectral_jump(mel_db: np.ndarray, hop_s: float, t: float) -> float:
    """1 - cosine of the mean log-mel spectra (dB above the clip's floor) in the JUMP_S before and after t."""
    i, w = int(round(t / hop_s)), max(1, int(round(JUMP_S / hop_s)))
    a, b = mel_db[:, max(0, i - w) : i].mean(axis=1), mel_db[:, i : i + w].mean(axis=1)
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def seam_scores(wav: np.ndarray, sr: int, crossfades: list[tuple[float, float]], total_s: float) -> dict:
    """Spectral jump and onset strength at each crossfade's start ("seams"), middle and end, and at the control points
    inside the windows ("inside"); their means and the share of seams above the control's 90th percentile."""
    import librosa
    from scipy.stats import binom

    hop = 512
    mel = librosa.feature.melspectrogram(y=wav.astype(np.float32), sr=sr, hop_length=hop, n_mels=64)
    mel_db = librosa.power_to_db(mel, ref=np.max, top_db=80.0) + 80.0  # >= 0
    onset = librosa.onset.onset_strength(S=librosa.power_to_db(mel), sr=sr, hop_length=hop)
    median = float(np.median(onset)) + 1e-9
    hop_s = hop / sr
    edge = JUMP_S + 0.05
    crossfades = [(a, b) for a, b in crossfades if edge <= a and b <= total_s - edge]
    control = [float(t) for t in np.arange(1.0, total_s - 1.0, CONTROL_STEP_S)
               if all(t < a - CONTROL_GAP_S or t > b + CONTROL_GAP_S for a, b in crossfades)]

    def at(points: list[float]) -> dict:
        jumps = [spectral_jump(mel_db, hop_s, t) for t in points]
        onsets = [float(onset[min(len(onset) - 1, int(round(t / hop_s)))]) / median for t in points]
        return {"n": len(points), "spectral_jump": [round(v, 5) for v in jumps],
                "onset_rel": [round(v, 4) for v in onsets]}

    out = {"seams": at([a for a, _ in crossfades]), "middle": at([(a + b) / 2 for a, b in crossfades]),
           "end": at([b for _, b in crossfades]), "inside": at(control),
           "crossfade_s": round(float(np.mean([b - a for a, b in crossfades])), 4) if crossfades else 0.0}
    for key in ("spectral_jump", "onset_rel"):
        inside = np.asarray(out["inside"][key]) if out["inside"][key] else np.zeros(1)
        p90 = np.percentile(inside, 90)
        out[f"{key}_mean"] = {"inside": round(float(inside.mean()), 4)}
        for where in ("seams", "middle", "end"):
            values = np.asarray(out[where][key]) if out[where][key] else np.zeros(1)
            out[f"{key}_mean"][where] = round(float(values.mean()), 4)
            above = int(np.sum(values > p90))
            # how many seams stand out: above the 90th percentile of the in-window points (10 % expected by chance)
            suffix = "" if where == "seams" else f"_{where}"
            out[f"{key}_above_inside_p90{suffix}"] = round(above / len(values), 4)
            out[f"{key}_p_chance{suffix}"] = round(float(binom.sf(above - 1, len(values), 0.1)), 4)
        out["inside"][f"{key}_p90"] = round(float(p90), 5)
    for key in ("spectral_jump", "onset_rel"):  # the control's ~1000 values are summed up by their mean and p90
        del out["inside"][key]
    return out


def run(model_path: Path, params_path: Path, segments: int, segment_s: float, span_s: float, seed: int,
        size: int = SIZE, compare_crossfade: float | None = None) -> dict:
    params = load_params(params_path)
    model = inference.load_model(model_path, params)
    sr, fr = model.codec.sample_rate, model.frame_rate
    specs = pick_segments(segments, segment_s, seed, params.synth)
    with tempfile.TemporaryDirectory(prefix="v2m-long-video-") as tmp:
        video = Path(tmp) / "long.mp4"
        truth = render_long(specs, video, sr, size)
        feats = inference.video_features(model, video, Path(tmp))
    total_s = segments * segment_s
    n = model.codec.num_frames(int(round(total_s * sr)))
    cfg = model.params.generate
    windows = inference.generate_codes(model, feats, n, cfg, seed, None, progress=False)
    wav = inference.decode_windows(model.codec, windows, int(round(total_s * sr)))
    seams = seam_scores(wav, sr, [(a / fr, b / fr) for a, b in windows.seams()], total_s)
    compare = None
    if compare_crossfade is not None:  # the same video and seed with another crossfade
        other = dataclasses.replace(cfg, crossfade_seconds=compare_crossfade)
        again = inference.generate_codes(model, feats, n, other, seed, None, progress=False)
        compare = {"crossfade_seconds": compare_crossfade,
                   "seams": seam_scores(inference.decode_windows(model.codec, again, int(round(total_s * sr))), sr,
                                        [(a / fr, b / fr) for a, b in again.seams()], total_s)}

    tagger_path = Path(params.evaluate.tagger.out_dir) / "tagger.pt"
    tagger = load_tagger(tagger_path) if tagger_path.is_file() else None  # the evaluate stage's (SynthV2M tagger)
    spans = []
    for j, spec in enumerate(specs):
        offset = j * segment_s
        for k in range(int(segment_s // span_s)):
            lo, hi = offset + k * span_s, offset + (k + 1) * span_s
            piece = wav[int(round(lo * sr)) : int(round(hi * sr))]
            est_key = estimate_key(piece, sr) if np.any(piece) else None
            true_key = estimate_key(truth[int(round(lo * sr)) : int(round(hi * sr))], sr)
            tempo, beats = estimate_beats(piece, sr)
            true_beats = np.asarray([b - k * span_s for b in spec.beat_times if k * span_s <= b < (k + 1) * span_s])
            spans.append({"start_s": lo, "end_s": hi, "segment": j, "label_key": f"{spec.key} {spec.mode}",
                          "label_bpm": spec.tempo_bpm,
                          "key": f"{est_key.tonic} {est_key.mode}" if est_key else None,
                          "key_ok": bool(est_key and (est_key.tonic, est_key.mode) == (spec.key, spec.mode)),
                          "tonic_ok": bool(est_key and est_key.tonic == spec.key),
                          "truth_key_ok": (true_key.tonic, true_key.mode) == (spec.key, spec.mode),
                          "bpm": round(float(tempo), 1),
                          "tempo_ok": bool(tempo_accuracy(tempo, spec.tempo_bpm).correct),
                          "beat_f1": round(float(beat_f1(beats, true_beats)), 4) if len(true_beats) else None})
            if tagger is not None:  # the instrument the span is heard as, against the one its scene shows
                heard = tagger.predict(np.asarray(piece, np.float32).reshape(-1), sr)["instrument"]
                spans[-1].update(instrument=heard, label_instrument=spec.instrument,
                                 instrument_ok=heard == spec.instrument)
    f1s = [s["beat_f1"] for s in spans if s["beat_f1"] is not None]
    named = [s["instrument_ok"] for s in spans if "instrument_ok" in s]
    return {"model": str(model_path), "seed": seed, "seconds": total_s, "window_s": model.params.base.clip_seconds,
            "prompt_s": cfg.prompt_seconds, "crossfade_s": cfg.crossfade_seconds, "span_s": span_s,
            "segments": [{"start_s": j * segment_s, "id": s.id, "key": f"{s.key} {s.mode}", "bpm": s.tempo_bpm,
                          "instrument": s.instrument} for j, s in enumerate(specs)],
            "summary": {"key_acc": round(float(np.mean([s["key_ok"] for s in spans])), 4),
                        "tonic_acc": round(float(np.mean([s["tonic_ok"] for s in spans])), 4),
                        "truth_key_acc": round(float(np.mean([s["truth_key_ok"] for s in spans])), 4),
                        "tempo_acc": round(float(np.mean([s["tempo_ok"] for s in spans])), 4),
                        "beat_f1": round(float(np.mean(f1s)), 4) if f1s else None, "spans": len(spans),
                        "instrument_acc": round(float(np.mean(named)), 4) if named else None},
            "spans": spans, "seams": seams, "compare": compare, "_wav": wav, "_sr": sr}


def seam_table(seams: dict, title: str) -> list[str]:
    """The seam scores as Markdown rows: each measure's mean at the crossfade's start, middle and end and inside, and
    the share of seams above the control's 90th percentile."""
    lines = ["| measure | crossfade start | middle | end | inside windows (control) | above the control's p90: "
             "start / middle / end (0.10 by chance) |", "|---|---|---|---|---|---|"]
    for key, name in (("spectral_jump", "spectral jump (1 - cosine, 150 ms each side)"),
                      ("onset_rel", "onset strength / clip median")):
        m = seams[f"{key}_mean"]
        share = " / ".join(f"{seams[f'{key}_above_inside_p90{x}']:.2f} (p {seams[f'{key}_p_chance{x}']:.2f})"
                           for x in ("", "_middle", "_end"))
        lines.append(f"| {name} | {m['seams']:.4f} (n={seams['seams']['n']}) | {m['middle']:.4f} | {m['end']:.4f} | "
                     f"{m['inside']:.4f} (n={seams['inside']['n']}) | {share} |")
    return lines


def write_report(result: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, seams = result["summary"], result["seams"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
    times = [sp["start_s"] + result["span_s"] / 2 for sp in result["spans"]]
    axes[0].step([sp["start_s"] for sp in result["spans"]], [sp["label_bpm"] for sp in result["spans"]], where="post",
                 label="labelled BPM")
    axes[0].scatter(times, [sp["bpm"] for sp in result["spans"]], c=["g" if sp["tempo_ok"] else "r"
                                                                      for sp in result["spans"]], label="generated")
    axes[0].set_ylabel("tempo (BPM)")
    axes[0].legend(loc="upper right")
    for seg in result["segments"][1:]:
        for ax in axes:
            ax.axvline(seg["start_s"], color="k", lw=1)
    wav, sr = result["_wav"], result["_sr"]
    axes[1].plot(np.arange(len(wav))[::200] / sr, wav[::200], lw=0.3, color="0.4")
    axes[1].set_ylabel("generated music")
    axes[1].set_xlabel("time (s): black lines = the video's tempo/key changes")
    fig.tight_layout()
    png = path.with_suffix(".png")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    lines = [f"# Long video: {result['seconds']:g} s, tempo and key changing at known times", "",
             f"Written by `{command}` (model `{result['model']}`, seed {result['seed']}; windows of "
             f"{result['window_s']:g} s continuing {result['prompt_s']:g} s of the previous one). The video: "
             + ", then ".join(f"{g['key']} at {g['bpm']:g} BPM ({g['instrument']}) from {g['start_s']:g} s"
                              for g in result["segments"]) + ".", "",
             f"| every {result['span_s']:g} s span ({s['spans']}) | key acc | tonic acc | tempo acc | beat F1 | "
             "instrument acc (tagger) |",
             "|---|---|---|---|---|---|",
             f"| the generated music, against its segment's labels | {s['key_acc']:.3f} | {s['tonic_acc']:.3f} | "
             f"{s['tempo_acc']:.3f} | {s['beat_f1']} | {s.get('instrument_acc')} |",
             f"| the true music of the video (the estimator's ceiling) | {s['truth_key_acc']:.3f} | | | | |", "",
             f"Seams: each window's last {result['crossfade_s']:g} s are written again by the next window and the two "
             "windows' audio is crossfaded there. Measured at the crossfade's start (where the next window's own "
             "tokens start), middle and end, against points every 0.1 s inside the windows; a seam stands out when "
             "it is above the control's 90th percentile (0.10 of them by chance; p = the binomial chance of that many "
             "or more).", "",
             *seam_table(seams, "")]
    if result.get("compare"):
        lines += ["", f"The same video and seed with a crossfade of {result['compare']['crossfade_seconds']:g} s "
                  "(one frame: the windows meet almost without one, as before the crossfade existed):", "",
                  *seam_table(result["compare"]["seams"], "")]
    if result.get("also"):
        lines += ["", "Every checkpoint on the same video (seams: the share above the control's 90th percentile, "
                  "start / middle / end):", "",
                  "| model | key acc | tempo acc | beat F1 | instrument acc | spectral jump | onset strength |",
                  "|---|---|---|---|---|---|---|"]
        for row in [{"model": result["model"], "summary": s, "seams": seams}, *result["also"]]:
            m, q = row["summary"], row["seams"]
            jump, onset = (" / ".join(f"{q[f'{k}_above_inside_p90{x}']:.2f}" for x in ("", "_middle", "_end"))
                           for k in ("spectral_jump", "onset_rel"))
            lines.append(f"| `{row['model']}` | {m['key_acc']:.3f} | {m['tempo_acc']:.3f} | {m['beat_f1']} | "
                         f"{m.get('instrument_acc')} | {jump} | {onset} |")
    lines += ["", f"![tempo and waveform]({png.name})", "",
              "| span | label | key (true music's key read right) | tempo (BPM) | beat F1 | instrument |",
              "|---|---|---|---|---|---|"]
    for sp in result["spans"]:
        mark = {True: "✓", False: "✗"}
        heard = (f"{sp['instrument']} {mark[sp['instrument_ok']]} ({sp['label_instrument']})" if "instrument" in sp
                 else "")
        lines.append(f"| {sp['start_s']:g}-{sp['end_s']:g} s | {sp['label_key']}, {sp['label_bpm']:g} | "
                     f"{sp['key']} {mark[sp['key_ok']]} ({'yes' if sp['truth_key_ok'] else 'no'}) | "
                     f"{sp['bpm']:g} {mark[sp['tempo_ok']]} | {sp['beat_f1']} | {heard} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/full/v2m.pt"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--segment-seconds", type=float, default=60.0)
    parser.add_argument("--span-seconds", type=float, default=10.0, help="length of each scored span")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SIZE, help="rendered frame size (px, square)")
    parser.add_argument("--json", type=Path, default=Path("metrics/long_video.json"))
    parser.add_argument("--report", type=Path, default=Path("reports/long_video.md"))
    parser.add_argument("--compare-crossfade", type=float, metavar="S",
                        help="also generate with generate.crossfade_seconds S and score its seams (0.04: one frame)")
    parser.add_argument("--also-models", type=Path, nargs="*", default=[], metavar="PT",
                        help="more checkpoints (e.g. the other training seeds'), each run on the same video")
    args = parser.parse_args(argv)
    if args.segments < 2 or args.segment_seconds < args.span_seconds:
        parser.error("need --segments >= 2 and --segment-seconds >= --span-seconds")
    for model in [args.model, *args.also_models]:
        if not model.exists():
            parser.error(f"{model}: no such checkpoint (run `make demo`, or pass --model)")
    result = run(args.model, args.params, args.segments, args.segment_seconds, args.span_seconds, args.seed,
                 args.size, args.compare_crossfade)
    result["also"] = []
    for model in args.also_models:
        other = run(model, args.params, args.segments, args.segment_seconds, args.span_seconds, args.seed, args.size)
        result["also"].append({"model": str(model), "summary": other["summary"],
                               "seams": {k: v for k, v in other["seams"].items()
                                         if k not in ("seams", "middle", "end", "inside")}})
    command = "python scripts/long_video.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(result, args.report, command.strip())
    atomic_write_json(args.json, {k: v for k, v in result.items() if not k.startswith("_")})
    print(json.dumps({"summary": result["summary"],
                      **{k: result["seams"][k] for k in result["seams"] if "_mean" in k or "_p90" in k}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
