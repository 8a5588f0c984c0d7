"""generate: music for any video, and the generate stage. Params: base (seed), generate; the checkpoint brings the rest.

    v2m generate VIDEO [VIDEO ...] -o OUT [--model CKPT] [--text "..."] [--seed S] [--cfg G] [--top-k K]
                 [--temperature T] [--candidates N] [--keep-audio [--mix-db DB]] [--wav]
    v2m generate --stage        the eval split -> data/generated/{system}/{id}.{wav,mp4} + manifest.csv

Model loading, features on the fly, window batching, decoding and muxing are the inference library,
pipeline/inference.py (how any video is normalised, how long videos are windowed and crossfaded, when the video
stream is copied); this module is its command line and the DVC stage.

`v2m generate VIDEO ...`: `--keep-audio` mixes the original soundtrack under the music at `--mix-db`; `--wav` writes
the music alone. Bad input (missing, not a video, no video stream, corrupt, unwritable output) ends in one line
naming the file and the problem and a non-zero exit status, and leaves no partial output (every file is written under
a temporary name and renamed). A batch goes on past a bad file and lists the failures at the end. Deterministic for a
fixed seed. Refused before any work: an output that is an input (also through a link: `-o same.mp4`, `-o .` in the
inputs' folder), two inputs whose outputs would have one name, a video longer than `generate.max_duration_s`. SIGTERM,
SIGHUP and Ctrl-C remove the temporary files and scratch folders; after a SIGKILL the next run removes them.

The stage reads the cached features of the eval split (exactly the training-time inputs), writes the trained systems
(`generate.systems`), two baselines with no learning of their own, `retrieval` (the music of the training clip whose
mean CLIP embedding is nearest, by cosine) and `random` (a seeded random training clip's music), both cut or looped to
length, and `reference` (the true music through the codec: encode + decode, the decoder's ceiling). One manifest.csv
row per (system, id): status ok / failed, reason, error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import threadpoolctl
import torch
from tqdm import tqdm

from pipeline import codecs
from pipeline.config import GenerateConfig, Params, load_params
from pipeline.inference import (
    VIDEO_SUFFIXES,
    GenerateError,
    Model,
    decode_windows,
    default_model,
    generate_codes,
    generate_one,
    load_model,
    mux,
    prompt_timbre,
    remove_own_scratch,
    text_embedding,
)
from pipeline.media import MediaError, load_audio, write_wav
from pipeline.runtime import cores_per_process, exit_on_signals, local_ranks, local_world_size, wait_for_ranks
from pipeline.shards import FAILED, OK, atomic_write_json, load_features, report_rows, stable_hash, write_manifest

log = logging.getLogger(__name__)

STAGE_COLUMNS = ["system", "id", "status", "reason", "error", "wav_path", "mp4_path", "duration_s", "source_id"]
# the text model's rows also say what its prompt was and which instrument it names (evaluate scores that one)
PROMPT_COLUMNS = ["prompt", "prompt_instrument"]
BASELINES = ("retrieval", "random")


# ----------------------------------------------------------------------------------------------------------------------
# `v2m generate VIDEO ...`
# ----------------------------------------------------------------------------------------------------------------------

def output_path(src: Path, out: Path, many: bool, wav_only: bool) -> Path:
    """Where a video's result goes: `out` itself for one input and a file name, else out/{stem}{ext}."""
    if not many and out.suffix and not out.is_dir():
        return out
    suffix = ".wav" if wav_only else (src.suffix.lower() if src.suffix.lower() in VIDEO_SUFFIXES else ".mkv")
    return out / f"{src.stem}{suffix}"


def check_outputs(inputs: list[Path], dests: list[Path]) -> None:
    """Refuse, before any work, a batch that would destroy data: an output that is one of the inputs (the same file,
    also through a link or a hard link: `-o same.mp4`, or `-o .` in the inputs' folder), or two inputs whose outputs
    have the same name (a/x.mp4 and b/x.mp4 into one folder). Raises GenerateError naming the files."""
    for dest in dests:
        for src in inputs:
            if dest.exists() and src.exists() and os.path.samefile(src, dest):
                raise GenerateError(f"{dest}: is the input {src}; writing it would replace the video, so choose "
                                    "another output")
    taken: dict[Path, Path] = {}
    for src, dest in zip(inputs, dests, strict=True):
        key = dest.parent.resolve() / dest.name
        if key in taken:
            raise GenerateError(f"{taken[key]} and {src} would both be written to {dest}; rename one, or run them "
                                "with separate output folders")
        taken[key] = src


def run_files(inputs: list[Path], out: Path, model: Model, cfg: GenerateConfig, seed: int, text: str | None,
              wav_only: bool, keep_audio: bool) -> tuple[list[dict], list[str]]:
    """Every input in turn; a bad one is reported and skipped. Returns (results, failure lines)."""
    many = len(inputs) > 1
    if many and out.suffix and not out.is_dir():
        raise GenerateError(f"{out}: several inputs need an output folder, not a file")
    dests = [output_path(src, out, many, wav_only) for src in inputs]
    check_outputs(inputs, dests)
    vector, timbre = text_embedding(model, text), prompt_timbre(model, text)
    results, failures = [], []
    for src, dest in tqdm(list(zip(inputs, dests, strict=True)), desc="generate", unit="file",
                          disable=None if len(inputs) > 1 else True):
        try:
            result = generate_one(model, src, dest, cfg, seed, vector, wav_only, keep_audio, timbre=timbre)
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
              baselines: bool = True, rank: int = 0, world: int = 1, patches: Path | None = None) -> pd.DataFrame:
    """The eval split through every system (checkpoints models_dir/{system}/v2m.pt, default train.out_dir), then the
    baselines and the reference unless `baselines` is False -> out_dir/{system}/{id}.{wav,mp4}. Rank r of `world`
    (runtime.local_ranks, `generate.workers`) does every world-th clip; rank 0 writes the manifest (the other ranks
    return an empty frame). Each clip's music depends on the seed and its id only, so the files are the same for
    any number of ranks. `patches`: the patch stream's store, which a spatial-fusion model reads (without it, that
    model's rows fail with reason no_model and an error that names --patches)."""
    cfg, seed = params.generate, params.base.seed
    out_dir = Path(out_dir or cfg.out_dir)
    models_dir = Path(models_dir or params.train.out_dir)
    upstream = pd.read_parquet(Path(params.ingest.out_dir) / "manifest.parquet")
    upstream = upstream[upstream["status"] == OK]
    clip, flow = load_features(Path(params.embed.out_dir) / "clip"), load_features(Path(params.embed.out_dir) / "flow")
    scene_dir = Path(params.embed.out_dir) / "scene"
    scene = load_features(scene_dir) if scene_dir.is_dir() else {}
    have = set(clip) & set(flow)
    rows = {r["id"]: r for r in upstream.to_dict("records") if r["id"] in have}
    patch = load_features(patches) if patches is not None else {}
    eval_ids = sorted(i for i, r in rows.items() if r["split"] == cfg.split)[: cfg.max_clips or None]
    train_ids = sorted(i for i, r in rows.items() if r["split"] == "train")
    if not eval_ids:
        raise SystemExit(f"generate: no ok clips of split {cfg.split!r} with features")
    fps = {s: float(pd.read_parquet(Path(params.embed.out_dir) / "manifest.parquet").set_index("id")
                    .loc[eval_ids[0], f"{s}_fps"]) for s in ("clip", "flow")}
    music_dir = Path(params.tokenize.music_dir)
    sr = params.base.sample_rate
    records: list[dict] = []

    def emit(system: str, item_id: str, make, source_id: str = "", prompt: tuple[str, str] | None = None) -> None:
        t0 = time.perf_counter()
        wav_path, mp4_path = out_dir / system / f"{item_id}.wav", out_dir / system / f"{item_id}.mp4"
        rec = {"system": system, "id": item_id, "status": OK, "reason": "", "error": "", "wav_path": str(wav_path),
               "mp4_path": str(mp4_path), "source_id": source_id}
        if prompt is not None:
            rec.update(prompt=prompt[0], prompt_instrument=prompt[1])
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
            model = load_model(models_dir / system / "v2m.pt", params)
            if model.net.cfg.fusion.mode == "spatial" and patches is None:
                raise GenerateError(f"{models_dir / system / 'v2m.pt'} is a spatial-fusion model: it reads the patch "
                                    "stream, give --patches DIR (`v2m embed --streams patch --out D` writes D/patch)")
            models[system] = model
        except GenerateError as exc:
            for item_id in eval_ids:
                records.append({"system": system, "id": item_id, "status": FAILED, "reason": "no_model",
                                "error": str(exc)})
    if rank != 0:
        records.clear()  # rank 0 writes those
    instruments = sorted({str(r.get("instrument") or "") for r in rows.values()} - {""})
    if "text" in models and len(instruments) < 2:
        raise SystemExit("generate: the text model is steered to another instrument than the clip's: the ingest "
                         "manifest needs SynthV2M's instrument labels (at least two instruments)")
    prompt_vectors: dict[str, np.ndarray] = {}
    # the work in a fixed order, each rank taking every world-th job: (system, id) per trained system, then per id
    # the baselines; the merged rows are in that order whatever the number of ranks
    jobs = [(system, item_id) for system in models for item_id in eval_ids]
    jobs += [("baselines", item_id) for item_id in (eval_ids if baselines else [])]
    codec = next(iter(models.values())).codec if models else _stage_codec(params)
    means = {i: _unit(np.asarray(clip[i], np.float64).mean(0)) for i in train_ids + eval_ids}
    train_matrix = np.stack([means[i] for i in train_ids]) if train_ids else None
    threads = cfg.threads or cores_per_process(local_world_size())
    torch.set_num_threads(threads)
    # numpy's BLAS too (the codec's decoding, every candidate draw's): by default each worker would start a BLAS thread
    # per core, and two workers on two cores then wait on each other (1 min 13 s of 2 min 55 s for the demo's trained
    # systems); the bytes are the same with any count (docs/timings.md). Restored after the loop (whose items catch
    # their own errors)
    blas = threadpoolctl.threadpool_limits(threads, user_api="blas")
    label = f"generate [rank {rank}/{world}]" if world > 1 else "generate"
    for job, (system, item_id) in enumerate(tqdm(jobs, desc=label, unit="job", disable=None)):
        if job % world != rank:
            continue
        start = len(records)
        if system in models:
            def make(model=models[system], item_id=item_id, vector=None, timbre=None):
                feats = {"clip": np.asarray(clip[item_id]), "flow": np.asarray(flow[item_id]),
                         "clip_fps": fps["clip"], "flow_fps": fps["flow"]}
                if model.net.cfg.scene_dim:  # the scene rows are the CLIP rows' frames
                    if item_id not in scene:
                        raise MediaError(str(scene_dir), f"no scene features for {item_id} (run `v2m embed`)",
                                         "no_scene")
                    feats.update(scene=np.asarray(scene[item_id]), scene_fps=fps["clip"])
                if model.net.cfg.fusion.mode == "spatial":  # the patch rows are the CLIP rows' frames
                    if item_id not in patch:
                        raise MediaError(str(patches), f"no patch features for {item_id}", "no_patches")
                    feats.update(patch=np.asarray(patch[item_id]), patch_fps=fps["clip"])
                n_samples = int(round(float(rows[item_id]["duration_s"]) * model.codec.sample_rate))
                windows = generate_codes(model, feats, model.codec.num_frames(n_samples), cfg,
                                         _item_seed(seed, item_id), vector, progress=False, timbre=timbre)
                wav = decode_windows(model.codec, windows, n_samples)
                return wav, model.codec.sample_rate
            if system == "text":  # text steering: no prompt, the clip's own instrument, another one
                for name, (text, instrument) in steering_prompts(rows[item_id], instruments,
                                                                 params.ablations.caption).items():
                    if text and text not in prompt_vectors:
                        prompt_vectors[text] = text_embedding(models[system], text)
                    vector, timbre = prompt_vectors.get(text), prompt_timbre(models[system], text)
                    emit(name, item_id, lambda v=vector, t=timbre: make(vector=v, timbre=t), prompt=(text, instrument))
            else:
                emit(system, item_id, make)
        else:
            emit("reference", item_id,
                 lambda i=item_id: (codecs.round_trip(codec, music_dir / f"{i}.wav"), codec.sample_rate))
            if train_matrix is not None:
                nearest = train_ids[nearest_row(train_matrix, means[item_id])]
                emit("retrieval", item_id, lambda j=nearest: load_audio(music_dir / f"{j}.wav", sr, mono=False),
                     nearest)
                rng = np.random.default_rng([seed, int(stable_hash(item_id), 16)])
                chosen = train_ids[int(rng.integers(len(train_ids)))]
                emit("random", item_id, lambda j=chosen: load_audio(music_dir / f"{j}.wav", sr, mono=False), chosen)
        for rec in records[start:]:
            rec["_job"] = job
    blas.restore_original_limits()
    records = _gather(records, out_dir, rank, world, stable_hash(json.dumps([list(models), jobs])))
    if records is None:
        return pd.DataFrame(columns=STAGE_COLUMNS)  # rank > 0: rank 0 writes the manifest
    columns = STAGE_COLUMNS + (PROMPT_COLUMNS if any("prompt" in rec for rec in records) else [])
    frame = pd.DataFrame([{k: v for k, v in rec.items() if k != "_job"} for rec in records], columns=columns)
    write_manifest(out_dir / "manifest.csv", frame.to_dict("records"), columns=columns)
    return frame


def other_instrument(clip_id: str, instrument: str, instruments: list[str]) -> str:
    """The instrument a clip's music is steered to: one of the others, fixed by the id's stable hash."""
    others = [i for i in instruments if i != instrument]
    return others[int(stable_hash(clip_id), 16) % len(others)]


def steering_prompts(row: dict, instruments: list[str], caption: str) -> dict[str, tuple[str, str]]:
    """The text model's three generations of a clip: {system: (prompt, the instrument it names)} for text (no prompt;
    scored against the clip's instrument), text_own and text_other."""
    own = str(row["instrument"])
    other = other_instrument(str(row["id"]), own, instruments)
    return {"text": ("", own), "text_own": (caption.format(instrument=own), own),
            "text_other": (caption.format(instrument=other), other)}


def _gather(records: list[dict], out_dir: Path, rank: int, world: int, token: str) -> list[dict] | None:
    """Every rank's rows on rank 0, in job order (None on the other ranks): each rank writes its rows to
    {out_dir}/.ranks/rows-R.json, and rank 0 reads them after the barrier and removes them."""
    if world == 1:
        return records
    folder = out_dir / ".ranks"
    if rank != 0:
        atomic_write_json(folder / f"rows-{rank:05d}.json", records)
    wait_for_ranks(out_dir, rank, world, token, "generate")
    if rank != 0:
        return None
    for r in range(1, world):
        path = folder / f"rows-{r:05d}.json"
        records = records + json.loads(path.read_text())
        path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    order = {id(rec): n for n, rec in enumerate(records)}  # a job's rows keep their order; no-model rows first
    return sorted(records, key=lambda rec: (rec.get("_job", -1), order[id(rec)]))


def nearest_row(matrix: np.ndarray, query: np.ndarray) -> int:
    """Index of the row of `matrix` [N, D] with the largest dot product with `query` [D], the same on any machine:
    float64 products rounded to 2^-30 before the argmax (BLAS kernels differ in the last bits, far below that);
    equal scores go to the first row."""
    scores = np.rint((np.asarray(matrix, np.float64) @ np.asarray(query, np.float64)) * 2.0**30)
    return int(np.argmax(scores))


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """[..., N] cut or looped to n samples (a baseline's music)."""
    if audio.shape[-1] == 0:
        return np.zeros((*audio.shape[:-1], n), np.float32)
    reps = -(-n // audio.shape[-1])
    return np.concatenate([audio] * reps, axis=-1)[..., :n] if reps > 1 else audio[..., :n]


def _item_seed(seed: int, item_id: str) -> int:
    """Per-clip seed: the same clip gets the same music whatever else is in the split."""
    return int(stable_hash(f"{seed}:{item_id}"), 16) % (2**63)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _stage_codec(params: Params):
    return codecs.load_codec(params.tokenize.codec, params.tokenize)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    with exit_on_signals():  # SIGTERM / SIGHUP clean up temp files and scratch folders, as Ctrl-C does
        try:
            return _main(argv)
        finally:
            remove_own_scratch()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m generate", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="video files")
    parser.add_argument("-o", "--out", type=Path, help="output file (one input) or folder")
    parser.add_argument("--model", type=Path, help="checkpoint (default: generate.model, models/v2m.pt)")
    parser.add_argument("--text", help="a text prompt (models trained with train.text: true)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: base.seed)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance (default: generate.sampling.guidance)")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy")
    parser.add_argument("--plausibility", type=float, help="with guidance, sample only tokens at least this fraction "
                        "as likely as the conditional model's first choice; 0 = all")
    parser.add_argument("--harmony-bias", type=float, help="weight of the tokens' agreement with the retrieved "
                        "harmony (models with a harmony track); 0 = none")
    parser.add_argument("--mode-guard", type=float, help="weight of the penalty on tokens that sound the retrieved "
                        "key's parallel key (models with a harmony track); 0 = none")
    parser.add_argument("--candidates", type=int, help="draws per window, the one whose music reads as the "
                        "retrieved key kept (models with a harmony bank; default: generate.candidates); 1 = one draw")
    parser.add_argument("--prompt-seconds", type=float, help="overlap of consecutive windows (long videos)")
    parser.add_argument("--crossfade-seconds", type=float,
                        help="of that overlap, the last part both windows write, their audio crossfaded there")
    parser.add_argument("--no-cache", action="store_true", help="no KV cache (slow; for comparison)")
    parser.add_argument("--keep-audio", action="store_true", help="mix the original soundtrack under the music")
    parser.add_argument("--mix-db", type=float, help="level of the kept soundtrack vs the music (default -12)")
    parser.add_argument("--wav", action="store_true", help="write the music alone, as .wav")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stage", action="store_true", help="run the DVC stage: the eval split, every system")
    parser.add_argument("--models", type=Path, help="with --stage: folder of {system}/v2m.pt (default: train.out_dir)")
    parser.add_argument("--no-baselines", action="store_true", help="with --stage: the trained systems only")
    parser.add_argument("--ablations", action="store_true", help="with --stage: the ablation group's systems "
                        "(ablations.systems, spatial, data{P} per ablations.fractions) instead of generate.systems")
    parser.add_argument("--patches", type=Path, help="with --stage: the patch stream's store (data/features_spatial/"
                        "patch), which the spatial-fusion model reads")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    if args.ablations:
        params = dataclasses.replace(params, generate=dataclasses.replace(params.generate,
                                                                          systems=params.ablations.trained))
    if args.stage:
        out_dir = args.out or Path(params.generate.out_dir)
        rank, world = local_ranks(params.generate.workers, "generate", list(sys.argv[1:] if argv is None else argv))
        frame = run_stage(params, out_dir, args.models, baselines=not args.no_baselines, rank=rank, world=world,
                          patches=args.patches)
        if rank != 0:
            return 0
        return report_rows("generate", frame, params.generate.max_fail_ratio,
                           label=lambda rec: f"{rec['system']}/{rec['id']}", suffix=f" -> {out_dir}")
    if not args.inputs or args.out is None:
        parser.error("give one or more videos and -o OUT (or --stage)")
    sampling = {k: v for k, v in {"guidance": args.cfg, "top_k": args.top_k, "temperature": args.temperature,
                                  "plausibility": args.plausibility, "harmony_bias": args.harmony_bias,
                                  "mode_guard": args.mode_guard}.items()
                if v is not None}
    overrides = {k: v for k, v in {"prompt_seconds": args.prompt_seconds, "crossfade_seconds": args.crossfade_seconds,
                                   "mix_db": args.mix_db, "candidates": args.candidates}.items()
                 if v is not None}
    if args.no_cache:
        overrides["use_cache"] = False
    overrides["sampling"] = dataclasses.replace(params.generate.sampling, **sampling)
    params = dataclasses.replace(params, generate=dataclasses.replace(params.generate, **overrides))
    try:
        model = load_model(args.model or default_model(params.generate), params)
        torch.set_num_threads(params.generate.threads or cores_per_process(1))
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
