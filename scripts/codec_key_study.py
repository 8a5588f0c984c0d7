"""The key through the melvq round trip, per codec setting: the study behind `tokenize.melvq.band_weight`.

    python scripts/codec_key_study.py [--params params.yaml] [SETTINGS_JSON ...]

Each SETTINGS_JSON (e.g. '{"band_weight": 1}' or '{"num_codebooks": 3}') overrides `tokenize.melvq`; the codec is
fitted on the train split's music (data/music, as the tokenize stage fits it), every test and val track goes through
encode -> decode, and the decoded audio is scored against the SynthV2M labels of the ingest manifest: key accuracy
(the evaluate stage's Krumhansl-Schmuckler estimator, `rhythm.estimate_key`) and beat F1. One JSON line per setting.
Needs `make demo` (or `dvc repro separate`) first; about 1 minute per setting on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.codecs.melvq import MelVQ
from pipeline.config import load_params
from pipeline.media import load_audio
from pipeline.metrics import rhythm
from pipeline.shards import OK


def score(codec: MelVQ, tracks: list[dict]) -> dict:
    """Key accuracy and beat F1 of the round trip of each track, per split."""
    out: dict[str, list] = {}
    for t in tracks:
        decoded = codec.decode(codec.encode(t["audio"]))
        key = rhythm.estimate_key(decoded, codec.sample_rate)
        hit = float(key.tonic == t["key"] and key.mode == t["mode"])
        beats = rhythm.beat_f1(rhythm.estimate_beats(decoded, codec.sample_rate)[1], t["beats"])
        out.setdefault(f"key_acc_{t['split']}", []).append(hit)
        out.setdefault(f"beat_f1_{t['split']}", []).append(beats)
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(out.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", default=['{"band_weight": 1}', "{}"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    music = pd.read_parquet(Path(params.separate.out_dir) / "manifest.parquet")
    labels = pd.read_parquet(Path(params.ingest.out_dir) / "manifest.parquet").set_index("id")
    music = music[music["status"] == OK].sort_values("id")
    sr = params.tokenize.melvq.sample_rate
    train = [load_audio(p, sr)[0][0] for p in music.loc[music["split"] == "train", "music_path"]]
    tracks = [{"split": r.split, "audio": load_audio(r.music_path, sr)[0][0], "key": labels.loc[r.id, "key"],
               "mode": labels.loc[r.id, "mode"], "beats": np.asarray(json.loads(labels.loc[r.id, "beat_times"]))}
              for r in music[music["split"].isin(["val", "test"])].itertuples()]
    if not train or not tracks:
        raise SystemExit(f"codec_key_study: no train or held-out music in {params.separate.out_dir}")
    for text in args.settings:
        setting = json.loads(text)
        codec = MelVQ(dataclasses.replace(params.tokenize.melvq, **setting), seed=params.base.seed)
        started = time.perf_counter()
        codec.fit(train)
        fit_s = time.perf_counter() - started
        print(json.dumps({"settings": setting, "fit_s": round(fit_s, 1), **score(codec, tracks)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
