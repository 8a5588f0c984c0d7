"""Alignment study: does motion reach the beats? full vs no_motion, cross-attention only vs + interpolated context.

    # a scratch pipeline run (never the repo's data/): synth, ingest, separate, embed [, tokenize] with a small params
    python benchmarks/train_alignment.py --root /tmp/m6 [--tokens /tmp/m6/data/tokens/melvq] --steps 300

Without `--tokens` (before the tokenize stage existed) the clips' music is tokenized by a stand-in codec made here: a
log-mel spectrogram at 25 Hz quantised by residual k-means (2 codebooks of 256, fitted on the train split) and
decoded by Griffin-Lim. Reported per configuration: val_loss, onset_val_loss (frames within 40 ms of a beat),
val_beat_f1 (generated, decoded, beat-tracked), steps, seconds; and two references for val_beat_f1: the codec round
trip of the true tokens (the ceiling) and the tokens of a random training clip (chance).
Results: benchmarks/results/train_alignment.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "train_alignment.json"
SR, HOP, N_MELS, CARD = 32000, 1280, 64, 256  # 25 token frames per second


class StandInCodec:
    """Residual k-means over log-mel frames: encode(wav) -> codes (K, T); decode(codes) -> wav (Griffin-Lim)."""

    def __init__(self, centroids: list[np.ndarray]):
        self.centroids = centroids
        self.sample_rate, self.frame_rate, self.num_codebooks, self.codebook_size = SR, SR / HOP, len(centroids), CARD

    @staticmethod
    def logmel(wav: np.ndarray) -> np.ndarray:
        import librosa

        mel = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=2048, hop_length=HOP, n_mels=N_MELS)
        return librosa.power_to_db(mel, top_db=80).T[: len(wav) // HOP].astype(np.float32)  # (T, M)

    @classmethod
    def fit(cls, wavs: list[np.ndarray], k: int = 2, seed: int = 0) -> StandInCodec:
        from sklearn.cluster import MiniBatchKMeans

        x = np.concatenate([cls.logmel(w) for w in wavs])
        centroids = []
        for _ in range(k):
            km = MiniBatchKMeans(CARD, random_state=seed, n_init=1, batch_size=2048).fit(x)
            centroids.append(km.cluster_centers_.astype(np.float32))
            x = x - km.cluster_centers_[km.labels_]
        return cls(centroids)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        x, codes = self.logmel(wav), []
        for c in self.centroids:
            idx = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            codes.append(idx)
            x = x - c[idx]
        return np.stack(codes)  # (K, T)

    def decode(self, codes) -> np.ndarray:
        import librosa

        codes = np.asarray(codes)
        mel_db = sum(c[codes[k]] for k, c in enumerate(self.centroids))  # (T, M)
        power = librosa.db_to_power(mel_db.T)
        return librosa.feature.inverse.mel_to_audio(power, sr=SR, n_fft=2048, hop_length=HOP, n_iter=16)


def standin_tokens(root: Path, out: Path) -> StandInCodec:
    import pandas as pd

    from pipeline.media import load_audio
    from pipeline.shards import FeatureStore, Item

    manifest = pd.read_parquet(root / "data/ingest/manifest.parquet")
    manifest = manifest[manifest["status"] == "ok"]
    wavs = {r.id: load_audio(root / "data/music" / f"{r.id}.wav", mono=True)[0].reshape(-1)
            for r in manifest.itertuples()}
    codec = StandInCodec.fit([wavs[i] for i in manifest[manifest["split"] == "train"]["id"]])
    FeatureStore(out, 4).update([Item(i, "standin") for i in wavs], "standin",
                                lambda it: (codec.encode(wavs[it.id]).T.astype(np.int16), {"frame_rate": 25.0}))
    (out / "codec.json").write_text(json.dumps({"codec": "standin-melkmeans", "codebook_size": CARD}))
    return codec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="scratch pipeline folder with data/ and params.yaml")
    parser.add_argument("--tokens", type=Path, help="a tokenize-stage store; default: the stand-in codec")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--configs", nargs="+", default=["full:on", "no_motion:on", "full:off", "no_motion:off"],
                        help="SYSTEM:INTERPOLATE(on|off)[:DIRECTION][:pool]")
    parser.add_argument("--beat-clips", type=int, default=4, help="validation clips generated for val_beat_f1")
    parser.add_argument("--tag", default="")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from pipeline import train
    from pipeline.config import load_params
    from pipeline.dataset import load_dataset
    from pipeline.metrics.rhythm import beat_f1, estimate_beats

    torch.set_num_threads(1)
    root = args.root
    tokens = args.tokens or root / "data/tokens/standin"
    if args.tokens is None:
        cache = tokens / "codec.pkl"
        if not cache.exists():
            t0 = time.time()
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache_bytes = pickle.dumps(standin_tokens(root, tokens))
            cache.write_bytes(cache_bytes)
            print(f"stand-in codec fitted and applied in {time.time() - t0:.0f} s")
        codec_obj = pickle.loads(cache.read_bytes())
        decode = lambda c: (codec_obj.decode(c), SR)  # noqa: E731
    real = None if args.tokens is None else train.load_codec(load_params(root / "params.yaml"), tokens.name)
    items, codec = load_dataset(root / "data/features", tokens, root / "data/ingest/manifest.parquet",
                                None if real is None else real.describe())
    if args.tokens is not None:
        decode = None if real is None else (lambda c: (real.decode(c.numpy()), real.sample_rate))
    params = load_params(root / "params.yaml")
    val = [it for it in items if it["split"] == "val"][: args.beat_clips]
    train_items = [it for it in items if it["split"] == "train"]
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    ref_key = f"reference@{len(val)}clips"
    if decode is not None and ref_key not in results:
        rng = np.random.default_rng(0)
        truth = [beat_f1(estimate_beats(*decode(torch.from_numpy(it["codes"])))[1], it["beats"]) for it in val]
        rand = [beat_f1(estimate_beats(*decode(torch.from_numpy(train_items[rng.integers(len(train_items))]["codes"])))
                        [1], it["beats"]) for it in val]
        results[ref_key] = {"codec_round_trip_beat_f1": float(np.mean(truth)),
                                "random_train_clip_beat_f1": float(np.mean(rand)), "clips": len(val)}
        print(results[ref_key])
    for spec in args.configs:
        system, interp, *rest = spec.split(":")
        direction = [r for r in rest if r != "pool"]
        cfg = dataclasses.replace(params.train, preset=args.preset, max_steps=args.steps, batch_size=args.batch,
                                  lr=args.lr, interpolate=interp == "on", direction=direction[0] if direction else None,
                                  flow_pool="pool" in rest,
                                  ckpt_every=max(1, args.steps // 2), log_every=10, beat_clips=args.beat_clips,
                                  sampling=dataclasses.replace(params.train.sampling, guidance=3.0),
                                  warmup_steps=min(50, args.steps // 10))
        p = dataclasses.replace(params, train=cfg)
        name = f"{args.preset}/{spec}{args.tag}"
        out = root / "study" / name.replace("/", "_").replace(":", "_")
        t0 = time.time()
        res = train.train(p, system, items, codec, out / "model", out / "metrics", decode)
        res["wall_seconds"] = round(time.time() - t0, 1)
        res["curve"] = json.loads(json.dumps(
            [{k: v for k, v in e.items()} for e in torch.load(out / "model" / "last.pt", weights_only=True)["evals"]]))
        results[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "curve"}))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
