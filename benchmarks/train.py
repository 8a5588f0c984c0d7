"""Training throughput: tokens/s and peak memory of one optimizer step per model preset, on random data shaped like
the embedded profile (8 s clips, CLIP and flow at the embed defaults' rates, the codec's K codebooks at its frame
rate).

    python benchmarks/train.py [--presets debug embedded] [--steps 10] [--batch 16] [--threads 1]
    python benchmarks/train.py --presets musicgen-small --device cuda --batch 8   # on a GPU

Each preset runs in its own process so that peak RSS (CPU) is its own; on CUDA the peak is torch's allocator peak.
Results go to benchmarks/results/train.json (merged by preset and device).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train.json"
SHAPES = {  # preset -> (K, card, frame_rate, clip_dim, flow_dim)
    "debug": (2, 256, 25.0, 256, 160),
    "embedded": (2, 256, 25.0, 256, 160),
    "musicgen-small": (4, 2048, 50.0, 512, 160),
}


def one(preset: str, steps: int, batch_size: int, threads: int, device: str, seconds: float) -> dict:
    import torch

    from pipeline.model import create_model, load_preset, num_params
    from pipeline.model.decoder import load_musicgen_decoder  # noqa: F401 - musicgen-small runs with random weights

    torch.set_num_threads(threads)
    K, card, fr, dc, df = SHAPES[preset]
    cfg = load_preset(preset, decoder={"num_codebooks": K, "codebook_size": card},
                      fusion={"clip_dim": dc, "flow_dim": df}, frame_rate=fr, pretrained="")
    model = create_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    from pipeline.config import EmbedConfig

    cfps, ffps = EmbedConfig().clip_fps, EmbedConfig().flow_fps
    B, T, Tc, Tf = batch_size, int(seconds * fr), int(seconds * cfps), int(seconds * ffps)
    batch = {"clip": torch.randn(B, Tc, dc), "clip_mask": torch.ones(B, Tc, dtype=torch.bool),
             "clip_fps": torch.full((B,), cfps), "flow": torch.randn(B, Tf, df),
             "flow_mask": torch.ones(B, Tf, dtype=torch.bool), "flow_fps": torch.full((B,), ffps),
             "codes": torch.randint(0, card, (B, K, T))}
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with autocast:
            _, loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"preset": preset, "device": device, "params_m": round(num_params(model) / 1e6, 2), "batch": B,
            "tokens_per_step": B * K * T, "step_s_median": round(step_s, 4), "tokens_per_s": round(B * K * T / step_s),
            "peak_memory_mb": round(peak / 2**20, 1), "threads": threads, "clip_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["debug", "embedded"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.steps, args.batch, args.threads, args.device, args.seconds)))
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for preset in args.presets:
        out = subprocess.run([sys.executable, __file__, "--child", preset, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--threads", str(args.threads), "--device", args.device, "--seconds",
                              str(args.seconds)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}"
        print(json.dumps(row))
        results[f"{preset}@{args.device}@{args.threads}t"] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
