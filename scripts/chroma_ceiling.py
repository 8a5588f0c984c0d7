"""How much chroma cosine can a system reach on SynthV2M without knowing each clip's chord progression?

    python scripts/chroma_ceiling.py [--params params.yaml] [--split test] [--out reports/chroma_ceiling.json]

The chroma metric (pipeline/metrics/chroma.py, audiocraft's) compares the *argmax* pitch class of the reference and
the generated music frame by frame (128 ms frames). In SynthV2M music that argmax is mostly the root of the chord of
the bar (bass, chords and the tonic-tuned drums), and the chord progression is drawn at random from three per mode
(pipeline/synth.py, PROGRESSIONS). Until render version 2 it was nowhere in the picture; now the objects' hue shows
it, and these figures bound a system that does not read that cue. This script reads the demo's music
(`separate.out_dir`, the reference the evaluate stage scores against), recomputes each clip's score from
`make_spec(seed, index)`, and reports, over the split's frames:

- `reference_on_chord_root`: how often the reference's argmax is the root of the bar's actual chord;
- `most_likely_progression`: how often it is the root of the most likely chord for that bar given the key alone
  (I IV I V, the per-bar mode of the three progressions): what a system that knows the key, the tempo and where
  bars start, but not the progression, would score at best if its own argmax were always that root;
- `tonic_throughout`: the same for the tonic on every frame.

Compare with the evaluate target (chroma within 0.15 of the reference, metrics/eval.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.media import load_audio  # noqa: E402
from pipeline.metrics import chroma  # noqa: E402
from pipeline.shards import atomic_write_json  # noqa: E402
from pipeline.synth import beat_at, chord_roots, make_spec  # noqa: E402

MOST_LIKELY = (0, 3, 0, 4)  # per bar, the commonest scale degree of the three progressions (bar 4: a three-way tie)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="reports/chroma_ceiling.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    manifest = Path(params.separate.out_dir) / "manifest.parquet"
    if not manifest.exists():
        raise SystemExit(f"chroma_ceiling: {manifest} is missing: run the pipeline (`make demo`) first")
    rows = pd.read_parquet(manifest)
    rows = rows[(rows["split"] == args.split) & (rows["status"] == "ok")]
    counts = {"reference_on_chord_root": 0, "most_likely_progression": 0, "tonic_throughout": 0}
    frames = 0
    for clip_id, path in zip(rows["id"], rows["music_path"], strict=True):
        spec = make_spec(params.base.seed, int(clip_id.rsplit("_", 1)[1]), params.synth, params.base)
        audio, _ = load_audio(path, chroma.SAMPLE_RATE)
        audio = audio.reshape(-1)
        argmax = chroma.chroma_onehot(audio)[: int(np.ceil(len(audio) / chroma.HOP))].argmax(1)
        times = np.arange(len(argmax)) * chroma.HOP / chroma.SAMPLE_RATE
        beat = beat_at(spec, times)
        counts["reference_on_chord_root"] += int((argmax == np.asarray(chord_roots(spec))[beat]).sum())
        counts["most_likely_progression"] += int((argmax == np.asarray(chord_roots(spec, MOST_LIKELY))[beat]).sum())
        counts["tonic_throughout"] += int((argmax == spec.key_pc).sum())
        frames += len(argmax)
    if not frames:
        raise SystemExit(f"chroma_ceiling: no ok {args.split} clips in {manifest}")
    result = {"split": args.split, "n_clips": len(rows), "frames": frames,
              **{k: round(v / frames, 4) for k, v in counts.items()}}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
