"""v2m's generation against the peer: transformers' MusicGen decoder, side by side in one run.

    python benchmarks/peer_generate.py                       # 30 s of music, CPU, 2 threads
    python benchmarks/peer_generate.py --seconds 5           # a quick check
    python benchmarks/peer_generate.py --device cuda         # the same on a GPU (goal there: 30 s of music in <= 5 s)

Both sides have the MusicGen-small decoder size (24 layers, width 1024, 16 heads, FFN 4096, 4 codebooks of 2048 at
50 Hz) with random weights, and generate the same number of tokens: `--seconds` x 50 frames x 4 codebooks, through
the delay pattern (frames + 3 decoder steps), sampling with classifier-free guidance 3 (a doubled batch), top-k 250,
on the same device and threads:

- v2m: `pipeline.inference.generate_codes` with a random-weight `musicgen-small` model (fusion of CLIP 2 fps + flow
  8 fps features of the same length, the decoder with its KV cache, CFG), in one window;
- peer: `transformers.MusicgenForCausalLM.generate` (its own KV cache, delay-pattern mask and
  ClassifierFreeGuidanceLogitsProcessor), conditioned on encoder states of the same length as v2m's memory, with a
  self- + cross-attention cache passed in (`peer_cache`: the default one is wrong with encoder states).

Reported: tokens/s (frames x codebooks per wall second), RTF (seconds of music per wall second) and the ratio
v2m / peer. Both models are built first; after a short warm-up of each, the two sides run alternately `--repeats`
times (so a busy spell of a shared machine hits both alike) and each side's best run counts. Results go to
benchmarks/results/peer_generate.json, keyed by device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "peer_generate.json"
FRAME_RATE, K, CARD = 50, 4, 2048
DECODER = {"d_model": 1024, "n_layers": 24, "n_heads": 16, "ffn_dim": 4096}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def v2m_model(device: str, seconds: float, n_layers: int):
    """A musicgen-small-size v2m Model with random weights, its window = the whole length (one window)."""
    import torch

    from pipeline import inference
    from pipeline.config import BaseConfig, GenerateConfig, Params, SamplingConfig
    from pipeline.model import create_model, load_preset

    cfg = load_preset("musicgen-small", decoder={**DECODER, "n_layers": n_layers, "num_codebooks": K,
                                                 "codebook_size": CARD, "dropout": 0.0},
                      fusion={"clip_dim": 512, "flow_dim": 160}, frame_rate=float(FRAME_RATE), pretrained="")
    net = create_model(cfg).to(device).eval()
    params = Params(base=BaseConfig(clip_seconds=seconds),
                    generate=GenerateConfig(prompt_seconds=0.0,  # one window: no prompt
                                            sampling=SamplingConfig(guidance=3.0, temperature=1.0, top_k=250,
                                                                    plausibility=0.0, harmony_bias=0.0)))
    return inference.Model(Path("<random musicgen-small>"), net, "full", params, None, torch.device(device))


def features(seconds: float) -> dict:
    rng = np.random.default_rng(0)
    return {"clip": rng.normal(size=(int(seconds * 2) + 1, 512)).astype(np.float32), "clip_fps": 2.0,
            "flow": rng.normal(size=(int(seconds * 8) + 1, 160)).astype(np.float32), "flow_fps": 8.0}


def v2m_side(device: str, seconds: float, n_layers: int):
    """(generate(frames) -> codes [K, frames], info, memory rows) for v2m."""
    import torch

    from pipeline import inference

    model = v2m_model(device, seconds, n_layers)
    feats = features(seconds)
    with torch.no_grad():
        batch = inference.window_batch(feats, 0.0, seconds, None, model.device)
        memory_len = model.net.condition(batch).memory.shape[1]

    def generate(frames: int):
        with torch.no_grad():
            return inference.generate_codes(model, feats, frames, model.params.generate, 0, None, progress=False).codes

    params = sum(p.numel() for p in model.net.decoder.parameters())
    return generate, {"what": "v2m pipeline.inference.generate_codes (fusion + decoder, KV cache, CFG)",
                      "decoder_params_m": round(params / 1e6, 1), "memory_rows": int(memory_len)}, int(memory_len)


def peer_config(n_layers: int):
    from transformers import MusicgenDecoderConfig

    return MusicgenDecoderConfig(vocab_size=CARD, num_codebooks=K, hidden_size=DECODER["d_model"],
                                 num_hidden_layers=n_layers, num_attention_heads=DECODER["n_heads"],
                                 ffn_dim=DECODER["ffn_dim"], max_position_embeddings=4096, dropout=0.0,
                                 pad_token_id=CARD, bos_token_id=CARD, decoder_start_token_id=CARD)


def peer_cache():
    """A fresh self- + cross-attention cache for one `generate` call. Without it, transformers 5.24's
    `MusicgenForCausalLM.generate` given `encoder_hidden_states` starts a plain `DynamicCache`, and every step appends
    the encoder's keys and values to the self-attention cache: the output differs from the same generation without a
    cache, and each step costs more than the one before (quadratic time; 122 s instead of ~30 s for 3 s of music).
    tests/test_peer_generate.py checks that the peer as benchmarked gives what it gives without a cache."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def peer_side(device: str, n_layers: int, memory_len: int):
    """(generate(frames) -> codes [1, K, frames], info) for transformers' MusicgenForCausalLM."""
    import torch
    import transformers
    from transformers import MusicgenForCausalLM

    torch.manual_seed(0)
    model = MusicgenForCausalLM(peer_config(n_layers)).to(device).eval()
    # CFG as MusicGen does it: the codes of one sample (K rows), which generate doubles into [conditional,
    # unconditional] against two rows of encoder states (the second zero), and guidance applied to the logits
    states = torch.randn(1, memory_len, DECODER["d_model"], device=device)
    states = torch.cat([states, torch.zeros_like(states)])
    mask = torch.ones(2, memory_len, dtype=torch.long, device=device)
    bos = torch.full((K, 1), CARD, dtype=torch.long, device=device)

    def generate(frames: int, do_sample: bool = True, use_cache: bool = True):
        """`use_cache=False` recomputes the prefix at every step: the reference the cached peer must equal."""
        cache = {"cache": peer_cache()} if use_cache else {"use_cache": False}
        with torch.no_grad():
            return model.generate(input_ids=bos, encoder_hidden_states=states, encoder_attention_mask=mask,
                                  do_sample=do_sample, guidance_scale=3.0, top_k=250, temperature=1.0,
                                  max_new_tokens=frames + K - 1, min_new_tokens=frames + K - 1,
                                  num_return_sequences=1, **cache)

    params = sum(p.numel() for p in model.parameters())
    return generate, {"what": f"transformers {transformers.__version__} MusicgenForCausalLM.generate (KV cache, CFG)",
                      "decoder_params_m": round(params / 1e6, 1)}


def timed(generate, frames: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = generate(frames)
    sync(device)
    wall = time.perf_counter() - t0
    assert tuple(out.shape[-2:]) == (K, frames), tuple(out.shape)  # frames + K - 1 steps, the delay pattern removed
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="music to generate (50 frames per second)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24 = MusicGen-small)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    v2m_gen, v2m, memory_len = v2m_side(args.device, args.seconds, args.layers)
    peer_gen, peer = peer_side(args.device, args.layers, memory_len)
    n = int(round(args.seconds * FRAME_RATE))
    for generate in (v2m_gen, peer_gen):
        timed(generate, min(n, 25), args.device)  # warm-up
    walls: dict[str, list[float]] = {"v2m": [], "peer": []}
    for repeat in range(args.repeats):  # alternated, so a busy spell of a shared machine hits both sides alike
        for name, generate in (("v2m", v2m_gen), ("peer", peer_gen)):
            walls[name].append(timed(generate, n, args.device))
            print(f"repeat {repeat + 1}: {name} {walls[name][-1]:.1f} s", flush=True)
    for side, name in ((v2m, "v2m"), (peer, "peer")):
        side.update(wall_s=round(min(walls[name]), 3), walls_s=[round(w, 3) for w in walls[name]],
                    steps=n + K - 1, frames=n)
    tokens = n * K
    for side in (v2m, peer):
        side["tokens_per_s"] = round(tokens / side["wall_s"], 1)
        side["rtf"] = round(args.seconds / side["wall_s"], 3)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {args.threads} threads of {os.cpu_count()} CPUs"
    row = {"seconds": args.seconds, "tokens": tokens, "layers": args.layers, "device": device_name,
           "guidance": 3.0, "top_k": 250, "v2m": v2m, "peer": peer,
           "ratio_v2m_over_peer": round(peer["wall_s"] / v2m["wall_s"], 2),
           "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
           "command": "python benchmarks/peer_generate.py " + " ".join(argv if argv is not None else
                                                                       os.sys.argv[1:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[f"{args.device.split(':')[0]}_{args.seconds:g}s_{args.layers}l"] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"{args.seconds:g} s of music ({tokens} tokens) on {device_name}: v2m {v2m['wall_s']:.1f} s "
          f"({v2m['tokens_per_s']:.0f} tokens/s, RTF {v2m['rtf']:.2f}); peer {peer['wall_s']:.1f} s "
          f"({peer['tokens_per_s']:.0f} tokens/s, RTF {peer['rtf']:.2f}); v2m is {row['ratio_v2m_over_peer']:.2f}x "
          "the peer's speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
