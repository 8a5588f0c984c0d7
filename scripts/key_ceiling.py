"""How often the evaluate stage's key estimator reads the TRUE music's key right: the ceiling of key accuracy.

    python scripts/key_ceiling.py [--params params.yaml] [--clips 0:120] [--clips 320:360] [--out FILE.json]

Each clip index is rendered the way `v2m synth` renders it (`synth.make_spec` + `synth.render_audio` with the params'
seed, clip length and sample rate; no video, nothing written) and its key is estimated by
`metrics.rhythm.estimate_key`, the estimator `evaluate` scores generated music with. Prints the accuracy per range and
per mode and each misread clip; `--out` writes the same as JSON. docs/reproducibility.md has the table it gave: the
estimator reads SynthV2M's minor clips as the parallel major when the mix holds little of the third.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import synth  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.metrics.rhythm import estimate_key  # noqa: E402
from pipeline.shards import atomic_write_json  # noqa: E402


def index_range(text: str) -> range:
    """"A:B" -> range(A, B), the clip indices A .. B-1."""
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clips takes START:STOP (clip indices), got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"--clips {text}: need 0 <= START < STOP")
    return range(lo, hi)


def ceiling(params, clips: range) -> dict:
    """{"clips", "accuracy", "by_mode": {mode: accuracy}, "misread": [{id, label, estimate, instrument}]}."""
    rows = []
    for index in tqdm(clips, desc=f"clips {clips.start}:{clips.stop}", unit="clip"):
        spec = synth.make_spec(params.base.seed, index, params.synth, params.base)
        rate = params.base.sample_rate
        est = estimate_key(synth.render_audio(spec, rate), rate)
        rows.append({"id": spec.id, "label": f"{spec.key} {spec.mode}", "estimate": f"{est.tonic} {est.mode}",
                     "mode": spec.mode, "instrument": spec.instrument,
                     "right": est.tonic == spec.key and est.mode == spec.mode})
    by_mode = {}
    for mode in ("major", "minor"):
        of_mode = [r["right"] for r in rows if r["mode"] == mode]
        if of_mode:
            by_mode[mode] = round(sum(of_mode) / len(of_mode), 4)
    return {"clips": f"{clips.start}:{clips.stop}", "n": len(rows),
            "accuracy": round(sum(r["right"] for r in rows) / len(rows), 4), "by_mode": by_mode,
            "misread": [{k: r[k] for k in ("id", "label", "estimate", "instrument")} for r in rows if not r["right"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clips", type=index_range, action="append",
                        help="clip indices START:STOP, repeatable (default: 0:120, the first train clips)")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    results = [ceiling(params, clips) for clips in (args.clips or [range(0, 120)])]
    for r in results:
        modes = ", ".join(f"{mode} {acc:.3f}" for mode, acc in r["by_mode"].items())
        print(f"clips {r['clips']}: key accuracy of the true music {r['accuracy']:.3f} over {r['n']} ({modes})")
        for m in r["misread"]:
            print(f"  {m['id']} {m['label']} read as {m['estimate']} ({m['instrument']})")
    if args.out:
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
