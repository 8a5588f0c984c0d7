"""embed: data/ingest/clips -> data/features/{clip,flow,scene}/ shards + data/features/manifest.parquet. Params: base,
embed.

Three streams per clip, on one time axis (row k = time k / fps): CLIP image embeddings at `embed.clip_fps`
(pipeline/encoders/clip.py), a compact optical-flow descriptor at `embed.flow_fps` (pipeline/encoders/flow.py) and the
scene stream, an edge-orientation spectrum of the CLIP stream's frames (pipeline/encoders/scene.py: what shapes the
scene is made of, the timbre's cue; integer arithmetic, the same bytes on every CPU), all through
`pipeline.encoders.streams.Encoders` (which generation uses too, so any video gets the same features).
Each stream is a `pipeline.shards.FeatureStore`: {stream}/{shard:05d}.npy + .index.parquet + .done.json (last),
shard = stable hash of id mod `embed.num_shards`; read them with `pipeline.shards.load_features(root, ids)`.

Incremental: an item is recomputed only when it is new, its ingested clip changed (source hash: the ingest row's
source SHA-256, params hash and path), or its stream's encoder hash changed (the encoder's config, fps and weights
hash, per stream: changing `embed.flow_fps` recomputes flow only). Shards whose items are unchanged are not
rewritten; a shard without its done file (a killed run) is rebuilt. Encoders are loaded only when there is work.

Scale-out (pipeline/runtime.py): rank and world size come from torchrun (RANK / WORLD_SIZE) or SLURM (SLURM_PROCID /
SLURM_NTASKS); rank r writes the shards s with s % world == r, so N processes write exactly the shards one process
writes. Rank 0 waits for the others (a gloo barrier when MASTER_ADDR is set, as under torchrun; else rank marker files
in {out}/.ranks/ keyed by the SLURM job step), then writes the manifest from the shards' done files, and
`embed.report_path`.

Ids not ok upstream are skipped(upstream_<status>); an undecodable clip is failed(corrupt) and the rest go on; the exit
status is non-zero only when the failed fraction exceeds `embed.max_fail_ratio`. `v2m embed --init-encoders` writes
the seeded CLIP weights to `embed.encoders_dir` (the DVC stage `encoders`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import BaseConfig, EmbedConfig, Params, load_params, to_dict
from pipeline.encoders import clip as clip_enc
from pipeline.encoders import flow as flow_enc
from pipeline.encoders import scene as scene_enc
from pipeline.encoders.streams import Encoders
from pipeline.manifest import INGEST_COLUMNS, label_columns, read_upstream, skipped_upstream, upstream_hash
from pipeline.runtime import local_ranks, resolve_device, set_threads, wait_for_ranks
from pipeline.shards import (
    FAILED,
    OK,
    FeatureStore,
    Item,
    atomic_write_json,
    params_hash,
    report_rows,
    stable_hash,
    write_manifest,
)

log = logging.getLogger(__name__)

STREAMS = ("clip", "flow", "scene")  # the default: what the systems read (scene: full and its variants, train.scene)
# `--streams patch --out data/features_spatial` (the DVC stage `embed_spatial`, for the spatial-fusion ablation only)
OPTIONAL_STREAMS = ("patch",)


def columns(streams: tuple[str, ...]) -> list[str]:
    """The manifest's columns before the labels."""
    per_stream = [f"{s}_{c}" for s in streams for c in ("n_frames", "fps")]
    return ["id", "split", "status", "reason", "error", "shard", "duration_s", *per_stream, "source_hash"]


def encoder_hashes(base: BaseConfig, cfg: EmbedConfig) -> dict[str, str]:
    """Per stream, a hash of everything that determines its features (not batch sizes, devices or threads)."""
    clip, flow = cfg.clip, cfg.flow
    flow_enc.check(flow)
    clip_facts = {"model": clip.model, "pretrained": clip.pretrained, "fps": cfg.clip_fps,
                  "weights": clip_enc.weights_identity(clip, base.seed, cfg.encoders_dir), "version": clip_enc.VERSION}
    return {
        "clip": params_hash(clip_facts),
        "flow": params_hash({"method": flow.method, "weights": flow_enc.weights_identity(flow), "fps": cfg.flow_fps,
                             "dis_preset": flow.dis_preset if flow.method == "opencv_dis" else "",
                             "grid": flow.grid, "bins": flow.direction_bins, "version": flow_enc.VERSION}),
        "patch": params_hash({**clip_facts, "patch_grid": flow.grid}),
        "scene": params_hash({"fps": cfg.clip_fps, "bins": scene_enc.N_BINS, "coeffs": scene_enc.N_COEFFS,
                              "strongest": scene_enc.STRONGEST, "version": scene_enc.VERSION}),
    }


def run(params: Params, ingest_manifest: Path, out_dir: Path, rank: int = 0, world: int = 1,
        streams: tuple[str, ...] = STREAMS) -> dict:
    """Bring this rank's shards of `streams` up to date; rank 0 then writes the manifest and (with the flow stream)
    the report.

    Returns {"rows": this rank's FeatureStore rows per stream, "computed": ids computed per stream,
    "manifest": the manifest frame (rank 0) or None}.
    """
    base, cfg = params.base, params.embed
    threads = set_threads(cfg.threads)
    log.info("embed: rank %d of %d, %d torch thread(s)", rank, world, threads)
    upstream = read_upstream(ingest_manifest, "embed", "ingest")
    try:
        hashes = encoder_hashes(base, cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"embed: {exc}") from None
    if cfg.clip.pretrained == "none":
        log.warning("embed: the CLIP stream uses a SEEDED RANDOM %s (%s/clip): features carry colour and layout, "
                    "not learned semantics", cfg.clip.model, cfg.encoders_dir)
    ok = upstream[upstream["status"] == OK]
    items = [Item(r["id"], upstream_hash(r, "clip_path"), r["clip_path"]) for r in ok.to_dict("records")]
    encoders = Encoders(cfg, resolve_device(cfg.device))
    result: dict = {"rows": {}, "computed": {}, "manifest": None}
    for stream in streams:
        store = FeatureStore(out_dir / stream, cfg.num_shards)
        rows = store.update(items, hashes[stream], getattr(encoders, stream), rank, world,
                            progress=f"embed {stream}" + (f" [rank {rank}/{world}]" if world > 1 else ""))
        result["rows"][stream] = rows
        result["computed"][stream] = sorted(r["id"] for r in rows if r["computed"])
    token = stable_hash(json.dumps([list(streams), hashes, [(i.id, i.source_hash) for i in items]]))
    wait_for_ranks(out_dir, rank, world, token, "embed")
    if rank == 0:
        result["manifest"] = write_embed_manifest(upstream, out_dir, cfg, streams)
        if "flow" in streams:
            write_report(result["manifest"], out_dir, cfg, hashes, Path(cfg.report_path))
    return result


def write_embed_manifest(upstream: pd.DataFrame, out_dir: Path, cfg: EmbedConfig,
                         streams: tuple[str, ...] = STREAMS) -> pd.DataFrame:
    """One row per upstream id, from every shard's done file and index (so it covers all ranks' work)."""
    stores = {s: FeatureStore(out_dir / s, cfg.num_shards) for s in streams}
    by_stream = {s: {r["id"]: r for shard in range(cfg.num_shards) for r in (st.done(shard) or {}).get("rows", [])}
                 for s, st in stores.items()}
    meta = {s: st.metadata().set_index("id") for s, st in stores.items()}
    labels = label_columns(upstream, INGEST_COLUMNS)
    rows = []
    for row in upstream.to_dict("records"):
        rec = {"id": row["id"], "split": row["split"], "status": OK, "reason": "", "error": ""}
        if row["status"] != OK:
            rec.update(skipped_upstream(row, "ingest"))
        else:
            rec.update(source_hash=upstream_hash(row, "clip_path"), duration_s=row.get("duration_s"))
            for stream in streams:
                got = by_stream[stream].get(row["id"])
                if got is None or (got["status"] == OK and row["id"] not in meta[stream].index):
                    got = {"status": FAILED, "reason": "missing", "error": "no features after the run", "shard": -1}
                rec["shard"] = got["shard"]
                if got["status"] == OK:
                    m = meta[stream].loc[row["id"]]
                    rec.update({f"{stream}_n_frames": int(m["n_frames"]), f"{stream}_fps": float(m["fps"]),
                                "duration_s": float(m["duration_s"])})
                elif rec["status"] == OK:
                    rec.update(status=FAILED, reason=got["reason"], error=f"{stream}: {got['error']}")
        rows.append({**{c: row.get(c) for c in labels}, **rec})
    return write_manifest(out_dir / "manifest.parquet", rows, columns=columns(streams) + labels)


def write_report(manifest: pd.DataFrame, out_dir: Path, cfg: EmbedConfig, hashes: dict, path: Path) -> None:
    """Flow speed over time for a few clips, true beats marked (SynthV2M); redrawn only when its inputs change."""
    ok = manifest[manifest["status"] == OK]
    if "beat_times" in ok.columns:
        with_beats = ok[ok["beat_times"].astype(str).str.len() > 2]
        ok = with_beats if len(with_beats) else ok
    chosen = ok.head(cfg.report_clips)
    key = stable_hash(json.dumps([hashes["flow"], list(chosen["id"]), list(chosen["source_hash"]), str(path)]))
    stamp = out_dir / "report.json"
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.shards import atomic_path

    features = FeatureStore(out_dir / "flow", cfg.num_shards).load(list(chosen["id"])) if len(chosen) else {}
    fig, axes = plt.subplots(max(1, len(chosen)), 1, figsize=(10, 2.0 * max(1, len(chosen))), squeeze=False)
    for ax, row in zip(axes[:, 0], chosen.to_dict("records"), strict=False):
        speed = flow_enc.mean_speed(features[row["id"]], cfg.flow)
        t = np.arange(len(speed)) / cfg.flow_fps
        ax.step(t, speed, where="pre", color="tab:blue", label=f"mean flow speed ({cfg.flow.method})")
        beats = json.loads(row["beat_times"]) if isinstance(row.get("beat_times"), str) and row["beat_times"] else []
        for i, beat in enumerate(beats):
            ax.axvline(beat, color="tab:red", alpha=0.6, lw=1, label="true beat" if i == 0 else None)
        title = row["id"] + (f"  ({row['tempo_bpm']} BPM)" if "tempo_bpm" in row and row["tempo_bpm"] else "")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("short sides / s", fontsize=8)
        if ax is axes[0, 0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    if not len(chosen):
        axes[0, 0].text(0.5, 0.5, "no ok clips", ha="center", va="center")
    axes[-1, 0].set_xlabel(f"time (s); row k covers motion over ((k-1)/{cfg.flow_fps:g}, k/{cfg.flow_fps:g}] s")
    fig.suptitle(f"Flow speed at {cfg.flow_fps:g} fps vs the true beats", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    atomic_write_json(stamp, {"key": key})


def init_encoders(params: Params) -> Path:
    """Write `embed.encoders_dir`: the seeded CLIP init (pretrained: none) and encoders.json naming the weights.

    The flow methods need no file here: OpenCV has no weights, and a ptlflow checkpoint is hashed where it lies.
    """
    cfg = params.embed
    out = Path(cfg.encoders_dir)
    if cfg.clip.pretrained == "none":
        clip_enc.init_seeded(cfg.clip, params.base.seed, out)
    atomic_write_json(out / "encoders.json", {
        "clip": {**to_dict(cfg.clip), "weights": clip_enc.weights_identity(cfg.clip, params.base.seed, out)},
        "seed": params.base.seed})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m embed", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--ingest", help="ingest manifest (default: {ingest.out_dir}/manifest.parquet)")
    parser.add_argument("--out", help="output folder (default: embed.out_dir)")
    parser.add_argument("--streams", nargs="+", choices=STREAMS + OPTIONAL_STREAMS, default=list(STREAMS),
                        help="streams to compute (default: %(default)s); `--streams patch --out "
                        "data/features_spatial` is the spatial-fusion ablation's (DVC stage `embed_spatial`)")
    parser.add_argument("--init-encoders", action="store_true",
                        help="write the seeded encoder weights to embed.encoders_dir and exit (DVC stage `encoders`)")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    cfg = params.embed
    if args.init_encoders:
        print(f"embed: wrote {init_encoders(params)} (seed {params.base.seed})")
        return 0
    rank, world = local_ranks(cfg.workers, "embed", list(sys.argv[1:] if argv is None else argv))
    out_dir = Path(args.out or cfg.out_dir)
    streams = tuple(dict.fromkeys(args.streams))
    if out_dir.resolve() == Path(cfg.out_dir).resolve() and streams != STREAMS:
        raise SystemExit(f"embed: --streams {' '.join(streams)} writes a manifest of those streams only; give it an "
                         f"--out of its own, not embed.out_dir ({cfg.out_dir})")
    result = run(params, Path(args.ingest or Path(params.ingest.out_dir) / "manifest.parquet"), out_dir, rank, world,
                 streams)
    done = ", ".join(f"{s} {len(result['computed'][s])}" for s in streams)
    print(f"embed: rank {rank}/{world}: computed {done}; the rest unchanged since the last run -> {out_dir}")
    if result["manifest"] is None:
        return 0
    return report_rows("embed", result["manifest"], cfg.max_fail_ratio)


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m pipeline.embed` runs this
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.exit(main())
