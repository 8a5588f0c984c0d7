"""What pitch class is on top, frame by frame, in generated SynthV2M music: the chord root, another chord tone, another
note of the key, or a note outside the key?

    python scripts/frame_harmony.py DIR [DIR ...] [--params params.yaml]

DIR holds `{id}.wav` files for SynthV2M clips (the generate stage's `data/generated/full/`, or the folders that
`scripts/score_checkpoint.py --keep` writes). For every wav, the argmax pitch class of each 128 ms frame (the chroma
metric's own front end, `metrics.chroma.chroma_onehot`, over the length of the clip's ground-truth music) is
compared with the clip's score, recomputed from `make_spec(seed, index)`: the root of the chord of the bar sounding
then, the chord's other two tones, the rest of the key's scale, or none of these. The ground-truth music
(`separate.out_dir`) is classified the same way. One JSON line per folder, fractions of all frames:

    {"dir": ..., "clips": 20, "frames": 1260, "root": 0.742, "chord_tone": 0.159, "scale": 0.066,
     "outside_key": 0.033, "ground_truth": {"root": 0.772, ...}}

This is how the harmony bias study (docs/studies/harmony-bias.md) found that the decoder, not the retrieved
harmony, was what kept chroma low: with the previous default the root was on top on 0.62 of the test frames and a
note outside the key on 0.11, where the ground truth has 0.77 and 0.005.
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
from pipeline.synth import SCALES, beat_at, beat_chords, make_spec  # noqa: E402

CLASSES = ("root", "chord_tone", "scale", "outside_key")


def classify(top: np.ndarray, root: np.ndarray, chord: list[set[int]], scale: set[int]) -> np.ndarray:
    """Frame classes (index into CLASSES) of argmax pitch classes `top` [F], given each frame's chord root [F] and
    chord pitch classes, and the key's scale."""
    out = np.full(len(top), 3)
    out[np.isin(top, sorted(scale))] = 2
    out[np.array([p in c for p, c in zip(top, chord, strict=True)], bool)] = 1
    out[top == root] = 0
    return out


def frame_classes(wav: Path, music: Path, spec) -> tuple[np.ndarray, np.ndarray]:
    """(classes of the generated frames, classes of the ground-truth frames), over the ground truth's frames."""
    ref = load_audio(music, chroma.SAMPLE_RATE)[0].reshape(-1)
    gen = chroma.fit_to_reference(load_audio(wav, chroma.SAMPLE_RATE)[0].reshape(-1), len(ref))
    n = int(np.ceil(len(ref) / chroma.HOP))
    t = np.arange(n) * chroma.HOP / chroma.SAMPLE_RATE
    per_beat = beat_chords(spec)
    chords = [per_beat[b] for b in beat_at(spec, t)]  # the chord sounding in each frame
    root = np.array([c[0] for c in chords])
    chord = [set(c) for c in chords]
    scale = {(spec.key_pc + s) % 12 for s in SCALES[spec.mode]}
    return tuple(classify(chroma.chroma_onehot(x)[:n].argmax(1), root, chord, scale) for x in (gen, ref))


def summarise(folder: Path, params, music_paths: dict[str, str]) -> dict:
    gen_counts, ref_counts, clips = np.zeros(4), np.zeros(4), 0
    for wav in sorted(folder.glob("*.wav")):
        if wav.stem not in music_paths:
            print(f"{wav}: no ground-truth music for {wav.stem} in {params.separate.out_dir}; skipped", file=sys.stderr)
            continue
        spec = make_spec(params.base.seed, int(wav.stem.rsplit("_", 1)[1]), params.synth, params.base)
        gen, ref = frame_classes(wav, Path(music_paths[wav.stem]), spec)
        gen_counts += np.bincount(gen, minlength=4)
        ref_counts += np.bincount(ref, minlength=4)
        clips += 1
    if not clips:
        raise SystemExit(f"frame_harmony: no SynthV2M wavs with ground truth in {folder}")
    frames = int(gen_counts.sum())
    return {"dir": str(folder), "clips": clips, "frames": frames,
            **{c: round(float(v / frames), 3) for c, v in zip(CLASSES, gen_counts, strict=True)},
            "ground_truth": {c: round(float(v / frames), 3) for c, v in zip(CLASSES, ref_counts, strict=True)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders of {id}.wav generated for SynthV2M clips")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    manifest = Path(params.separate.out_dir) / "manifest.parquet"
    if not manifest.exists():
        raise SystemExit(f"frame_harmony: {manifest} is missing (run `v2m separate`)")
    music = dict(pd.read_parquet(manifest, columns=["id", "music_path"]).itertuples(index=False))
    for folder in args.dirs:
        print(json.dumps(summarise(folder, params, music)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
