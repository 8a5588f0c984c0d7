"""evaluate: data/generated/{system} + data/music + data/ingest -> metrics/eval.json, reports/eval.md + eval_*.png.
Params: base.seed, evaluate.

The paper's Table 1 for our systems (reference = ground truth through the codec, full, no_motion, retrieval,
random) on the `evaluate.split` clips that every system has: FAD, KLD both ways, chroma cosine, AV-Align, beat F1,
tempo, key and instrument accuracy, each with a bootstrap 95 % confidence interval over clips (the same resampled
clips for every system). Ground truth is the music in `evaluate.music_dir`; labels (beats, tempo, key, mode,
instrument) come from the ingest manifest; AV-Align pairs each system's audio with the ingested clip (the same
video for every system, so its flow is computed once and cached).

FAD and KLD use the project's tagger (`embedding: tagger`; keys `fad_tagger`, `kld_pq_tagger`, `kld_qp_tagger`) or,
with `embedding: vggish` and local weights, the published VGGish / PaSST (keys `fad`, `kld_pq`, `kld_qp`).
`v2m evaluate --fit-tagger` (DVC stage `tagger`) trains the tagger on the train split's music -> models/tagger/.

Bad input: a system with no ok clip of the split (no folder, no .wav, or every generate manifest row failed, e.g.
`no_model`) is reported as missing and left out. For the present systems, a missing file, a manifest row that is not
ok, or audio that cannot be scored (unreadable, silent, shorter than the ground truth) drops that clip from every
system (so all are scored on the same clips) and is listed under "problems" in eval.json and the report. Exit 1 when
no clip can be scored, or when a model (the tagger) or a setting is missing or wrong (one line saying what to do).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.config import EvaluateConfig, Params, load_params
from pipeline.media import MediaError, load_audio
from pipeline.metrics import av_align, chroma, fad, kld, rhythm
from pipeline.metrics.score import clip_labels, default_flow_cache, score_pair
from pipeline.metrics.tagger import Tagger, resample
from pipeline.shards import atomic_write_json

log = logging.getLogger(__name__)

EMBEDDINGS = ("tagger", "vggish")  # evaluate.embedding
BASELINES = ("retrieval", "random")  # no learned parameters: music of the train split, nearest or seeded-random
PER_CLIP = ("chroma", "av_align", "beat_f1", "onset_f1", "tempo_acc", "tempo_octave", "key_acc", "instrument_acc")


def model_metric_names(embedding: str) -> tuple[str, str, str]:
    """(fad, kld_pq, kld_qp) keys: suffixed `_tagger` unless the published models are used."""
    suffix = "" if embedding == "vggish" else "_tagger"
    return f"fad{suffix}", f"kld_pq{suffix}", f"kld_qp{suffix}"


def read_labels(ingest_dir: Path) -> pd.DataFrame:
    """The ok rows of the ingest manifest, indexed by id (split and SynthV2M label columns where present)."""
    frame = pd.read_parquet(ingest_dir / "manifest.parquet")
    return frame[frame["status"] == "ok"].set_index("id", drop=False)


def _mono(path: Path, sample_rate: int) -> np.ndarray:
    audio, _ = load_audio(path, sample_rate=sample_rate, mono=True)
    return np.asarray(audio, dtype=np.float32).reshape(-1)


def select_clips(cfg: EvaluateConfig, labels: pd.DataFrame) -> tuple[list[str], dict, dict[str, list[str]]]:
    """(ids scored by every present system, {system: reason} for absent systems, {id: problems}).

    A system is absent when it has no ok clip of the split (no .wav, or all its manifest rows failed): it is left out
    and its rows raise no problem. A clip is dropped for all when a present system lacks it or failed on it, or when
    its ground truth is missing."""
    gen_dir = Path(cfg.generated_dir)
    ids = sorted(labels.index[labels["split"] == cfg.split])
    wanted = set(ids)
    problems: dict[str, list[str]] = {}
    manifest = gen_dir / "manifest.csv"
    status = pd.read_csv(manifest, dtype=str, keep_default_na=False) if manifest.exists() else None
    missing, present = {}, []
    for system in cfg.systems:
        folder = gen_dir / system
        have = {p.stem for p in folder.glob("*.wav")} if folder.is_dir() else set()
        failed: dict[str, str] = {}
        if status is not None:
            rows = status[(status["system"] == system) & status["id"].isin(wanted)]
            bad = rows[rows["status"] != "ok"].to_dict("records")
            failed = {r["id"]: f"{r['status']} ({r.get('reason', '')})" for r in bad}
            have &= set(rows.loc[rows["status"] == "ok", "id"])
        if not have & wanted:
            if failed:
                reasons = ", ".join(sorted({r.get("reason", "") or r["status"] for r in bad}))
                error = next((r.get("error", "") for r in bad if r.get("error", "")), "")
                missing[system] = (f"all {len(failed)} {cfg.split} rows of {manifest} failed ({reasons})"
                                   + (f": {error}" if error else ""))
            else:
                missing[system] = f"no generated music in {folder} for the {cfg.split} split"
            continue
        present.append(system)
        for i in ids:
            if i in failed:
                problems.setdefault(i, []).append(f"{system}: {failed[i]}")
            elif i not in have:
                problems.setdefault(i, []).append(f"{system}: no {folder / (i + '.wav')}")
    for i in ids:
        if not (Path(cfg.music_dir) / f"{i}.wav").exists():
            problems.setdefault(i, []).append(f"no ground truth {Path(cfg.music_dir) / (i + '.wav')}")
    ids = [i for i in ids if i not in problems] if present else []
    return (ids[: cfg.max_clips] if cfg.max_clips else ids), missing, problems


# score_pair's problems that make a clip unscorable (the rest, e.g. "beat_f1 undefined", only leave a metric out)
_FATAL = ("unreadable:", "silent ", "generated is shorter")


def _score(task: tuple) -> tuple[str, str, dict, chroma.ChromaScore | None, list[str], list[str]]:
    """(system, id, values, chroma, problems that drop the clip, notes on metrics left out)."""
    system, stem, gen, ref, video, labels, cache = task
    wanted = frozenset({"chroma", "av_align", "beat_f1", "onset_f1", "tempo_acc", "key_acc"})
    result = score_pair(stem, gen, ref, video, labels, wanted, cache)
    fatal, notes = [], []
    for problem in result.problems:
        if not problem.startswith(_FATAL):
            notes.append(f"{system}: {problem}")
            continue
        if problem.startswith("generated is shorter"):
            problem = f"{gen}: {problem.split(': zero-padded')[0]}"
        truth = problem.startswith(("silent reference", f"unreadable: {ref}:"))  # the ground truth's: no system
        fatal.append(problem if truth else f"{system}: {problem}")
    if fatal:
        return system, stem, {}, None, fatal, notes
    values = dict(result.values)
    if "tempo_acc" in values:
        values["tempo_octave"] = max(values.pop("tempo_double"), values.pop("tempo_half"))
    return system, stem, values, result.chroma, fatal, notes


def _peaks(task: tuple) -> None:
    av_align.video_peaks(*task)


def score_all(cfg: EvaluateConfig, systems: list[str], ids: list[str], labels: pd.DataFrame, classifier, embedder,
              tagger: Tagger | None) -> tuple[dict, dict[str, list[str]]]:
    """({system: {"clips": {id: {metric: value}}, "chroma": {id: ChromaScore}, "kld": {id: KldScore},
    "emb": {id: (generated, reference)}}}, {id: problems}) for the ids that every system could be scored on: a clip
    whose audio cannot be scored (unreadable, silent, too short) for any system is dropped for all and is a problem."""
    gen_dir, music, clips = Path(cfg.generated_dir), Path(cfg.music_dir), Path(cfg.ingest_dir) / "clips"
    cache = Path(cfg.flow_cache) if cfg.flow_cache else default_flow_cache()
    videos = {i: clips / f"{i}.mp4" for i in ids if (clips / f"{i}.mp4").exists()}
    tasks = [(s, i, gen_dir / s / f"{i}.wav", music / f"{i}.wav", videos.get(i),
              clip_labels(labels.loc[i].to_dict()), cache) for s in systems for i in ids]
    if cfg.workers > 1:
        import librosa.beat  # noqa: F401  (compiles numba kernels once, before the workers fork)

        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            list(tqdm(pool.map(_peaks, [(v, cache) for v in videos.values()]), total=len(videos), desc="video flow"))
            scored = list(tqdm(pool.map(_score, tasks), total=len(tasks), desc="metrics", unit="clip"))
    else:
        scored = [_score(t) for t in tqdm(tasks, desc="metrics", unit="clip")]
    out = {s: {"clips": {i: {} for i in ids}, "chroma": {}, "kld": {}, "emb": {}} for s in systems}
    problems: dict[str, list[str]] = {}
    for system, stem, values, chroma_score, fatal, notes in scored:
        out[system]["clips"][stem].update(values)
        out[system]["chroma"][stem] = chroma_score
        for problem in fatal:
            if problem not in problems.setdefault(stem, []):
                problems[stem].append(problem)
        for note in notes:
            log.warning("evaluate: %s: %s", stem, note)
    if tagger is not None:
        import torch

        torch.set_num_threads(max(1, tagger.settings.threads))
    targets = prompt_targets(gen_dir / "manifest.csv")
    for i in tqdm([i for i in ids if i not in problems], desc="kld/fad/tagger", unit="clip"):
        try:
            models = _score_models(cfg, systems, i, labels.loc[i], classifier, embedder, tagger, targets)
        except _Unscorable as exc:  # read by score_pair already, so rare: a file changed or another decoder failed
            problems.setdefault(i, []).append(str(exc))
            continue
        for system, (values, kld_score, emb) in models.items():
            out[system]["clips"][i].update(values)
            if kld_score is not None:
                out[system]["kld"][i] = kld_score
            if emb is not None:
                out[system]["emb"][i] = emb
    for i in problems:
        log.warning("evaluate: %s dropped for every system: %s", i, "; ".join(problems[i]))
    kept = [i for i in ids if i not in problems]
    for s in out.values():
        for part in ("clips", "chroma", "kld", "emb"):
            s[part] = {i: s[part][i] for i in kept if i in s[part]}
    return out, problems


class _Unscorable(Exception):
    """A clip's file that the tagger/KLD/FAD pass cannot read; the message names it."""


def prompt_targets(manifest: Path) -> dict[tuple[str, str], str]:
    """{(system, id): instrument} for the generated rows whose prompt named an instrument (the text model's,
    `generate.steering_prompts`): their instrument accuracy is against that one, not the clip's."""
    if not manifest.exists():
        return {}
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if "prompt_instrument" not in frame.columns:
        return {}
    named = frame[frame["prompt_instrument"] != ""]
    return {(r["system"], r["id"]): r["prompt_instrument"] for r in named.to_dict("records")}


def _score_models(cfg: EvaluateConfig, systems: list[str], i: str, row: pd.Series, classifier, embedder,
                  tagger: Tagger | None, targets: dict[tuple[str, str], str] | None = None
                  ) -> dict[str, tuple[dict, kld.KldScore | None, tuple | None]]:
    """{system: (tagger values, KLD, (generated, reference) FAD embeddings)} for one clip; _Unscorable names the file
    that cannot be read. `targets` ({(system, id): instrument}, `prompt_targets`): the instrument a row's prompt
    named, which its instrument accuracy is scored against."""
    gen_dir, music = Path(cfg.generated_dir), Path(cfg.music_dir)
    try:
        if classifier is not None:  # the ground truth's label distributions and embeddings, once per clip
            ref_kld = _mono(music / f"{i}.wav", classifier.sample_rate)
            q = kld.label_distributions(classifier, ref_kld, classifier.sample_rate)
        if embedder is not None:
            ref_fad = _mono(music / f"{i}.wav", embedder.sample_rate)
            ref_emb = fad.embed(embedder, ref_fad, embedder.sample_rate)
    except MediaError as exc:
        raise _Unscorable(str(exc)) from None
    result = {}
    for system in systems:
        gen_path, values, kld_score, emb = gen_dir / system / f"{i}.wav", {}, None, None
        try:
            if tagger is not None and str(row.get("instrument") or ""):
                pred = tagger.predict(_mono(gen_path, tagger.sample_rate), tagger.sample_rate)
                want = (targets or {}).get((system, i), row["instrument"])
                values["instrument_acc"] = float(pred["instrument"] == want)
                if str(row.get("key") or ""):
                    true_key = rhythm.parse_key(str(row["key"]), str(row["mode"]))
                    values["key_acc_tagger"] = float(pred["key"] == true_key.tonic and pred["mode"] == true_key.mode)
            if classifier is not None:  # as kld.kld_clip: generated cut or zero-padded to the reference length
                sr = classifier.sample_rate
                gen = _mono(gen_path, sr)[: len(ref_kld)]
                p = kld.label_distributions(classifier, np.pad(gen, (0, len(ref_kld) - len(gen))), sr)
                kld_score = kld.KldScore(float(kld.kl_divergence(p, q).sum()), float(kld.kl_divergence(q, p).sum()),
                                         len(q))
            if embedder is not None:
                sr = embedder.sample_rate
                emb = (fad.embed(embedder, _mono(gen_path, sr)[: len(ref_fad)], sr), ref_emb)
        except MediaError as exc:
            raise _Unscorable(f"{system}: {exc}") from None
        result[system] = (values, kld_score, emb)
    return result


def resamples_of(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """The clip indices scored: all n first, then n_boot bootstrap resamples (the same for every system)."""
    rng = np.random.default_rng([seed, 8])
    return [np.arange(n)] + [rng.integers(0, n, n) for _ in range(n_boot)]


def resampled_stats(s: dict, ids: list[str], resamples: list[np.ndarray], embedding: str,
                    key_method: str) -> dict[str, list[float]]:
    """One system's scores (score_all's {"clips", "chroma", "kld", "emb"}) -> {metric: [value on each resample]}."""
    fad_key, pq_key, qp_key = model_metric_names(embedding)
    clips = [s["clips"][i] for i in ids]
    chromas = [s["chroma"].get(i) for i in ids]
    klds = [s["kld"][i] for i in ids] if s["kld"] else []
    embs = [s["emb"][i] for i in ids] if s["emb"] else []
    if key_method == "tagger":
        for c in clips:
            if "key_acc_tagger" in c:
                c["key_acc"] = c["key_acc_tagger"]
    stats: dict[str, list[float]] = {}
    for idx in resamples:
        for m in PER_CLIP[1:]:  # chroma is pooled below
            values = [clips[j][m] for j in idx if m in clips[j]]
            if values:
                stats.setdefault(m, []).append(float(np.mean(values)))
        if chroma_scores := [chromas[j] for j in idx if chromas[j] is not None]:
            stats.setdefault("chroma", []).append(chroma.pool(chroma_scores))  # frame-weighted, as audiocraft
        if klds:
            pq, qp = kld.pool([klds[j] for j in idx])
            stats.setdefault(pq_key, []).append(pq)
            stats.setdefault(qp_key, []).append(qp)
        if embs:
            stats.setdefault(fad_key, []).append(fad.fad_from_embeddings([embs[j][0] for j in idx],
                                                                         [embs[j][1] for j in idx]))
    return stats


def with_ci(stats: dict[str, list[float]]) -> dict:
    """{metric: values on the resamples, the first on all clips} -> {metric: value, metric_ci: [2.5, 97.5 pct]}."""
    out = {}
    for m, values in stats.items():
        lo, hi = np.percentile(values[1:], [2.5, 97.5]) if len(values) > 1 else (values[0], values[0])
        out[m] = round(values[0], 4)
        out[m + "_ci"] = [round(float(lo), 4), round(float(hi), 4)]
    return out


def summarise(scores: dict, ids: list[str], embedding: str, n_boot: int, seed: int, key_method: str) -> dict:
    """{system: {metric: value, metric_ci: [lo, hi]}} with the same bootstrap resamples of clips for every system."""
    resamples = resamples_of(len(ids), n_boot, seed)
    return {system: with_ci(resampled_stats(s, ids, resamples, embedding, key_method))
            for system, s in scores.items()}


def model_info(cfg: EvaluateConfig, labels: pd.DataFrame, systems: list[str]) -> dict:
    """{system: {"params": int | None, "train_samples": int | None}} for the table's first columns: the trained
    systems' checkpoint size and the train split; the baselines learn nothing (0 params) but draw their music from the
    train split (retrieval its nearest clip, random a seeded one), so their training samples are its size too."""
    import torch

    from pipeline.model import V2M, ModelConfig, num_params

    train = int((labels["split"] == "train").sum())
    info = {}
    for system in systems:
        if system in BASELINES:
            info[system] = {"params": 0, "train_samples": train}
            continue
        ckpt = Path(cfg.models_dir) / system / "v2m.pt"
        params = None
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            params = num_params(V2M(ModelConfig.from_dict(state["config"])))
        info[system] = {"params": params, "train_samples": train if system in ("full", "no_motion") else None}
    return info


def fit_tagger(params, cfg: EvaluateConfig) -> int:
    """Train the tagger on the train split's music; write it and its held-out accuracy."""
    from pipeline.metrics import tagger

    labels = read_labels(Path(cfg.ingest_dir))
    tcfg = cfg.tagger

    def pairs(split: str) -> list:
        rows = labels[labels["split"] == split].to_dict("records")
        paths = [(Path(cfg.music_dir) / f"{r['id']}.wav", r) for r in rows]
        return [(_mono(p, tcfg.sample_rate), r) for p, r in paths if p.exists()]

    label_columns = ("instrument", "key", "mode", "tempo_bpm")
    if not all(c in labels.columns and labels[c].notna().any() for c in label_columns):
        # real videos carry no SynthV2M labels: nothing to fit; evaluate then needs evaluate.embedding: vggish
        Path(tcfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(tcfg.metrics_path, {"train_clips": 0, "fitted": False,
                                              "why": "the ingest manifest has no SynthV2M labels"})
        log.info("tagger: not fitted: the clips have no SynthV2M labels (%s)", ", ".join(label_columns))
        return 0
    train, val = pairs(tcfg.train_split), pairs(tcfg.val_split)
    if not train:
        print(f"v2m evaluate: no {tcfg.train_split} music in {cfg.music_dir} to fit the tagger on", file=sys.stderr)
        return 1
    round_trips, val_round_trips = [], []
    if tcfg.round_trip_clips:
        chosen = round_trip_rows([r for _, r in train], tcfg.round_trip_clips)
        held_out = [r for _, r in val]
        # the first crop_s seconds of each (what one training crop holds: half the decoding of a clip)
        waves = codec_round_trips(params, cfg.music_dir, chosen + held_out, tcfg.sample_rate,
                                  tcfg.round_trip_workers, [tcfg.crop_s] * (len(chosen) + len(held_out)))
        round_trips = list(zip(waves[: len(chosen)], chosen, strict=True))
        val_round_trips = list(zip(waves[len(chosen):], held_out, strict=True))
    model = tagger.fit(train + round_trips, tcfg.sample_rate, tcfg, params.base.seed, val=val or None)
    model.save(Path(tcfg.out_dir) / "tagger.pt")
    result = {"train_clips": len(train), "val_clips": len(val),
              "val_accuracy": {k: round(v, 4) for k, v in model.accuracy.items()}}
    if round_trips:  # how well it hears the codec's sound: the held-out music (first crop_s s) through the codec
        result["round_trip_clips"] = len(round_trips)
        result["val_round_trip_accuracy"] = {k: round(v, 4) for k, v in
                                             tagger.accuracy(model, val_round_trips, tcfg.sample_rate).items()}
    atomic_write_json(tcfg.metrics_path, result)
    log.info("tagger: %d train clips (+ %d through the codec); held-out accuracy %s", len(train), len(round_trips),
             model.accuracy)
    return 0


def round_trip_rows(rows: list[dict], n: int) -> list[dict]:
    """The `n` train rows the tagger also hears through the codec: n / 4 of each instrument (rounded up), in a fixed
    order (the id's stable hash, then the id), so the same clips on every machine."""
    from pipeline.shards import stable_hash

    order = sorted(rows, key=lambda r: (stable_hash(str(r["id"])), str(r["id"])))
    instruments = sorted({str(r.get("instrument") or "") for r in rows})
    per = -(-n // max(1, len(instruments)))
    chosen = [r for ins in instruments for r in [r for r in order if str(r.get("instrument") or "") == ins][:per]]
    return sorted(chosen, key=lambda r: str(r["id"]))[:n] if len(chosen) > n else chosen


def _round_trip_job(job: tuple) -> np.ndarray:
    """One clip's music through the codec (encode + decode), mono at `rate`. Top level: runs in worker processes."""
    codec_name, tokenize_cfg, path, rate, seconds = job
    from pipeline import codecs

    codec = _CODECS.get(codec_name) or _CODECS.setdefault(codec_name, codecs.load_codec(codec_name, tokenize_cfg))
    return resample(codecs.round_trip(codec, path, seconds), codec.sample_rate, rate)


_CODECS: dict = {}  # one loaded codec per worker process


def codec_round_trips(params: Params, music_dir: str, rows: list[dict], rate: int, workers: int,
                      seconds: list[float | None] | None = None) -> list[np.ndarray]:
    """The music of `rows` (the first `seconds[i]` of row i, all of it for None) through the tokenize stage's fitted
    codec (what `reference` is for the test split), mono at `rate`, in order. A codec that is not fitted stops with
    what to run."""
    import multiprocessing

    from pipeline import codecs

    name = params.tokenize.codec
    try:
        codecs.load_codec(name, params.tokenize)
    except Exception as exc:  # noqa: BLE001 - not fitted, weights missing: say what to run
        raise SystemExit(f"v2m evaluate --fit-tagger: evaluate.tagger.round_trip_clips needs the tokenize stage's "
                         f"codec ({exc}); run `dvc repro tokenize` or set round_trip_clips: 0") from None
    seconds = seconds or [None] * len(rows)
    jobs = [(name, params.tokenize, Path(music_dir) / f"{r['id']}.wav", rate, s)
            for r, s in zip(rows, seconds, strict=True)]
    if workers <= 1 or len(jobs) < 2 * workers:
        return [_round_trip_job(j) for j in tqdm(jobs, desc="tagger round trips", unit="clip", disable=None)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_torch_thread) as pool:
        return list(tqdm(pool.map(_round_trip_job, jobs), total=len(jobs), desc="tagger round trips", unit="clip",
                         disable=None))


def _one_torch_thread() -> None:
    """A round-trip worker's start: one torch thread, so the workers do not share out the cores twice."""
    import torch

    torch.set_num_threads(1)


def _models(cfg: EvaluateConfig):
    """(classifier, embedder, tagger) for the configured embedding; the tagger also when labels need it."""
    from pipeline.metrics.models import load_passt, load_vggish
    from pipeline.metrics.tagger import load_tagger

    if cfg.embedding not in EMBEDDINGS:
        raise ValueError(f"evaluate.embedding must be {' or '.join(EMBEDDINGS)}, got {cfg.embedding!r}")
    path = Path(cfg.tagger.out_dir) / "tagger.pt"
    tagger = load_tagger(path) if (cfg.embedding == "tagger" or path.exists()) else None
    if cfg.embedding == "vggish":
        return load_passt(cfg.passt_checkpoint or None), load_vggish(cfg.vggish_weights or None), tagger
    return tagger, tagger.embedder, tagger


def seed_study(params: Params, cfg: EvaluateConfig, seeds_dir: Path) -> int:
    """Score the trained systems of every training seed on the same clips; write the mean / sd / worst table."""
    from dataclasses import replace

    from pipeline import eval_report

    labels = read_labels(Path(cfg.ingest_dir))
    classifier, embedder, tagger = _models(cfg)
    systems = ("full", "no_motion")
    per_seed: dict[int, dict] = {}
    for seed in (params.base.seed, *params.seed_study.seeds):
        where = cfg.generated_dir if seed == params.base.seed else str(seeds_dir / str(seed))
        seed_cfg = replace(cfg, generated_dir=where, systems=systems)
        ids, missing, _ = select_clips(seed_cfg, labels)
        if missing or not ids:
            print(f"v2m evaluate --seeds: seed {seed}: nothing to score in {where} "
                  f"({'; '.join(f'{s}: {w}' for s, w in missing.items()) or 'no clip'})", file=sys.stderr)
            return 1
        with threadpool_limits(limits=1):
            scores, unscorable = score_all(seed_cfg, list(systems), ids, labels, classifier, embedder, tagger)
            ids = [i for i in ids if i not in unscorable]
            per_seed[seed] = summarise(scores, ids, cfg.embedding, 0, params.base.seed, cfg.key_method)
        log.info("evaluate --seeds: seed %d: %d clips", seed, len(ids))
    summary = eval_report.seed_summary(per_seed, cfg.embedding)
    atomic_write_json(cfg.metrics_path, summary)
    eval_report.write_seed_report(Path(cfg.report_path), summary)
    print(eval_report.seed_table(summary))
    return 0


def ablation_study(params: Params, cfg: EvaluateConfig, ablations_dir: Path, seeds_dir: Path) -> int:
    """The ablation group's table (docs/baselines.md): full and no_motion of every seed (the demo's music for base.seed,
    seeds_dir/{seed} for the others) beside each of `ablations.trained` (ablations_dir/{seed}/{system}), and the
    untrained rows (reference, retrieval, random) once from the demo's music, all on the same clips. Per system and
    metric: the mean over seeds with a bootstrap 95 % CI (the same clip resamples for every seed and system), sd, worst
    and each seed's value; then the data-size curve and the paper's claims checked seed by seed."""
    from dataclasses import replace

    from pipeline import eval_report
    from pipeline.config import fraction_size

    ab = params.ablations
    seeds = sorted(set(ab.seeds))
    expected = sorted({params.base.seed, *params.seed_study.seeds})
    if seeds != expected:
        print(f"v2m evaluate --ablations: ablations.seeds {seeds} must be base.seed and seed_study.seeds {expected}: "
              "full and no_motion are those runs' models; fix params.yaml", file=sys.stderr)
        return 2
    labels = read_labels(Path(cfg.ingest_dir))
    groups: list[tuple[int | None, Path, tuple[str, ...]]] = [
        (None, Path(cfg.generated_dir), tuple(s for s in ("reference", "retrieval", "random") if s in cfg.systems))]
    for seed in seeds:
        main_dir = Path(cfg.generated_dir) if seed == params.base.seed else seeds_dir / str(seed)
        groups += [(seed, main_dir, ("full", "no_motion")), (seed, ablations_dir / str(seed), ab.generated)]
    ids: list[str] | None = None
    for n, (seed, folder, systems) in enumerate(list(groups)):
        got, missing, _ = select_clips(replace(cfg, generated_dir=str(folder), systems=systems), labels)
        if seed is None:  # the untrained rows are context: an absent one is left out, and the log says so
            for system, why in missing.items():
                log.warning("evaluate --ablations: %s left out: %s", system, why)
            groups[n] = (seed, folder, tuple(s for s in systems if s not in missing))
            if not groups[n][2]:
                continue
        elif missing or not got:
            print(f"v2m evaluate --ablations: seed {seed}: nothing to score in {folder} "
                  f"({'; '.join(f'{s}: {w}' for s, w in missing.items()) or 'no clip'})", file=sys.stderr)
            return 1
        ids = got if ids is None else [i for i in ids if i in set(got)]
    classifier, embedder, tagger = _models(cfg)
    scores: dict[tuple[int | None, str], dict] = {}
    with threadpool_limits(limits=1):
        for seed, folder, systems in tqdm(groups, desc="ablations", unit="group", disable=None):
            if not systems:
                continue
            got, unscorable = score_all(replace(cfg, generated_dir=str(folder)), list(systems), ids, labels,
                                        classifier, embedder, tagger)
            scores.update({(seed, system): got[system] for system in systems})
            ids = [i for i in ids if i not in unscorable]
        if not ids:
            print("v2m evaluate --ablations: no clip could be scored for every system and seed", file=sys.stderr)
            return 1
        resamples = resamples_of(len(ids), cfg.bootstrap, params.base.seed)
        stats = {key: resampled_stats(s, ids, resamples, cfg.embedding, cfg.key_method)
                 for key, s in scores.items()}
    n_train = int((labels["split"] == "train").sum())
    train_clips = {system: n_train for _, _, systems in groups for system in systems if system != "reference"}
    train_clips.update({f"data{p}": fraction_size(n_train, p) for p in ab.fractions})
    summary = eval_report.ablation_summary(stats, seeds, cfg.embedding, train_clips, len(ids), ab)
    atomic_write_json(cfg.metrics_path, summary)
    eval_report.write_ablation_report(Path(cfg.report_path), summary)
    log.info("evaluate --ablations: %d clips, %d seeds: wrote %s and %s", len(ids), len(seeds), cfg.metrics_path,
             cfg.report_path)
    print(eval_report.ablation_table(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--generated", help="folder of {system}/{id}.wav (default: evaluate.generated_dir)")
    parser.add_argument("--metrics", help="eval.json to write (default: evaluate.metrics_path)")
    parser.add_argument("--report", help="report to write, plots beside it (default: evaluate.report_path)")
    parser.add_argument("--fit-tagger", action="store_true", help="train the tagger (DVC stage tagger) and stop")
    parser.add_argument("--print", action="store_true", dest="print_table", help="print the report's table and stop")
    parser.add_argument("--seeds", metavar="DIR", help="the seed study: base.seed's systems from --generated and "
                        "--models, each of seed_study.seeds' from DIR/{seed}; writes --metrics and --report")
    parser.add_argument("--models", help="folder of {system}/v2m.pt (default: evaluate.models_dir)")
    parser.add_argument("--ablations", metavar="DIR", help="the ablation group: ablations.trained of each seed from "
                        "DIR/{seed}, full and no_motion as for --seeds (SEEDS_DIR, default data/generated_seeds); "
                        "writes --metrics, --report and the data-size plot beside it")
    parser.add_argument("--seeds-dir", default="data/generated_seeds", help="with --ablations: the seed study's music")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    cfg = params.evaluate
    overrides = {k: v for k, v in (("generated_dir", args.generated), ("metrics_path", args.metrics),
                                   ("report_path", args.report), ("models_dir", args.models)) if v}
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    from pipeline import eval_report

    if args.print_table:
        return eval_report.print_table(Path(cfg.report_path))
    if args.fit_tagger:
        return fit_tagger(params, cfg)
    if args.seeds:
        return seed_study(params, cfg, Path(args.seeds))
    if args.ablations:
        return ablation_study(params, cfg, Path(args.ablations), Path(args.seeds_dir))
    if cfg.embedding not in EMBEDDINGS:  # before any work: one line naming the file and the setting
        print(f"v2m evaluate: {args.params}: evaluate.embedding must be {' or '.join(EMBEDDINGS)}, got "
              f"{cfg.embedding!r}; fix it there", file=sys.stderr)
        return 2
    labels = read_labels(Path(cfg.ingest_dir))
    ids, missing, problems = select_clips(cfg, labels)
    systems = [s for s in cfg.systems if s not in missing]
    for system, why in missing.items():
        log.warning("evaluate: %s: %s", system, why)
    if not ids:
        print(f"v2m evaluate: no {cfg.split} clip is there for every system in {cfg.generated_dir} "
              f"({'; '.join(f'{s}: {w}' for s, w in missing.items()) or 'see problems'})", file=sys.stderr)
        for i, why in problems.items():
            log.warning("evaluate: %s: %s", i, "; ".join(why))
        return 1
    from pipeline.metrics.models import MissingModelError

    try:
        classifier, embedder, tagger = _models(cfg)
    except MissingModelError as exc:  # the message names the file and what to run or set
        where = (f" (with evaluate.embedding: vggish, the paths are evaluate.passt_checkpoint and "
                 f"evaluate.vggish_weights in {args.params}; or set evaluate.embedding: tagger)"
                 if cfg.embedding == "vggish" else "")
        print(f"v2m evaluate: {exc}{where}", file=sys.stderr)
        return 1
    log.info("evaluate: %d %s clips, systems %s", len(ids), cfg.split, ", ".join(systems))
    # one BLAS thread: on a busy 2-core machine OpenBLAS's threads made each FAD (two 128 x 128 eigh) 45x slower
    with threadpool_limits(limits=1):
        scores, unscorable = score_all(cfg, systems, ids, labels, classifier, embedder, tagger)
    for i, why in unscorable.items():
        problems.setdefault(i, []).extend(why)
    ids = [i for i in ids if i not in unscorable]
    if not ids:
        print(f"v2m evaluate: no {cfg.split} clip could be scored for every system "
              f"({'; '.join(f'{i}: {w[0]}' for i, w in unscorable.items())})", file=sys.stderr)
        return 1
    key_acc_reference = {}
    if "reference" in scores:
        ref_clips = [scores["reference"]["clips"][i] for i in ids]
        key_acc_reference = {m: round(float(np.mean([c[k] for c in ref_clips if k in c])), 4)
                             for m, k in (("ks", "key_acc"), ("tagger", "key_acc_tagger"))
                             if any(k in c for c in ref_clips)}
    with threadpool_limits(limits=1):
        summary = summarise(scores, ids, cfg.embedding, cfg.bootstrap, params.base.seed, cfg.key_method)
    report = {"n_clips": len(ids), "embedding": cfg.embedding, "split": cfg.split, "systems": summary,
              "models": model_info(cfg, labels, systems), "key_method": cfg.key_method,
              "key_acc_on_reference": key_acc_reference, "missing": missing, "problems": problems,
              "per_clip": {s: {i: {k: round(v, 4) for k, v in scores[s]["clips"][i].items()} for i in ids}
                           for s in systems}}
    tagger_metrics = Path(cfg.tagger.metrics_path)
    if tagger_metrics.exists():
        report["tagger"] = json.loads(tagger_metrics.read_text())
    atomic_write_json(cfg.metrics_path, report)
    eval_report.write_report(Path(cfg.report_path), report, cfg, ids)
    log.info("evaluate: wrote %s and %s", cfg.metrics_path, cfg.report_path)
    print(eval_report.table(report))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

