"""Score a trained checkpoint on one split under several sampling settings: the studies' tool (README, "Harmony:
from the scene to the key").

    python scripts/score_checkpoint.py MODEL [--params params.yaml] [--split val] [SETTINGS_JSON ...]

SETTINGS_JSON is e.g. '{}' (the defaults: CFG 3, temperature 0.8, top-k 0, seed 0) or '{"temperature": 0.4,
"seed": 1}'. Each setting generates every clip of the split in one batch (cached features, no video decoding),
decodes with the tokenize stage's codec and prints one JSON line: beat F1, tempo accuracy, key accuracy (tonic and
mode, Krumhansl-Schmuckler) against the SynthV2M labels of the ingest manifest, and chroma cosine and AV-Align
against the clip's music and video. It is quicker than `v2m generate --stage` + `v2m evaluate`, which score the
stage's own generations (another draw) with the baselines and confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import train  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.media import load_audio  # noqa: E402
from pipeline.metrics import av_align, chroma, rhythm  # noqa: E402
from pipeline.model import V2M, ModelConfig  # noqa: E402


def score(model: V2M, items: list[dict], labels: pd.DataFrame, codec, setting: dict) -> dict:
    batch = {k: v for k, v in train.collate(items).items() if k not in ("codes", "code_mask")}
    generator = torch.Generator().manual_seed(int(setting.get("seed", 0)))
    codes = model.generate(batch, items[0]["codes"].shape[1], setting.get("guidance", 3.0),
                           setting.get("temperature", 0.8), setting.get("top_k", 0), generator)
    out = {k: [] for k in ("beat_f1", "tempo_acc", "key_acc", "chroma", "av_align")}
    for it, c in zip(items, codes, strict=True):
        wav, sr = codec.decode(c[:, : it["codes"].shape[1]].numpy()), codec.sample_rate
        row = labels.loc[it["id"]]
        bpm, beats = rhythm.estimate_beats(wav, sr)
        out["beat_f1"].append(rhythm.beat_f1(beats, it["beats"]))
        out["tempo_acc"].append(float(rhythm.tempo_accuracy(bpm, float(row["tempo_bpm"])).correct))
        key = rhythm.estimate_key(wav, sr)
        out["key_acc"].append(float(key.tonic == row["key"] and key.mode == row["mode"]))
        ref, _ = load_audio(row["music_path"], chroma.SAMPLE_RATE)
        gen, _ = load_audio_array(wav, sr)
        out["chroma"].append(chroma.chroma_cosine_clip(gen, ref.reshape(-1)).value)
        out["av_align"].append(av_align.av_align(row["clip_path"], wav, sr))
    return {k: round(float(np.nanmean(v)), 4) for k, v in out.items()}


def load_audio_array(wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """The decoded audio at the chroma metric's rate."""
    import librosa

    return librosa.resample(wav, orig_sr=sample_rate, target_sr=chroma.SAMPLE_RATE), chroma.SAMPLE_RATE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a v2m.pt (models/full/v2m.pt)")
    parser.add_argument("settings", nargs="*", default=["{}"], help="sampling settings as JSON objects")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = load_params(args.params)
    ckpt = torch.load(args.model, map_location="cpu", weights_only=False)
    model = V2M(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    codec = train.load_codec(params, Path(params.train.tokens_dir).name)
    if codec is None:
        raise SystemExit("score_checkpoint: the tokenize stage's codec is not available (run `v2m tokenize`)")
    manifest = Path(params.ingest.out_dir) / "manifest.parquet"
    items, _ = train.load_dataset(Path(params.embed.out_dir), Path(params.train.tokens_dir), manifest,
                                  codec.describe())
    items = [it for it in items if it["split"] == args.split]
    if not items:
        raise SystemExit(f"score_checkpoint: no {args.split} clips in {manifest}")
    music = pd.read_parquet(Path(params.separate.out_dir) / "manifest.parquet", columns=["id", "music_path"])
    labels = pd.read_parquet(manifest).merge(music, on="id").set_index("id")
    for text in args.settings:
        setting = json.loads(text)
        print(json.dumps({"model": args.model, "split": args.split, "clips": len(items), "settings": setting,
                          **score(model, items, labels, codec, setting)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
