"""The evaluate stage's human report: reports/eval.md (Table 1 laid out as in the paper) and reports/eval_*.png.

Written by `pipeline.evaluate` from the eval.json dict; `v2m evaluate --print` prints the table of a written report.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.shards import atomic_path, atomic_write_text

TABLE_START, TABLE_END = "<!-- table -->", "<!-- /table -->"
# (key stem, column title, higher is better); fad/kld keys get the embedding's suffix
COLUMNS = (("fad", "FAD", False), ("kld_pq", "KLD(P‖Q)", False), ("kld_qp", "KLD(Q‖P)", False),
           ("chroma", "Chroma", True), ("av_align", "AV-Align", True), ("beat_f1", "Beat F1", True),
           ("tempo_acc", "Tempo acc", True), ("key_acc", "Key acc", True), ("instrument_acc", "Instr. acc", True))
NAMES = {"reference": "Reference (codec round trip)", "full": "**v2m full** (CLIP + flow)",
         "no_motion": "v2m no_motion (ablation)", "retrieval": "Retrieval baseline", "random": "Random baseline"}
# The paper's Table 1 as published (../shared/PAPER.md: the V2M evaluation split of V2M-20K, FAD with VGGish, KLD
# with PaSST), cell for cell, quoted in its own table and never beside our rows.
PUBLISHED_SOURCE = "../shared/PAPER.md, Table 1 (V2M evaluation split)"
PUBLISHED_COLUMNS = ("Params", "Training samples", "FAD (VGGish) ↓", "KLD(P‖Q) ↓", "KLD(Q‖P) ↓", "Chroma cosine ↑")
PUBLISHED: tuple[dict, ...] = (
    {"model": "VidMuse-M (baseline)", "values": ("1.9B", "360k", "2.13", "1.32", "0.98", "0.056")},
    {"model": "Model-S without motion", "values": ("–", "–", "not reported (empty row)", "–", "–", "–")},
    {"model": "Model-S (CLIP + flow)", "values": ("487M", "20k", "2.87", "1.48", "1.08", "0.058")},
)


def _key(stem: str, embedding: str) -> str:
    return stem if stem in ("chroma", "av_align", "beat_f1", "tempo_acc", "key_acc", "instrument_acc") or \
        embedding == "vggish" else f"{stem}_tagger"


def _num(v: float) -> str:
    return f"{v + 0.0:.3f}".replace("-0.000", "0.000")


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def table(report: dict) -> str:
    """Markdown Table 1: one row per system, arrows for the better direction, the best non-reference value bold."""
    systems, emb = report["systems"], report["embedding"]
    cols = [(stem, title, up) for stem, title, up in COLUMNS if any(_key(stem, emb) in v for v in systems.values())]
    suffix = " (tagger)" if emb != "vggish" else ""
    header = ["Model", "Params", "Training samples"] + [
        f"{t}{suffix if s in ('fad', 'kld_pq', 'kld_qp') else ''} {'↑' if up else '↓'}" for s, t, up in cols]
    best = {}
    for stem, _, up in cols:
        values = [v[_key(stem, emb)] for name, v in systems.items() if name != "reference" and _key(stem, emb) in v]
        if values:
            best[stem] = max(values) if up else min(values)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in systems.items():
        info = report.get("models", {}).get(name, {})
        params = "0 (no learning)" if info.get("params") == 0 else _count(info.get("params"))
        cells = [NAMES.get(name, name), params, _count(info.get("train_samples"))]
        for stem, _, _ in cols:
            v = values.get(_key(stem, emb))
            text = "–" if v is None else _num(v)
            cells.append(f"**{text}**" if v is not None and name != "reference" and v == best.get(stem) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ci_table(report: dict) -> str:
    systems, emb = report["systems"], report["embedding"]
    metrics = [_key(s, emb) for s, _, _ in COLUMNS] + ["onset_f1", "tempo_octave"]
    metrics = [m for m in metrics if any(m in v for v in systems.values())]
    lines = ["| system | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, v in systems.items():
        cells = [f"{_num(v[m])} [{_num(v[m + '_ci'][0])}, {_num(v[m + '_ci'][1])}]" if m in v else "–" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(report: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for the SynthV2M demo: (target, measured, met?); None = cannot be checked."""
    s = report["systems"]
    full, nm, ref, rnd = (s.get(k, {}) for k in ("full", "no_motion", "reference", "random"))

    def get(d: dict, m: str) -> float | None:
        return d.get(m)

    checks = []

    def add(text: str, values: list, ok) -> None:
        if any(v is None for v in values):
            checks.append((text, "not measured", None))
        else:
            checks.append((text, ok[1], bool(ok[0])))

    f_beat, n_beat, f_tempo, n_tempo = (get(full, "beat_f1"), get(nm, "beat_f1"), get(full, "tempo_acc"),
                                        get(nm, "tempo_acc"))
    add("full beat F1 >= 0.8", [f_beat], (f_beat is not None and f_beat >= 0.8, f"{f_beat}"))
    add("full tempo accuracy >= 0.9", [f_tempo], (f_tempo is not None and f_tempo >= 0.9, f"{f_tempo}"))
    if f_beat is not None and n_beat is not None:
        add("no_motion beat F1 >= 0.2 below full", [f_beat, n_beat],
            (f_beat - n_beat >= 0.2, f"{n_beat} (full - no_motion = {f_beat - n_beat:+.3f})"))
    else:
        add("no_motion beat F1 >= 0.2 below full", [None], (False, ""))
    if f_tempo is not None and n_tempo is not None:
        add("no_motion tempo accuracy below full", [f_tempo, n_tempo],
            (n_tempo < f_tempo, f"{n_tempo} (full - no_motion = {f_tempo - n_tempo:+.3f})"))
    else:
        add("no_motion tempo accuracy below full", [None], (False, ""))
    f_key = get(full, "key_acc")
    add("full key accuracy >= 0.8", [f_key], (f_key is not None and f_key >= 0.8, f"{f_key}"))
    fc, rc, rnc = get(full, "chroma"), get(ref, "chroma"), get(rnd, "chroma")
    if None not in (fc, rc, rnc):
        add("full chroma > random and within 0.15 of the reference", [fc],
            (fc > rnc and fc >= rc - 0.15, f"{fc} (random {rnc}, reference {rc})"))
    else:
        add("full chroma > random and within 0.15 of the reference", [None], (False, ""))
    fa, ra = get(full, "av_align"), get(ref, "av_align")
    if None not in (fa, ra):
        add("full AV-Align within 0.1 of the reference", [fa], (abs(fa - ra) <= 0.1, f"{fa} (reference {ra})"))
    else:
        add("full AV-Align within 0.1 of the reference", [None], (False, ""))
    return checks


def _plot_distributions(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_clip = report["per_clip"]
    systems = list(per_clip)
    metrics = [m for m in ("beat_f1", "tempo_acc", "chroma", "av_align", "onset_f1", "key_acc", "instrument_acc")
               if any(m in c for s in systems for c in per_clip[s].values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, m in zip(axes[0], metrics, strict=True):
        data = [[c[m] for c in per_clip[s].values() if m in c] for s in systems]
        ax.boxplot(data, showfliers=False)
        for k, values in enumerate(data, start=1):
            ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.6)
        ax.set_xticks(range(1, len(systems) + 1), systems, rotation=45, ha="right", fontsize=8)
        ax.set_title(m, fontsize=10)
    fig.suptitle(f"Per-clip metrics by system ({report['n_clips']} {report['split']} clips)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _plot_clip(path_align: Path, path_chroma: Path, cfg, clip: str, systems: list[str], beats) -> None:
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.media import load_audio
    from pipeline.metrics import av_align

    gen = Path(cfg.generated_dir)
    sr = av_align.ONSET_SAMPLE_RATE
    audio = {s: load_audio(gen / s / f"{clip}.wav", sample_rate=sr)[0].reshape(-1)
             for s in ("full", "no_motion") if s in systems}
    video = Path(cfg.ingest_dir) / "clips" / f"{clip}.mp4"
    rows = 1 + len(audio)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 1.9 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    if video.exists():
        from pipeline.metrics.score import default_flow_cache

        peaks = av_align.video_peaks(video, Path(cfg.flow_cache) if cfg.flow_cache else default_flow_cache())
        t = np.arange(len(peaks.magnitudes)) / peaks.fps
        ax.plot(t, peaks.magnitudes, color="black", lw=1)
        ax.plot(peaks.peaks, np.interp(peaks.peaks, t, peaks.magnitudes), "v", color="tab:red", ms=5,
                label="flow peaks")
    ax.set_ylabel("flow")
    ax.set_title(f"{clip}: video flow peaks (Farneback, AV-Align) vs audio onsets; grey = labelled beats", fontsize=10)
    for k, (system, y) in enumerate(audio.items(), start=1):
        ax = axes[k][0]
        env = librosa.onset.onset_strength(y=y, sr=sr, hop_length=av_align.ONSET_HOP)
        ax.plot(librosa.times_like(env, sr=sr, hop_length=av_align.ONSET_HOP), env, lw=1, label=system)
        onsets = av_align.onset_times(y, sr)
        ax.vlines(onsets, 0, env.max() if len(env) else 1, color="tab:blue", lw=0.8, alpha=0.7)
        ax.set_ylabel(f"{system}\nonsets", fontsize=9)
    for row in axes:
        for b in beats if beats is not None else []:
            row[0].axvline(b, color="grey", alpha=0.35, lw=2)
    axes[-1][0].set_xlabel("seconds")
    fig.tight_layout()
    with atomic_path(path_align) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)

    tracks = {"ground truth": Path(cfg.music_dir) / f"{clip}.wav"}
    tracks.update({s: gen / s / f"{clip}.wav" for s in ("reference", "full", "no_motion", "random") if s in systems})
    fig, axes = plt.subplots(len(tracks), 1, figsize=(10, 1.6 * len(tracks)), sharex=True, squeeze=False)
    for ax, (name, p) in zip(axes[:, 0], tracks.items(), strict=True):
        y = load_audio(p, sample_rate=22050)[0].reshape(-1)
        c = librosa.feature.chroma_cqt(y=y, sr=22050, hop_length=512)
        ax.imshow(c, aspect="auto", origin="lower", cmap="magma",
                  extent=(0, len(y) / 22050, -0.5, 11.5))
        ax.set_yticks([0, 4, 7, 11], ["C", "E", "G", "B"], fontsize=7)
        ax.set_ylabel(name, fontsize=9)
    axes[0][0].set_title(f"{clip}: chromagrams (CQT chroma)", fontsize=10)
    axes[-1][0].set_xlabel("seconds")
    fig.tight_layout()
    with atomic_path(path_chroma) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def published_section(embedding: str) -> list[str]:
    """The paper's Table 1 quoted as published, in a table of its own, and why the embedded FAD ranks random music
    first (lines of the report)."""
    lines = ["## Published figures: the paper's Table 1, quoted (not our measurements)", "",
             f"As published ({PUBLISHED_SOURCE}): real videos of V2M-20K, FAD with VGGish and KLD with PaSST. "
             "Different data and, in the embedded profile, different embedding models from the rows above: no number "
             "in this table may be compared with one there.", "",
             "| Model (published) | " + " | ".join(PUBLISHED_COLUMNS) + " |",
             "|---" * (len(PUBLISHED_COLUMNS) + 1) + "|"]
    for row in PUBLISHED:
        lines.append(f"| {row['model']} | " + " | ".join(row["values"]) + " |")
    if embedding != "vggish":
        lines += ["", "**Why random music has the best FAD above.** FAD compares the distribution of a whole set of "
                  "clips' embeddings with the reference set's, never a clip with its own video, and the random and "
                  "retrieval baselines play real, uncompressed SynthV2M music while every v2m row (and the reference "
                  "row) passes through the melvq codec. So here FAD measures how much the output sounds like "
                  "uncompressed music, the codec's artefacts included, not whether it fits the video: read the fit "
                  "from beat F1, tempo, key, chroma and AV-Align."]
    return lines


def write_report(path: Path, report: dict, cfg, ids: list[str]) -> None:
    """reports/eval.md and the plots beside it (eval_distributions.png, eval_alignment.png, eval_chroma.png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    plots = {k: path.with_name(f"{stem}_{k}.png") for k in ("distributions", "alignment", "chroma")}
    _plot_distributions(plots["distributions"], report)
    clip = ids[0]
    import pandas as pd

    from pipeline.metrics.score import parse_beats

    row = pd.read_parquet(Path(cfg.ingest_dir) / "manifest.parquet").set_index("id").loc[clip]
    _plot_clip(plots["alignment"], plots["chroma"], cfg, clip, list(report["systems"]),
               parse_beats(row.get("beat_times")))
    emb = report["embedding"]
    lines = [f"# Evaluation: Table 1 for our systems ({report['n_clips']} {report['split']} clips)", ""]
    lines += ["Written by `v2m evaluate` (DVC stage `evaluate`); the numbers are in `metrics/eval.json`.", ""]
    lines += [TABLE_START, table(report), TABLE_END, ""]
    if emb != "vggish":
        lines += ["FAD and KLD are computed with the project's SynthV2M tagger standing in for VGGish and PaSST "
                  "(`fad_tagger`, `kld_*_tagger`): comparable between these rows only, not with published figures. "
                  "Instrument accuracy is the tagger's instrument head on the generated music.", ""]
    ref_key = report.get("key_acc_on_reference") or {}
    lines += [f"Rules: beat F1 is mir_eval's F-measure (70 ms) against the labelled beats; tempo accuracy counts an "
              f"estimate (the tempo of the beats librosa tracks) within 4 % of the labelled BPM, octave errors "
              f"(within 4 % of double or half) are counted apart as `tempo_octave` and never as correct; "
              f"key accuracy is tonic and mode both right, "
              f"from `{report['key_method']}`"
              + (f" (on the reference: Krumhansl-Schmuckler {ref_key.get('ks')}, tagger {ref_key.get('tagger')})"
                 if ref_key else "") + ". Params and training samples: the checkpoint's parameter count and the "
              "train split size; the baselines learn nothing (0 params) but take their music from that split "
              "(retrieval searches it; random draws from it). Bold: the best system other "
              "than the reference, which is the codec's ceiling.", ""]
    lines += ["## Where the demo stands", "", "| target | measured | met |", "|---|---|---|"]
    for text, measured, ok in targets(report):
        lines.append(f"| {text} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    lines += ["", "## 95 % bootstrap confidence intervals", "",
              f"{len(ids)} clips resampled with replacement (the same resamples for every system); pooled metrics "
              "(chroma, KLD, FAD) are recomputed on each resample. FAD's interval is biased upwards (a resample "
              "repeats clips, which narrows the covariance): read it as a spread, not as bounds on the point value.",
              "", ci_table(report), ""]
    lines += published_section(emb)
    lines += ["", "## Plots", "", f"![per-clip metrics]({plots['distributions'].name})", "",
              f"First clip of the split, `{clip}` (not chosen by score): flow peaks of the video and onsets of the "
              "full vs no_motion music, with the labelled beats.", "", f"![alignment]({plots['alignment'].name})", "",
              f"![chromagrams]({plots['chroma'].name})", "", "## Watch and listen", ""]
    gen = Path(cfg.generated_dir)
    for clip_id in ids[: cfg.example_clips]:
        links = [f"[{s}]({os.path.relpath(gen / s / (clip_id + '.mp4'), path.parent)})"
                 for s in report["systems"] if (gen / s / f"{clip_id}.mp4").exists()]
        lines.append(f"- `{clip_id}`: " + (", ".join(links) if links else "no mp4 generated"))
    if report.get("missing") or report.get("problems"):
        lines += ["", "## Not scored", ""]
        lines += [f"- system {s}: {why}" for s, why in report.get("missing", {}).items()]
        lines += [f"- clip {i}: {'; '.join(p)}" for i, p in report.get("problems", {}).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def print_table(path: Path) -> int:
    """Print the table of a written report (the last thing `make demo` shows)."""
    if not path.exists():
        print(f"{path}: no evaluation report yet (dvc repro evaluate)")
        return 0
    text = path.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    print(text.splitlines()[0].lstrip("# "))
    print(text[start + len(TABLE_START) : end].strip() if start >= 0 < end else text)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# the seed study: the same systems trained under several seeds
# ----------------------------------------------------------------------------------------------------------------------
SEED_TARGETS = (  # (name, system, metric, at least); each must hold on every seed
    ("full beat F1 >= 0.85", "full", "beat_f1", 0.85),
    ("full tempo accuracy >= 0.9", "full", "tempo_acc", 0.9),
    ("full key accuracy >= 0.85", "full", "key_acc", 0.85),
)
SEED_GAP = ("no_motion beat F1 >= 0.3 below full", "beat_f1", 0.3)


def over_seeds(values: dict[int, float], up: bool) -> dict:
    """A metric's values by seed -> their mean, sample sd and worst (the lowest where higher is better), 4 decimals."""
    v = np.array(list(values.values()), float)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
            "worst": round(float(v.min() if up else v.max()), 4)}


def seed_summary(per_seed: dict[int, dict], embedding: str) -> dict:
    """{seed: evaluate's {system: {metric: value}}} -> per system and metric the values per seed, their mean, sample
    sd and worst (the lowest where higher is better), and every target checked on each seed."""
    seeds = sorted(per_seed)
    systems: dict[str, dict] = {}
    for name in per_seed[seeds[0]]:
        rows = {}
        for stem, _, up in COLUMNS:
            key = _key(stem, embedding)
            values = {s: per_seed[s][name][key] for s in seeds if key in per_seed[s].get(name, {})}
            if len(values) == len(seeds):
                rows[key] = {"per_seed": values, **over_seeds(values, up)}
        systems[name] = rows
    targets = []
    for title, system, metric, floor in SEED_TARGETS:
        got = {s: per_seed[s][system][metric] for s in seeds}
        targets.append({"target": title, "per_seed": got, "met": all(v >= floor for v in got.values())})
    title, metric, gap = SEED_GAP
    got = {s: round(per_seed[s]["full"][metric] - per_seed[s]["no_motion"][metric], 4) for s in seeds}
    targets.append({"target": title, "per_seed": got, "met": all(v >= gap for v in got.values())})
    return {"seeds": seeds, "embedding": embedding, "systems": systems, "targets": targets,
            "all_met": all(t["met"] for t in targets)}


def seed_table(summary: dict) -> str:
    """Markdown: one row per system and metric (mean, sd, worst, each seed), then the targets seed by seed."""
    seeds = summary["seeds"]
    titles = {_key(stem, summary["embedding"]): (title, up) for stem, title, up in COLUMNS}
    lines = ["| System | Metric | mean | sd | worst | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (5 + len(seeds))]
    for name, rows in summary["systems"].items():
        for key, row in rows.items():
            title, up = titles[key]
            cells = [NAMES.get(name, name), f"{title} {'↑' if up else '↓'}", _num(row["mean"]), _num(row["sd"]),
                     _num(row["worst"])] + [_num(row["per_seed"][s]) for s in seeds]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Target (on every seed) | " + " | ".join(f"seed {s}" for s in seeds) + " | met |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | " + " | ".join(_num(t["per_seed"][s]) for s in seeds)
                     + f" | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def write_seed_report(path: Path, summary: dict) -> None:
    """reports/seeds.md: what the study is and its table."""
    text = ("# The seed study: every science metric over training seeds\n\n"
            f"The full system and the no_motion ablation trained under {len(summary['seeds'])} seeds "
            f"({', '.join(map(str, summary['seeds']))}: `base.seed` and `seed_study.seeds`), same data, same "
            "settings; each "
            "seed's models generate the test split with the same sampling seed and are scored as in `reports/eval.md`. "
            "Training is float math and differs in its last bits between machines; the claims must hold on every seed. "
            "Written by `v2m evaluate --seeds` (`dvc repro evaluate_seeds`).\n\n" + seed_table(summary) + "\n")
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------------------------------
# the ablation group: reports/ablations.md (docs/baselines.md)
# ----------------------------------------------------------------------------------------------------------------------

ABLATION_NAMES = {"full": "v2m full (CLIP + flow)", "no_motion": "v2m no_motion (CLIP only)",
                  "no_clip": "v2m no_clip (flow only)", "vidmuse": "VidMuse-style (long-short-term, CLIP only)",
                  "spatial": "v2m spatial (patch-level CLIP + flow)",
                  "text": "v2m text, no prompt", "text_own": "v2m text, prompt = the clip's instrument",
                  "text_other": "v2m text, prompt = another instrument (scored against the prompt)",
                  "reference": "Reference (codec round trip)", "retrieval": "Retrieval baseline",
                  "random": "Random baseline"}
# The paper's claims (../shared/PAPER.md) as comparisons of two systems on some metrics: (claim, a, b, metrics, kind).
# kind "better": the claim is that a beats b (confirmed when a is better on every seed and the CI of the difference of
# the seed means is above 0; contradicted when that CI is below 0). kind "enough": the claim is that b, with less (less
# data, no spatial fusion), does about as well as a (consistent when the CI of a - b reaches 0 or below; contradicted
# when a is better beyond it).
ABLATION_CLAIMS = (
    ("1. Fine-grained motion is needed", "full", "no_motion", ("beat_f1", "tempo_acc", "av_align"), "better"),
    ("1. Long-range semantics (CLIP) are needed", "full", "no_clip", ("key_acc", "chroma", "instrument_acc"),
     "better"),
    ("Competitive with VidMuse: full against the VidMuse-style baseline (same decoder, data, steps)", "full",
     "vidmuse", ("beat_f1", "key_acc", "chroma"), "better"),
    ("2. Very large datasets may be unnecessary: half the clean data does as well", "full", "data50",
     ("beat_f1", "key_acc", "chroma"), "enough"),
    ("2. Very large datasets may be unnecessary: a quarter of the clean data does as well", "full", "data25",
     ("beat_f1", "key_acc", "chroma"), "enough"),
    ("3. Spatial fusion may be unnecessary: the temporal fusion does as well as the spatial one", "spatial", "full",
     ("beat_f1", "key_acc", "chroma", "instrument_acc"), "enough"),
)


def _ablation_name(system: str) -> str:
    if system.startswith("data") and system[4:].isdigit():
        return f"v2m full on {system[4:]} % of the train split"
    return ABLATION_NAMES.get(system, system)


def ablation_summary(stats: dict, seeds: list[int], embedding: str, train_clips: dict[str, int], n_clips: int,
                     ablations) -> dict:
    """stats {(seed or None, system): {metric: [value on each resample, all clips first]}} -> metrics/ablations.json:
    per system and metric the mean over seeds, its bootstrap CI (the seed mean on each resample), sd, worst and each
    seed's value (untrained systems: seed null, one run); the data-size curve; each claim of ABLATION_CLAIMS with the
    per-seed differences and the CI of the difference of the seed means."""
    metrics = [_key(stem, embedding) for stem, _, _ in COLUMNS]
    ups = {_key(stem, embedding): up for stem, _, up in COLUMNS}
    names = list(dict.fromkeys(system for _, system in stats))
    order = ["full", "no_motion", "no_clip", "vidmuse", "spatial", "text", "text_own", "text_other"] + [
        f"data{p}" for p in sorted(ablations.fractions, reverse=True)]
    names = [n for n in order if n in names] + [n for n in names if n not in order]

    def curve(system: str, metric: str) -> np.ndarray | None:
        """The seed mean on each resample (None when a seed lacks the metric)."""
        runs = [stats[(s, system)].get(metric) for s in seeds] if (seeds[0], system) in stats else \
            [stats[(None, system)].get(metric)]
        return None if any(r is None for r in runs) else np.mean(np.array(runs, float), axis=0)

    systems = {}
    for name in names:
        trained = (seeds[0], name) in stats
        row: dict = {"name": _ablation_name(name), "train_clips": train_clips.get(name),
                     "seeds": seeds if trained else []}
        for m in metrics:
            c = curve(name, m)
            if c is None:
                continue
            lo, hi = np.percentile(c[1:], [2.5, 97.5]) if len(c) > 1 else (c[0], c[0])
            entry = {"mean": round(float(c[0]), 4), "ci": [round(float(lo), 4), round(float(hi), 4)]}
            if trained:  # the seed mean of the values on all clips is c[0]: over_seeds gives the same mean
                values = {seed: float(stats[(seed, name)][m][0]) for seed in seeds}
                entry.update(over_seeds(values, ups[m]), per_seed={k: round(x, 4) for k, x in values.items()})
            row[m] = entry
        systems[name] = row
    claims = []
    for text, a, b, claim_metrics, kind in ABLATION_CLAIMS:
        if a not in systems or b not in systems:
            continue
        for m in claim_metrics:
            ca, cb = curve(a, m), curve(b, m)
            if ca is None or cb is None:
                continue
            diff = ca - cb
            lo, hi = np.percentile(diff[1:], [2.5, 97.5]) if len(diff) > 1 else (diff[0], diff[0])
            per_seed = {s: round(float(stats[(s, a)][m][0] - stats[(s, b)][m][0]), 4) for s in seeds}
            if kind == "enough":
                verdict = "contradicted" if lo > 0 else "consistent"
            elif lo > 0 and all(v > 0 for v in per_seed.values()):
                verdict = "confirmed"
            else:
                verdict = "contradicted" if hi < 0 else "not shown"
            claims.append({"claim": text, "kind": kind, "a": a, "b": b, "metric": m, "per_seed": per_seed,
                           "mean": round(float(diff[0]), 4), "ci": [round(float(lo), 4), round(float(hi), 4)],
                           "verdict": verdict})
    sizes = [(f"data{p}", train_clips.get(f"data{p}")) for p in sorted(ablations.fractions)] + \
        [("full", train_clips.get("full"))]
    sizes = [(s, n) for s, n in sizes if s in systems]
    data_size = {"systems": [s for s, _ in sizes], "train_clips": [n for _, n in sizes],
                 "metrics": {m: {"mean": [systems[s][m]["mean"] for s, _ in sizes],
                                 "ci": [systems[s][m]["ci"] for s, _ in sizes],
                                 "per_seed": [systems[s][m].get("per_seed", {}) for s, _ in sizes]}
                             for m in ("beat_f1", "tempo_acc", "key_acc", "chroma", "instrument_acc")
                             if all(m in systems[s] for s, _ in sizes)}}
    n_boot = max((len(v) for st in stats.values() for v in st.values()), default=1) - 1
    return {"seeds": seeds, "n_clips": n_clips, "embedding": embedding, "bootstrap": n_boot, "systems": systems,
            "claims": claims, "data_size": data_size, "steering": steering_targets(systems, seeds)}


STEER_INSTRUMENT, STEER_BEAT_F1 = 0.9, 0.8  # the bar: instrument accuracy vs the prompt, and the beats kept


def steering_targets(systems: dict, seeds: list[int]) -> list[dict]:
    """Text steering seed by seed: for text_own and text_other, the instrument accuracy against the prompt (>= 0.9)
    and beat F1 (>= 0.8) on each seed, and whether both hold on every seed."""
    out = []
    for name in ("text_own", "text_other"):
        row = systems.get(name)
        if row is None or "instrument_acc" not in row or "beat_f1" not in row or not row["seeds"]:
            continue
        inst, beat = row["instrument_acc"]["per_seed"], row["beat_f1"]["per_seed"]
        met = {s: inst[s] >= STEER_INSTRUMENT and beat[s] >= STEER_BEAT_F1 for s in seeds}
        out.append({"system": name, "instrument_acc": inst, "beat_f1": beat, "met": met,
                    "met_every_seed": all(met.values())})
    return out


def steering_table(summary: dict) -> str:
    """Markdown: the text-steering targets seed by seed, each row saying whether its own target holds on every seed,
    then whether both do, per prompt."""
    seeds = summary["seeds"]
    lines = ["| Prompt | Target | " + " | ".join(f"seed {s}" for s in seeds) + " | met on every seed |",
             "|" + "---|" * (3 + len(seeds))]
    both = []
    for t in summary.get("steering", []):
        who = "the clip's instrument" if t["system"] == "text_own" else "another instrument"
        for metric, title, bar in (("instrument_acc", "instrument acc vs the prompt", STEER_INSTRUMENT),
                                   ("beat_f1", "beat F1", STEER_BEAT_F1)):
            values = [t[metric][s] for s in seeds]
            lines.append(f"| {who} | {title} >= {bar:g} | " + " | ".join(_num(v) for v in values)
                         + f" | {'yes' if all(v >= bar for v in values) else '**no**'} |")
        both.append(f"{who}: **{'yes' if t['met_every_seed'] else 'no'}**")
    return "\n".join(lines) + ("\n\nBoth targets on every seed: " + "; ".join(both) + "." if both else "")


def ablation_table(summary: dict) -> str:
    """Markdown: one row per system, each metric's seed mean and its 95 % CI."""
    emb = summary["embedding"]
    cols = [(_key(stem, emb), title, up) for stem, title, up in COLUMNS]
    cols = [c for c in cols if any(c[0] in row for row in summary["systems"].values())]
    suffix = " (tagger)" if emb != "vggish" else ""
    header = ["System", "Train clips", "Seeds"] + [
        f"{t}{suffix if k.startswith(('fad', 'kld')) else ''} {'↑' if up else '↓'}" for k, t, up in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["systems"].values():
        cells = [row["name"], _count(row["train_clips"]), str(len(row["seeds"])) if row["seeds"] else "– (no training)"]
        for key, _, _ in cols:
            e = row.get(key)
            cells.append("–" if e is None else f"{_num(e['mean'])} [{_num(e['ci'][0])}, {_num(e['ci'][1])}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_seed_table(summary: dict) -> str:
    """Markdown: the trained systems' sd, worst and per-seed values of the science metrics."""
    seeds = summary["seeds"]
    metrics = [("beat_f1", "Beat F1"), ("tempo_acc", "Tempo acc"), ("key_acc", "Key acc"), ("chroma", "Chroma"),
               ("instrument_acc", "Instr. acc"), ("av_align", "AV-Align")]
    lines = ["| System | Metric | mean | sd | worst | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (5 + len(seeds))]
    for row in summary["systems"].values():
        if not row["seeds"]:
            continue
        for key, title in metrics:
            e = row.get(key)
            if e is None:
                continue
            lines.append(f"| {row['name']} | {title} | {_num(e['mean'])} | {_num(e['sd'])} | {_num(e['worst'])} | "
                         + " | ".join(_num(e["per_seed"][s]) for s in seeds) + " |")
    return "\n".join(lines)


def claims_table(summary: dict) -> str:
    lines = ["| Claim (../shared/PAPER.md) | a - b | Metric | per seed | mean [95 % CI] | Verdict |",
             "|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        per_seed = ", ".join(f"{float(v):+.3f}" for v in c["per_seed"].values())
        lines.append(f"| {c['claim']} | {c['a']} - {c['b']} | {c['metric']} | {per_seed} | {c['mean']:+.3f} "
                     f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | **{c['verdict']}** |")
    return "\n".join(lines)


def _plot_data_size(path: Path, summary: dict) -> None:
    """The data-size curve: each science metric against the train clips, seed means with the CI, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["data_size"]
    x = np.array(curve["train_clips"], float)
    titles = {"beat_f1": "Beat F1", "tempo_acc": "Tempo accuracy", "key_acc": "Key accuracy", "chroma": "Chroma",
              "instrument_acc": "Instrument accuracy"}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (m, v) in enumerate(curve["metrics"].items()):
        colour = f"C{i}"
        ci = np.array(v["ci"], float)
        ax.plot(x, v["mean"], "-o", color=colour, label=titles.get(m, m))
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=colour, alpha=0.12)
        for xi, per_seed in zip(x, v["per_seed"], strict=True):
            ax.scatter([xi] * len(per_seed), list(per_seed.values()), color=colour, s=10, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{int(n)}" for n in x])
    ax.set_xlabel("training clips (the full system on 25 / 50 / 100 % of the train split)")
    ax.set_ylabel("score on the test clips")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Data-size curve: mean over {len(summary['seeds'])} training seeds (dots), 95 % bootstrap CI")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def write_ablation_report(path: Path, summary: dict) -> None:
    """reports/ablations.md and data_size.png beside it."""
    plot = path.with_name("data_size.png")
    if summary["data_size"]["metrics"]:
        _plot_data_size(plot, summary)
    seeds = ", ".join(map(str, summary["seeds"]))
    text = [
        "# The ablation group: the paper's baseline and ablations, over training seeds",
        "",
        f"Every trained system has the same decoder, data (unless a fraction is named), training steps and sampling, "
        f"and is trained under seeds {seeds} (`base.seed` and `seed_study.seeds`). Each cell is the mean over the "
        f"seeds on the same {summary['n_clips']} test clips, with a 95 % bootstrap confidence interval over clips "
        "(the same resamples for every system and seed; the seed mean recomputed on each); the untrained rows are "
        "one run. Written by `v2m evaluate --ablations` (`make ablations`, i.e. `dvc repro evaluate_all`); the "
        "numbers are in `metrics/ablations.json`, the design of each system in docs/baselines.md.",
        "",
        ablation_table(summary),
        "",
        "FAD and KLD use the project's SynthV2M tagger (comparable between these rows only); FAD favours uncompressed "
        "music (reports/eval.md says why), so read the fit to the video from the other columns.",
        "",
        "## The paper's claims, tested",
        "",
        "Each line compares two systems, a - b on one metric: the difference on each seed, and the difference of "
        "their seed means with its bootstrap CI. A claim that a beats b is **confirmed** when a is better on every "
        "seed and the CI is above 0, **contradicted** when the CI is below 0, **not shown** otherwise. A claim that "
        "less does as well (less data; the temporal fusion instead of the spatial one) is **consistent** when the "
        "CI reaches 0 (no significant gain from the larger set or the spatial fusion; not a proof of equality) and "
        "**contradicted** when that one is better beyond it.",
        "",
        claims_table(summary),
        "",
        *([
            "## Text steering",
            "",
            "The text system is full with the caption as a condition and a learned token prior, trained on the clips "
            "and on their timbre swaps (the same score on another instrument, with a caption that names it). It is "
            "generated three ways: without a prompt, with a prompt naming the clip's instrument, and with one naming "
            "another instrument; the instrument accuracy of the last two is against the prompt. The issue's bar: "
            f"{STEER_INSTRUMENT:g} against the prompt while beat F1 stays >= {STEER_BEAT_F1:g}.",
            "",
            steering_table(summary),
            "",
        ] if summary.get("steering") else []),
        "## Data size",
        "",
        f"![data-size curve]({plot.name})",
        "",
        "## Every seed",
        "",
        ablation_seed_table(summary),
        "",
    ]
    atomic_write_text(path, "\n".join(text))
