"""Peak memory of `v2m generate`'s video path against the video's duration (issue 18, item 9).

    python benchmarks/generate_memory.py [--minutes 1 10 60] [--whole-max 10] [--size 64x64] [--rate 24]

For each duration, a testsrc video (`--size`, `--rate`, no audio) is normalised as generate normalises any input
(`pipeline.media.normalise_video` with the embedded profile: base.fps, ingest.short_side, ingest.video_preset), then its
CLIP and flow streams are computed in a fresh child process, twice:

- `streamed`: what generate does now (`Encoders.clip_streamed` / `flow_streamed`: a chunk of frames at a time);
- `whole`: what it did before (`Encoders.clip` / `flow` on the whole clip: every sampled frame, and every flow field,
  in memory at once), up to `--whole-max` minutes (past that it needs more memory than a 2-core VM has).

Peak RSS is the child's high-water mark (VmHWM); the child imports torch and builds the seeded encoders either way.
The music itself is not part of this path: generate holds it whole (float32 at the codec's rate, 7.7 MB per minute at
32 kHz), which `generate.max_duration_s` bounds. Results go to benchmarks/results/generate_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "generate_memory.json"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, clip: str, encoders_dir: str) -> None:
    """Compute both streams of `clip` the `mode` way and print {"peak_rss_mb", "rows", "seconds"} as JSON."""
    import dataclasses

    from pipeline.config import Params
    from pipeline.encoders.streams import Encoders
    from pipeline.runtime import set_threads
    from pipeline.shards import Item

    params = Params()
    set_threads(1)
    encoders = Encoders(dataclasses.replace(params.embed, encoders_dir=encoders_dir), "cpu")
    t0 = time.perf_counter()
    if mode == "streamed":
        clip_rows, _ = encoders.clip_streamed(clip)
        flow_rows, _ = encoders.flow_streamed(clip)
    else:
        clip_rows, _ = encoders.clip(Item("v", "", clip))
        flow_rows, _ = encoders.flow(Item("v", "", clip))
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "rows": [len(clip_rows), len(flow_rows)],
                      "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--whole-max", type=float, default=10, help="longest video (min) measured the old way too")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--rate", default="24")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CLIP", "ENCODERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    from pipeline.config import Params
    from pipeline.encoders import clip as clip_enc
    from pipeline.media import ffmpeg_exe, normalise_video

    params = Params()
    results = []
    with tempfile.TemporaryDirectory(prefix="v2m-bench-mem-") as tmp:
        tmp = Path(tmp)
        clip_enc.init_seeded(params.embed.clip, params.base.seed, tmp / "encoders")
        for minutes in args.minutes:
            seconds = minutes * 60
            src, clip = tmp / f"src_{minutes:g}.mp4", tmp / f"clip_{minutes:g}.mp4"
            t0 = time.perf_counter()
            subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc=size={args.size}:rate={args.rate}:duration={seconds}", "-c:v", "libx264",
                            "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(src)], check=True)
            n_frames = int(round(seconds * params.base.fps))
            normalise_video(src, clip, n_frames, params.base.fps, params.ingest.short_side, params.ingest.video_crf,
                            params.ingest.video_preset)
            row = {"minutes": minutes, "normalise_s": round(time.perf_counter() - t0, 1)}
            for mode in ("streamed", "whole"):
                if mode == "whole" and minutes > args.whole_max:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(clip), str(tmp / "encoders")],
                                     check=True, capture_output=True, text=True).stdout
                row[mode] = json.loads(out.strip().splitlines()[-1])
                print(f"{minutes:g} min {mode}: {row[mode]}", flush=True)
            results.append(row)
            src.unlink()
            clip.unlink()
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "video": f"testsrc {args.size} "
           f"@ {args.rate} fps -> base.fps {params.base.fps}, short side {params.ingest.short_side}",
           "clip_fps": params.embed.clip_fps, "flow_fps": params.embed.flow_fps, "flow": params.embed.flow.method,
           "results": results}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
