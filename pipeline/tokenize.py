"""tokenize: data/music -> data/tokens/{codec}/ shards + manifest.parquet, the fitted codec in models/codecs/{codec}/,
metrics/codec.json and reports/codec_roundtrip.png. Params: base, tokenize.

The codec (`tokenize.codec`, see pipeline/codecs/) turns each ok track's `music_path` into codes; the store is a
`pipeline.shards.FeatureStore` holding per id an int16 array [T, K] (time first, so items concatenate along axis 0:
the TRANSPOSE of the codec interface's codes [K, T]), with `frame_rate` and `duration_s` in its index; read it with
`pipeline.shards.load_features("data/tokens/melvq", ids)`. `codec.json` beside the shards names the codec, its rates
and where its fitted state is. A codec that needs fitting (melvq) is fitted first, on the train split only, and saved
with the fit's key (settings, seed, each train track's sha256): an unchanged key reloads it instead of fitting again.

Incremental and scale-out exactly as embed: an id is recomputed when it is new, its music file's sha256 changed, or the
codec's state hash changed (a refit recomputes everything); rank r of a torchrun / SLURM world writes the shards
s % world == r (rank 0 fits; the others wait for the fitted state), and rank 0 writes the manifest, the round trip
metrics and the figure. The round trip (encode -> decode vs the original, with the project's metrics) is measured on
the `tokenize.eval_split` tracks (SynthV2M: beat F1 against the labelled beats) and on the real recordings in
`tokenize.real_music_dir` ("real": null, with the reason, when absent); it is skipped when nothing it uses changed.

Ids not ok upstream are skipped(upstream_<status>); silent music is skipped(silent_audio); an undecodable or missing
file is failed(corrupt / missing) and the rest go on. The exit status is non-zero only when the failed fraction
exceeds `tokenize.max_fail_ratio`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import codecs
from pipeline.codecs import roundtrip
from pipeline.config import BaseConfig, TokenizeConfig, load_params
from pipeline.manifest import SEPARATE_COLUMNS, label_columns, read_upstream, skipped_upstream
from pipeline.media import MediaError, load_audio, rms_db
from pipeline.runtime import cores_per_process, dist_env, local_world_size, wait_for_ranks
from pipeline.shards import (
    FAILED,
    OK,
    SKIPPED,
    FeatureStore,
    Item,
    atomic_write_bytes,
    atomic_write_json,
    report_rows,
    sha256_file,
    shard_of,
    stable_hash,
)

log = logging.getLogger(__name__)

COLUMNS = ["id", "split", "status", "reason", "error", "shard", "n_frames", "duration_s", "music_path", "music_sha256"]
SKIP_REASONS = {"silent_audio"}  # a store failure with this reason is a skipped row: the input is fine but unusable
FIT_WAIT_S = 12 * 3600.0  # other ranks wait this long for rank 0's fit
FIT_POLL_S = 5.0


def threads_for(cfg: TokenizeConfig) -> int:
    """`tokenize.threads`, or (0) the cores divided by the processes on this node."""
    return cfg.threads or cores_per_process(local_world_size())


def music_hash(path: str) -> str:
    return sha256_file(path) if Path(path).is_file() else "missing"


def prepare_codec(cfg: TokenizeConfig, seed: int, upstream: pd.DataFrame, rank: int) -> codecs.Codec:
    """Build the codec; a fitted one (melvq) is loaded when its saved fit key matches, else fitted on the train split
    (rank 0; the other ranks wait for it) and saved to {model_dir}/{codec}/."""
    codec = codecs.create_codec(cfg.codec, cfg, seed=seed)
    if not codec.needs_fit:  # nothing to save (encodec_32khz), but model_dir is the stage's output all the same
        Path(cfg.model_dir).mkdir(parents=True, exist_ok=True)
        return codec
    train = upstream[(upstream["status"] == OK) & (upstream["split"] == "train")].sort_values("id")
    limit = getattr(codec.cfg, "fit_max_items", len(train))
    if len(train) > limit:
        train = train.iloc[np.sort(np.random.default_rng([seed, 2]).choice(len(train), limit, replace=False))]
    if train.empty:
        raise SystemExit(f"tokenize: {cfg.codec} is fitted on the train split, and {cfg.music_dir} has no ok train "
                         "music")
    paths = list(train["music_path"])
    key = stable_hash(json.dumps({"codec": codec.name, "config": codec.fit_settings(), "seed": seed,
                                  "train": [[i, music_hash(p)] for i, p in zip(train["id"], paths, strict=True)]}))
    folder = Path(cfg.model_dir) / codec.name
    deadline = time.monotonic() + FIT_WAIT_S
    while True:
        saved = _saved_key(folder, codec.name)
        if saved == key:
            try:
                codec.load(folder)
                log.info("tokenize: %s: reusing the fitted state in %s", codec.name, folder)
                return codec
            except codecs.CodecError as exc:
                if rank != 0:
                    raise
                log.warning("tokenize: %s; fitting again", exc)
        if rank == 0:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"tokenize: rank {rank} waited {FIT_WAIT_S / 3600:g} h for rank 0 to fit {folder}")
        time.sleep(FIT_POLL_S)
    log.info("tokenize: fitting %s on %d train tracks", codec.name, len(paths))
    started = time.perf_counter()
    info = codec.fit(fit_audio(paths, codec.sample_rate, cfg.silence_db))
    info["seconds"] = round(time.perf_counter() - started, 1)
    codec.save(folder, extra={"fit_key": key})
    log.info("tokenize: fitted %s in %.1f s (%s) -> %s", codec.name, info["seconds"], info, folder)
    return codec


def fit_audio(paths: list[str], sample_rate: int, silence_db: float):
    """Mono audio [N] of each train track; unreadable or silent tracks are left out (they fail or are skipped when
    tokenized, with their reason in the manifest)."""
    for path in tqdm(paths, desc="tokenize: fit audio", unit="track", disable=None):
        try:
            audio = load_audio(path, sample_rate)[0][0]
        except MediaError as exc:
            log.warning("tokenize: fit: left out %s", exc)
            continue
        if len(audio) and rms_db(audio) >= silence_db:
            yield audio


def _saved_key(folder: Path, name: str) -> str | None:
    try:
        return json.loads((folder / f"{name}.json").read_text()).get("fit_key")
    except (OSError, ValueError):
        return None


class Tokenizer:
    """The compute function FeatureStore calls: music file -> (int16 codes [T, K], index metadata)."""

    def __init__(self, codec: codecs.Codec, cfg: TokenizeConfig):
        if codec.codebook_size > np.iinfo(np.int16).max + 1:
            raise SystemExit(f"tokenize: {codec.name} has {codec.codebook_size} codes; the store holds int16")
        self.codec, self.cfg = codec, cfg

    def __call__(self, item: Item) -> tuple[np.ndarray, dict]:
        path = Path(item.payload)
        if not path.is_file():
            raise MediaError(path, "no such file", "missing")
        audio, sr = load_audio(path, self.codec.sample_rate, mono=True)
        if audio.shape[1] == 0:
            raise MediaError(path, "no audio samples")
        if (level := rms_db(audio)) < self.cfg.silence_db:
            raise MediaError(path, f"RMS {level:.1f} dBFS < tokenize.silence_db {self.cfg.silence_db}",
                             "silent_audio")
        codes = self.codec.encode(audio[0])  # (K, T)
        return codes.T.astype(np.int16), {"frame_rate": self.codec.frame_rate,
                                          "duration_s": round(audio.shape[1] / sr, 6)}


def write_tokens_manifest(upstream: pd.DataFrame, store: FeatureStore, path: Path) -> pd.DataFrame:
    """One row per upstream id, from every shard's done file (so it covers all ranks' work)."""
    got = {r["id"]: r for s in range(store.num_shards) for r in (store.done(s) or {}).get("rows", [])}
    meta = store.metadata().set_index("id")
    labels = label_columns(upstream, SEPARATE_COLUMNS)
    rows = []
    for row in upstream.to_dict("records"):
        rec = {"id": row["id"], "split": row["split"], "status": OK, "reason": "", "error": ""}
        if row["status"] != OK:
            rec.update(skipped_upstream(row, "separate"))
        else:
            done = got.get(row["id"]) or {"status": FAILED, "reason": "missing", "error": "no tokens after the run",
                                          "shard": -1}
            rec.update(shard=done["shard"], music_path=row["music_path"])
            if done["status"] == OK and row["id"] in meta.index:
                m = meta.loc[row["id"]]
                rec.update(n_frames=int(m["n_frames"]), duration_s=float(m["duration_s"]),
                           music_sha256=m["source_hash"])
            else:
                status = SKIPPED if done["reason"] in SKIP_REASONS else FAILED
                rec.update(status=status, reason=done["reason"], error=done["error"])
        rows.append({**{c: row.get(c) for c in labels}, **rec})
    frame = pd.DataFrame(rows, columns=COLUMNS + labels)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    if not path.exists() or path.read_bytes() != buffer.getvalue():  # a no-op rerun leaves the file alone
        atomic_write_bytes(path, buffer.getvalue())
    return frame


def run(base: BaseConfig, cfg: TokenizeConfig, rank: int = 0, world: int = 1) -> dict:
    """Fit (if needed), tokenize this rank's shards; rank 0 then writes the manifest, metrics and figure.

    Returns {"codec", "rows": this rank's store rows, "computed": ids computed, "manifest": frame (rank 0) or None,
    "metrics": the codec metrics (rank 0) or None}.
    """
    manifest_path = Path(cfg.music_dir) / "manifest.parquet"
    upstream = read_upstream(manifest_path, "tokenize", "separate")
    missing = {"id", "split", "status", "reason", "music_path"} - set(upstream.columns)
    if missing:
        raise SystemExit(f"tokenize: {manifest_path}: missing column(s) {', '.join(sorted(missing))}")
    try:
        codec = prepare_codec(cfg, base.seed, upstream, rank)
    except (codecs.CodecError, FileNotFoundError) as exc:
        raise SystemExit(f"tokenize: {exc}") from None
    encoder_hash = stable_hash(f"{codec.name}:{codec.state_hash()}")
    out = Path(cfg.out_dir) / codec.name
    store = FeatureStore(out, cfg.num_shards)
    ok = upstream[upstream["status"] == OK]
    mine = [r for r in ok.to_dict("records") if shard_of(r["id"], cfg.num_shards) % world == rank]
    items = [Item(r["id"], music_hash(r["music_path"]), r["music_path"]) for r in mine]
    rows = store.update(items, encoder_hash, Tokenizer(codec, cfg), rank, world,
                        progress=f"tokenize {codec.name}" + (f" [rank {rank}/{world}]" if world > 1 else ""))
    result = {"codec": codec, "rows": rows, "computed": sorted(r["id"] for r in rows if r["computed"]),
              "manifest": None, "metrics": None}
    wait_for_ranks(out, rank, world, stable_hash(json.dumps([encoder_hash, sorted(ok["id"])])), "tokenize")
    if rank != 0:
        return result
    state_dir = str(Path(cfg.model_dir) / codec.name) if codec.needs_fit else ""
    info = {**codec.describe(), "encoder_hash": encoder_hash, "state_dir": state_dir,
            "layout": "per id int16 [T, K] (the codec's codes [K, T] transposed); index: frame_rate, duration_s"}
    if not (out / "codec.json").exists() or json.loads((out / "codec.json").read_text()) != info:
        atomic_write_json(out / "codec.json", info)
    result["manifest"] = write_tokens_manifest(upstream, store, out / "manifest.parquet")
    result["metrics"] = roundtrip.report(codec, encoder_hash, result["manifest"], store, cfg)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m tokenize", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--music", help="music folder with manifest.parquet (default: tokenize.music_dir)")
    parser.add_argument("--out", help="token stores root; the codec's store is OUT/{codec} (default: tokenize.out_dir)")
    parser.add_argument("--models", help="fitted codecs root (default: tokenize.model_dir)")
    parser.add_argument("--metrics", help="round trip metrics JSON (default: tokenize.metrics_path)")
    parser.add_argument("--figure", help="spectrogram figure PNG (default: tokenize.figure_path)")
    parser.add_argument("--real", help="real recordings for the round trip (default: tokenize.real_music_dir)")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    overrides = {"music_dir": args.music, "out_dir": args.out, "model_dir": args.models, "metrics_path": args.metrics,
                 "figure_path": args.figure, "real_music_dir": args.real}
    cfg = dataclasses.replace(params.tokenize, **{k: v for k, v in overrides.items() if v is not None})
    rank, world = dist_env()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads_for(cfg)):
        result = run(params.base, cfg, rank, world)
    name = result["codec"].name
    print(f"tokenize: {name}: rank {rank}/{world}: {len(result['computed'])} tracks tokenized, the rest unchanged "
          f"since the last run -> {Path(cfg.out_dir) / name}")
    if result["manifest"] is None:
        return 0
    for subset, values in (result["metrics"] or {}).get("round_trip", {}).items():
        text = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)) if values else "n/a"
        print(f"tokenize: round trip on {subset}: {text}")
    return report_rows("tokenize", result["manifest"], cfg.max_fail_ratio,
                       show=lambda rec: rec["status"] != OK and not str(rec["reason"]).startswith("upstream_"))


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m pipeline.tokenize` runs this
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
