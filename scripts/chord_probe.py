"""Can the chord be read from our CLIP features? The check behind `harmony_track`
(docs/studies/harmony.md, "Harmony over time").

    python scripts/chord_probe.py [--params params.yaml] [--clips 150] [--out reports/chord_probe.json]

Renders the frames of SynthV2M clips 0 .. N-1 at `embed.clip_fps` and the ingest stage's short side (no audio, no
files), embeds them with the embed stage's CLIP encoder (`embed.clip`; the seeded tiny ViT of the embedded profile,
initialised in a scratch folder if `embed.encoders_dir` has none: the same bytes) and reports, over all rows:

- `knn1_root` / `knn3_root`: how often the nearest row (the 3 nearest, by vote) of *another* clip has the same chord
  root sounding at its time (synth.chord_roots): what the harmony track's retrieval relies on;
- `knn1_key` / `knn3_key`: the same for the key's tonic;
- `linear_root`: a ridge regression from the row to the one-hot chord root (argmax), fitted on the first 80 % of the
  clips and scored on the rest: a linear read-out of the same features, for contrast.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import synth  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.encoders.clip import CONFIG_FILE, ClipEncoder, init_seeded, seeded_dir  # noqa: E402
from pipeline.shards import atomic_write_json  # noqa: E402


def rows(params, n_clips: int, encoder: ClipEncoder) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [R, D], chord root [R], tonic [R], clip index [R]) of every CLIP row of clips 0 .. n-1."""
    side, fps = params.ingest.short_side, params.embed.clip_fps
    out = ([], [], [], [])
    for i in range(n_clips):
        spec = synth.make_spec(params.base.seed, i, params.synth, params.base)
        frames = np.stack(list(synth.render_frames(spec, fps, side, side)))
        roots = np.asarray(synth.chord_roots(spec))[synth.beat_at(spec, np.arange(len(frames)) / fps)]
        for part, values in zip(out, (encoder(frames), roots, np.full(len(frames), spec.key_pc),
                                      np.full(len(frames), i)), strict=True):
            part.append(values)
    return tuple(np.concatenate(part) for part in out)


def knn_accuracy(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Leave-one-clip-out: the majority label of each row's k nearest rows (cosine) of other clips."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    sims[groups[:, None] == groups[None]] = -np.inf
    nearest = np.argsort(-sims, axis=1)[:, :k]
    votes = np.array([np.bincount(labels[r], minlength=12).argmax() for r in nearest])
    return float(np.mean(votes == labels))


def linear_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, ridge: float = 1e-2
                    ) -> float:
    """Ridge regression onto one-hot labels (with a bias), argmax on the test rows."""
    design = np.hstack([x, np.ones((len(x), 1))])
    weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ np.eye(12)[y])
    return float(np.mean((np.hstack([x_test, np.ones((len(x_test), 1))]) @ weights).argmax(1) == y_test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clips", type=int, default=150)
    parser.add_argument("--out", help="also write the JSON here (e.g. reports/chord_probe.json)")
    args = parser.parse_args(argv)
    if args.clips < 5:
        raise SystemExit("chord_probe: --clips must be at least 5 (a 80/20 split of clips)")
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="chord_probe_") as scratch:
        encoders_dir = params.embed.encoders_dir
        if params.embed.clip.pretrained == "none" and not (seeded_dir(encoders_dir) / CONFIG_FILE).exists():
            encoders_dir = scratch
            init_seeded(params.embed.clip, params.base.seed, encoders_dir)
        x, roots, tonics, groups = rows(params, args.clips, ClipEncoder(params.embed.clip, encoders_dir))
    train = groups < int(0.8 * args.clips)
    result = {"clips": args.clips, "rows": len(x), "clip_fps": params.embed.clip_fps,
              **{f"knn{k}_root": round(knn_accuracy(x, roots, groups, k), 4) for k in (1, 3)},
              **{f"knn{k}_key": round(knn_accuracy(x, tonics, groups, k), 4) for k in (1, 3)},
              "linear_root": round(linear_accuracy(x[train], roots[train], x[~train], roots[~train]), 4)}
    print(json.dumps(result))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
