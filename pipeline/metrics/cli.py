"""v2m metrics: score generated audio against reference audio (and videos), folder against folder.

    v2m metrics --generated DIR --reference DIR [--videos DIR] [--labels CSV] [--out metrics.json]
                [--metrics chroma,av_align,...] [--passt CKPT] [--vggish WEIGHTS] [--workers N]
                [--flow-cache DIR | --no-flow-cache]

Files are paired by stem (`gen/clip1.wav` <-> `ref/clip1.mp3` <-> `videos/clip1.mp4`); when a folder holds several
files with one stem, audio formats win over video containers (`.wav` first). The JSON is
`{"files": {stem: {metric: value}}, "overall": {metric: value}, "omitted": {metric: why}, "problems": {stem: [..]}}`;
`overall` pools each metric its own way: chroma frame-weighted, KLD segment-weighted, FAD over all frames, the rest
a mean over clips. A stem without its pair, an unreadable file or a metric undefined for a clip is listed by name in
`problems` and the table; silent audio is scored (as the reference implementations would) and flagged there too.

Ground truth for beat_f1, tempo_acc and key_acc: `--labels CSV` (columns id, tempo_bpm, beat_times as a JSON list or
';'-separated seconds, key, mode; the SynthV2M manifest has them). Without labels, beat_f1 compares generated beats
with beats estimated from the reference audio, and tempo_acc / key_acc are omitted. onset_f1 always compares with
onsets estimated from the reference audio. kld needs a classifier (`--passt`), fad an embedder (`--vggish`).

AV-Align's optical flow is nearly all the cost; each video's flow trajectory is cached by content (default
`$V2M_CACHE_DIR/av_align_flow`, else `~/.cache/v2m/av_align_flow`), so scoring more systems against the same videos
is fast. `--workers N` scores files in N processes. Each pair is scored by `pipeline.metrics.score.score_pair`, the
same function the evaluate stage uses.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.media import MediaError
from pipeline.metrics import chroma, fad, kld, rhythm
from pipeline.metrics.models import MissingModelError, load_passt, load_vggish
from pipeline.metrics.score import Labels, PairResult, default_flow_cache, mono_at, parse_beats, read_audio, score_pair
from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".webm", ".mkv", ".mov")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi")
METRICS = ("chroma", "av_align", "beat_f1", "onset_f1", "tempo_acc", "tempo_double", "tempo_half", "key_acc",
           "kld_pq", "kld_qp", "fad")


def index_folder(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """{stem: path} of the media files directly in `folder`, preferring extensions in `exts` order."""
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(exts)}
    for path in sorted(folder.iterdir()):
        ext = path.suffix.lower()
        if path.is_file() and not path.name.startswith(".") and ext in rank:
            if path.stem not in found or rank[ext] < rank[found[path.stem].suffix.lower()]:
                found[path.stem] = path
    return found


def read_labels(path: Path) -> dict[str, Labels]:
    """Ground truth per id from a manifest CSV (columns id, tempo_bpm, beat_times, key, mode; all but id optional)."""
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "id" not in frame.columns:
        raise ValueError(f"{path}: a labels CSV needs an 'id' column (has {', '.join(frame.columns)})")
    labels = {}
    for row in frame.to_dict("records"):
        tempo = row.get("tempo_bpm", "").strip()
        key = row.get("key", "").strip()
        try:
            labels[row["id"]] = Labels(
                tempo_bpm=float(tempo) if tempo else None,
                beats=parse_beats(row.get("beat_times")),
                key=rhythm.parse_key(key, row.get("mode", "").strip() or "major") if key else None,
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"{path}: id {row['id']!r}: bad label ({exc})") from None
    return labels


def _score_pair_star(args: tuple) -> PairResult:
    return score_pair(*args)


def format_table(files: dict, overall: dict) -> str:
    columns = [m for m in METRICS if m in overall or any(m in v for v in files.values())]
    width = max([len("overall"), *map(len, files)])
    lines = [f"{'file':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    rows = [*files.items(), ("overall", overall)]
    for i, (stem, values) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        cells = [f"{values[c]:>9.4f}" if values.get(c) is not None else f"{'-':>9}" for c in columns]
        lines.append(f"{stem:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v2m metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", type=Path, required=True, help="folder of generated audio (or videos)")
    parser.add_argument("--reference", type=Path, required=True, help="folder of reference audio, same stems")
    parser.add_argument("--videos", type=Path, help="folder of the input videos, same stems (for av_align)")
    parser.add_argument("--labels", type=Path, help="CSV with id, tempo_bpm, beat_times, key, mode")
    parser.add_argument("--out", type=Path, help="write the metrics JSON here")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of: " + ",".join(METRICS))
    parser.add_argument("--passt", help="PaSST checkpoint for kld (or $V2M_PASST_CHECKPOINT)")
    parser.add_argument("--vggish", help="VGGish weights for fad (or $V2M_VGGISH_WEIGHTS)")
    parser.add_argument("--workers", "--jobs", type=int, default=1, help="files scored in parallel (processes)")
    parser.add_argument("--flow-cache", type=Path, default=default_flow_cache(),
                        help="keep each video's optical-flow trajectory here, keyed by content (default: %(default)s)")
    parser.add_argument("--no-flow-cache", dest="flow_cache", action="store_const", const=None,
                        help="recompute the flow of every video")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    wanted = frozenset(m.strip() for m in args.metrics.split(",") if m.strip())
    if unknown := wanted - set(METRICS):
        print(f"v2m metrics: unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}",
              file=sys.stderr)
        return 2
    for flag, folder in (("--generated", args.generated), ("--reference", args.reference), ("--videos", args.videos)):
        if folder is not None and not folder.is_dir():
            print(f"v2m metrics: {flag} {folder}: not a folder", file=sys.stderr)
            return 2
    omitted: dict[str, str] = {}
    problems: dict[str, list[str]] = {}
    gen_files, ref_files = index_folder(args.generated, AUDIO_EXTS), index_folder(args.reference, AUDIO_EXTS)
    videos = index_folder(args.videos, VIDEO_EXTS) if args.videos else {}
    for stem in sorted(set(gen_files) - set(ref_files)):
        problems.setdefault(stem, []).append(f"no reference for {gen_files[stem]} in {args.reference}")
    for stem in sorted(set(ref_files) - set(gen_files)):
        problems.setdefault(stem, []).append(f"no generated file for {ref_files[stem]} in {args.generated}")
    stems = sorted(set(gen_files) & set(ref_files))

    try:
        labels = read_labels(args.labels) if args.labels else None
    except (OSError, ValueError) as exc:
        print(f"v2m metrics: {exc}", file=sys.stderr)
        return 2
    if labels is None:
        for m in ("tempo_acc", "tempo_double", "tempo_half", "key_acc"):
            omitted[m] = "needs ground truth: pass --labels CSV (id, tempo_bpm, beat_times, key, mode)"
    if not args.videos:
        omitted["av_align"] = "needs the input videos: pass --videos DIR"
    classifier = embedder = None
    if wanted & {"kld_pq", "kld_qp"}:
        try:
            classifier = load_passt(args.passt) if (args.passt or _env("V2M_PASST_CHECKPOINT")) else None
        except MissingModelError as exc:
            print(f"v2m metrics: {exc}", file=sys.stderr)
            return 2
        if classifier is None:
            omitted["kld_pq"] = omitted["kld_qp"] = (
                "needs a label classifier: pass --passt CKPT (hear21passt + PaSST 20 s checkpoint); "
                "`v2m evaluate` uses the project's tagger")
    if "fad" in wanted:
        try:
            embedder = load_vggish(args.vggish) if (args.vggish or _env("V2M_VGGISH_WEIGHTS")) else None
        except MissingModelError as exc:
            print(f"v2m metrics: {exc}", file=sys.stderr)
            return 2
        if embedder is None:
            omitted["fad"] = "needs an embedder: pass --vggish WEIGHTS (torchvggish + vggish-10086976.pth)"

    tasks = []
    for stem in stems:
        video = videos.get(stem)
        if args.videos and video is None and "av_align" in wanted:
            problems.setdefault(stem, []).append(f"no video in {args.videos}: av_align not scored")
        row = None
        if labels is not None:
            row = labels.get(stem)
            if row is None:
                problems.setdefault(stem, []).append(f"no row for id {stem!r} in {args.labels}")
        tasks.append((stem, gen_files[stem], ref_files[stem], video, row, wanted, args.flow_cache))
    if args.workers > 1 and len(tasks) > 1:
        import librosa.beat  # noqa: F401  (compiles numba kernels on import: once here, not in every worker)

        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(tqdm(pool.map(_score_pair_star, tasks), total=len(tasks), desc="metrics", unit="file"))
    else:
        results = [score_pair(*t) for t in tqdm(tasks, desc="metrics", unit="file")]

    files = {r.stem: r.values for r in results if r.values}
    scored = [r for r in results if r.values]
    model_overall = {}
    if classifier is not None or embedder is not None:  # every pair, not only those another metric scored
        model_overall = _model_metrics(results, gen_files, ref_files, classifier, embedder, files)
    for r in results:
        if r.problems:
            problems.setdefault(r.stem, []).extend(r.problems)
    overall = _overall(scored, files, model_overall)
    for m in sorted(wanted - set(overall) - set(omitted)):
        omitted[m] = "no file could be scored for it (see problems)"

    omitted = {m: omitted[m] for m in METRICS if m in omitted and m in wanted}
    report = {"files": files, "overall": overall, "omitted": omitted, "problems": problems,
              "inputs": {"generated": str(args.generated), "reference": str(args.reference),
                         "videos": str(args.videos) if args.videos else None,
                         "labels": str(args.labels) if args.labels else None,
                         "beat_reference": "labels" if labels is not None else "beats estimated from reference audio",
                         "onset_reference": "onsets estimated from reference audio"}}
    print(format_table(files, overall))
    for metric, why in report["omitted"].items():
        print(f"{metric}: not computed: {why}")
    for stem, messages in problems.items():
        for message in messages:
            print(f"problem: {stem}: {message}")
    if args.out:
        atomic_write_json(args.out, report)
        log.info("wrote %s", args.out)
    if not scored and not model_overall:
        print("v2m metrics: no pair could be scored", file=sys.stderr)
        return 1
    return 0


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _model_metrics(pairs: list[PairResult], gen_files: dict, ref_files: dict, classifier, embedder,
                   files: dict) -> dict:
    """KLD per clip and FAD over the set, in this process (models are not shipped to workers), on every pair whose
    files can be read (an unreadable one already has its problem from `score_pair`). Returns overall."""
    kld_scores, gen_embeddings, ref_embeddings = [], [], []
    for r in tqdm(pairs, desc="kld/fad", unit="file"):
        try:
            gen, gen_sr = read_audio(gen_files[r.stem])
            ref, ref_sr = read_audio(ref_files[r.stem])
        except MediaError:
            continue
        for model in (classifier, embedder):
            if model is None:
                continue
            sr = model.sample_rate
            gen_mono, ref_mono = mono_at(gen, gen_sr, sr), mono_at(ref, ref_sr, sr)
            if model is classifier:
                score = kld.kld_clip(classifier, gen_mono, ref_mono, sr)
                kld_scores.append(score)
                if score.segments:
                    files.setdefault(r.stem, r.values).update(kld_pq=score.pq, kld_qp=score.qp)
                else:
                    r.problems.append("kld undefined: no segment longer than 0.15 s")
            else:
                gen_embeddings.append(fad.embed(embedder, gen_mono[: len(ref_mono)], sr))
                ref_embeddings.append(fad.embed(embedder, ref_mono, sr))
    overall = {}
    if classifier is not None:
        pq, qp = kld.pool(kld_scores)
        if not math.isnan(pq):
            overall.update(kld_pq=pq, kld_qp=qp)
    if embedder is not None and gen_embeddings:
        overall["fad"] = fad.fad_from_embeddings(gen_embeddings, ref_embeddings)
    return overall


def _overall(scored: list[PairResult], files: dict, model_overall: dict) -> dict:
    overall = {}
    chroma_scores = [r.chroma for r in scored if r.chroma is not None]
    if chroma_scores:
        overall["chroma"] = chroma.pool(chroma_scores)
    for m in ("av_align", "beat_f1", "onset_f1", "tempo_acc", "tempo_double", "tempo_half", "key_acc"):
        values = [v[m] for v in files.values() if m in v]
        if values:
            overall[m] = float(np.mean(values))
    overall.update(model_overall)
    return {m: overall[m] for m in METRICS if m in overall}
