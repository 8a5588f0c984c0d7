"""Benchmark the embed stage: throughput of each encoder and the cost of an incremental rerun.

    python benchmarks/embed.py [--out benchmarks/results/embed.json] [--videos 200] [--skip-production]

Inputs are real SynthV2M clips made with the embedded profile (256x256 rendered, ingested to 224x224, 24 fps, 8 s).
For each encoder, "video_s_per_wall_s" is seconds of video through the stage's whole per-clip path (decode, sample at
the default fps, encode, reduce) per wall-clock second, in one process with `embed.threads` threads (1: the
stage scales out with processes: docs/timings.md). "incremental_ratio" is the wall time of `embed.run` after
adding 1 video to `--videos` already embedded, divided by the wall time of the full run over those videos (both
streams, encoder loading and the manifest included; the full run starts from an empty feature folder). The
production encoders (ViT-B-32, ptlflow) run with random weights: same compute as the pretrained ones, timings only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline import embed, ingest, synth
from pipeline.config import deep_merge, params_from_dict, to_dict
from pipeline.encoders.clip import ClipEncoder
from pipeline.encoders.streams import Encoders
from pipeline.runtime import set_threads
from pipeline.shards import Item, write_manifest

EMBEDDED = {"clip:v2m-tiny-vit": {}, "flow:opencv_dis": {}}
PRODUCTION = {  # timings only: random weights, the same compute as the pretrained models
    "flow:opencv_farneback": {"flow": {"method": "opencv_farneback"}},
    "clip:ViT-B-32": {"clip": {"model": "ViT-B-32"}},
    "flow:ptlflow:rapidflow": {"flow": {"method": "ptlflow:rapidflow"}},
}


def make_clips(work: Path, n: int) -> pd.DataFrame:
    params = work / "params.yaml"
    params.write_text("synth: {workers: 2}\n")
    assert synth.main(["--params", str(params), "--out", str(work / "raw"), "--n", str(n),
                       "--manifest", str(work / "synth.csv"), "--no-preview"]) == 0
    assert ingest.main(["--params", str(params), "--manifest", str(work / "synth.csv"),
                        "--out", str(work / "ingest")]) == 0
    return pd.read_parquet(work / "ingest" / "manifest.parquet")


def random_clip_encoder(cfg) -> ClipEncoder:
    """A ClipEncoder around a randomly initialised open_clip model (no weights file): timings only."""
    import open_clip
    import torch

    encoder = object.__new__(ClipEncoder)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    encoder.cfg, encoder.device, encoder.torch, encoder.preprocess = cfg, "cpu", torch, preprocess
    encoder.model, encoder.dim = model.eval(), int(model.visual.output_dim)
    return encoder


def throughput(params, clips: pd.DataFrame, stream: str, min_wall_s: float) -> float:
    """Video seconds per wall second of one stream's compute function over the clips (cycled, after a warm-up)."""
    encoders = Encoders(params.embed, "cpu")
    if stream == "clip" and params.embed.clip.model != "v2m-tiny-vit":
        encoders._clip = random_clip_encoder(params.embed.clip)
    compute = getattr(encoders, stream)
    items = [Item(r["id"], "h", r["clip_path"]) for r in clips.to_dict("records")]
    compute(items[0])  # loads the model
    video_s, start, i = 0.0, time.perf_counter(), 0
    while time.perf_counter() - start < min_wall_s or i < len(items):
        _, meta = compute(items[i % len(items)])
        video_s += meta["duration_s"]
        i += 1
    return video_s / (time.perf_counter() - start)


def incremental(params, clips: pd.DataFrame, work: Path, n: int) -> dict:
    """Wall time of a full run over n videos, then of adding one more."""
    rows = clips.to_dict("records")

    def manifest(count: int) -> Path:
        out = [{**rows[i % len(rows)], "id": f"bench_{i:05d}", "source_sha256": f"copy{i}"} for i in range(count)]
        write_manifest(work / "bench.parquet", out)
        return work / "bench.parquet"

    features = work / "features"
    shutil.rmtree(features, ignore_errors=True)
    start = time.perf_counter()
    embed.run(params, manifest(n), features)
    full = time.perf_counter() - start
    start = time.perf_counter()
    result = embed.run(params, manifest(n + 1), features)
    added = time.perf_counter() - start
    assert result["computed"] == {"clip": [f"bench_{n:05d}"], "flow": [f"bench_{n:05d}"]}, result["computed"]
    return {"full_s": round(full, 2), "add_one_s": round(added, 3), "ratio": round(added / full, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/embed.json")
    parser.add_argument("--videos", type=int, default=200, help="videos already embedded before adding one")
    parser.add_argument("--clips", type=int, default=4, help="distinct SynthV2M clips to cycle through")
    parser.add_argument("--min-wall-s", type=float, default=10.0, help="time each encoder at least this long")
    parser.add_argument("--skip-production", action="store_true", help="time the embedded encoders only")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="v2m-bench-embed-"))
    try:
        clips = make_clips(work, args.clips)
        base = to_dict(params_from_dict({}))
        base["embed"].update(encoders_dir=str(work / "encoders"), report_path=str(work / "flow_beats.png"))
        params = params_from_dict(base)
        embed.init_encoders(params)
        threads = set_threads(params.embed.threads)
        results = {}
        encoders = {**EMBEDDED, **({} if args.skip_production else PRODUCTION)}
        for name, overlay in encoders.items():
            cfg = params_from_dict(deep_merge(base, {"embed": overlay}))
            speed = throughput(cfg, clips, name.split(":")[0], args.min_wall_s if name in EMBEDDED else 3.0)
            results[name] = {"video_s_per_wall_s": round(speed, 2), "embedded": name in EMBEDDED}
            print(f"{name:<24} {speed:8.2f} video-s per wall-s")
        inc = incremental(params, clips, work, args.videos)
        print(f"incremental: full run over {args.videos} videos {inc['full_s']} s, adding 1: {inc['add_one_s']} s "
              f"-> ratio {inc['ratio']}")
        report = {"encoders": results, "incremental_ratio": inc["ratio"],
                  "details": {"incremental": {"videos": args.videos, **inc},
                              "clip_fps": params.embed.clip_fps, "flow_fps": params.embed.flow_fps,
                              "clip_seconds": params.base.clip_seconds, "frame": "224x224 at 24 fps",
                              "threads": threads, "cpu_count": os.cpu_count(), "processes": 1,
                              "machine": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
