"""summary: what the pipeline has produced so far, and where (the last thing `make demo` prints)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline.config import load_params
from pipeline.shards import summarize


def _size(path: Path) -> str:
    if not path.exists():
        return "missing"
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 2**20:.1f} MiB"


def lines(params_path: str = "params.yaml") -> list[str]:
    params = load_params(params_path, missing_ok=True)
    out = []
    synth_manifest = Path(params.synth.manifest)
    if synth_manifest.exists():
        frame = pd.read_csv(synth_manifest)
        splits = ", ".join(f"{k} {v}" for k, v in frame["split"].value_counts().sort_index().items())
        out.append(f"synth    {len(frame)} SynthV2M clips ({splits}) in {params.synth.out_dir} "
                   f"[{_size(Path(params.synth.out_dir))}]; labels in {synth_manifest}")
        if Path(params.synth.preview_path).exists():
            out.append(f"         preview: {params.synth.preview_path}")
    ingest_manifest = Path(params.ingest.out_dir) / "manifest.parquet"
    if ingest_manifest.exists():
        frame = pd.read_parquet(ingest_manifest)
        out.append(f"ingest   {summarize(frame.to_dict('records'))}: clips/ and audio/ in {params.ingest.out_dir} "
                   f"[{_size(Path(params.ingest.out_dir))}]; manifest {ingest_manifest}")
    stages = [("separate", Path(params.separate.out_dir)), ("embed", Path(params.embed.out_dir))]
    tokenize = getattr(params, "tokenize", None)
    if tokenize is not None:
        stages.append(("tokenize", Path(tokenize.out_dir) / tokenize.codec))
    for name, folder in stages:
        manifest = folder / "manifest.parquet"
        if manifest.exists():
            frame = pd.read_parquet(manifest)
            out.append(f"{name:<8} {summarize(frame.to_dict('records'))}: {folder} [{_size(folder)}]")
    for path, what in (("metrics/codec.json", "codec round trip"), ("metrics/train.json", "training")):
        if Path(path).exists():
            out.append(f"metrics  {what}: {path}")
    return out or ["nothing produced yet: run `make demo` (or `dvc repro`)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m summary", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    print("\n".join(lines(args.params)))
    return 0
