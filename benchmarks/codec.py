"""Codec speed on this machine: encode and decode throughput in audio seconds per wall-clock second, and melvq's fit.

    python benchmarks/codec.py [--codecs melvq encodec_32khz] [--clips 8] [--seconds 8] [--threads 2]
    python benchmarks/codec.py --codecs melvq --set griffin_lim_iters=16 --set frame_rate=25 --set subframes=2
    python benchmarks/codec.py --codecs melvq --quality --set num_codebooks=4 --set codebook_size=1024

Audio: SynthV2M clips (seed 0) at 32 kHz. melvq is first fitted on `--fit-clips` other clips (its fit time is
reported); encodec_32khz loads tokenize.encodec.weights and, when they are absent, random weights of the same
architecture (facebook/encodec_32khz's config: the speed is the same). Each figure is the median of `--repeats`
passes over the clips. Results go to benchmarks/results/codec.json, merged by codec, settings and threads.

`--quality` also scores the round trip with the tokenize stage's own scoring (pipeline/codecs/roundtrip.py): on
`--quality-clips` held-out SynthV2M clips (indices 2000+, never in the fit) against their labelled beats, and on the
real music in ../shared/data/music (first 20 s of each). That is how the melvq settings were chosen
(docs/studies/codec.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "codec.json"


def synth_audio(indices, seconds: float) -> list[np.ndarray]:
    from pipeline.config import BaseConfig, SynthConfig
    from pipeline.synth import make_spec, render_audio

    return [render_audio(make_spec(0, i, SynthConfig(), BaseConfig(clip_seconds=seconds)), 32000) for i in indices]


def build(name: str, overrides: dict, fit_clips: int, seconds: float, threads: int):
    """(codec, extra facts) for a codec name; melvq fitted, encodec with real or random weights."""
    from pipeline import codecs
    from pipeline.config import EncodecCodecConfig, MelVQConfig, TokenizeConfig

    cfg = dataclasses.replace(TokenizeConfig(), threads=threads,
                              melvq=dataclasses.replace(MelVQConfig(), **overrides))
    if name == "melvq":
        codec = codecs.create_codec(name, cfg)
        started = time.perf_counter()
        codec.fit(synth_audio(range(1000, 1000 + fit_clips), seconds))
        return codec, {"fit_s": round(time.perf_counter() - started, 2), "fit_clips": fit_clips}
    try:
        return codecs.create_codec(name, cfg), {"weights": cfg.encodec.weights}
    except codecs.CodecError:
        import torch
        from transformers import EncodecModel

        from pipeline.codecs.encodec import architecture

        folder = Path(tempfile.mkdtemp(prefix="encodec-random-"))
        torch.manual_seed(0)
        EncodecModel(architecture()).save_pretrained(folder)
        codec = codecs.create_codec(name, dataclasses.replace(cfg, encodec=EncodecCodecConfig(weights=str(folder))))
        return codec, {"weights": "random (facebook/encodec_32khz config)"}


def measure(codec, clips: list[np.ndarray], repeats: int) -> dict:
    audio_s = sum(len(c) for c in clips) / codec.sample_rate
    encode, decode = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        codes = [codec.encode(c) for c in clips]
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        for c in codes:
            codec.decode(c)
        decode.append(time.perf_counter() - started)
    return {"audio_s": round(audio_s, 2), "encode_x_realtime": round(audio_s / statistics.median(encode), 1),
            "decode_x_realtime": round(audio_s / statistics.median(decode), 2),
            "encode_s_per_audio_s": round(statistics.median(encode) / audio_s, 5),
            "decode_s_per_audio_s": round(statistics.median(decode) / audio_s, 4)}


def quality(codec, n_clips: int, seconds: float, real_dir: Path) -> dict:
    """Round trip scores on held-out SynthV2M clips (with their labelled beats) and on real music."""
    from pipeline.codecs import roundtrip
    from pipeline.config import BaseConfig, SynthConfig
    from pipeline.synth import make_spec, render_audio

    synth = []
    for i in range(2000, 2000 + n_clips):
        spec = make_spec(0, i, SynthConfig(), BaseConfig(clip_seconds=seconds))
        audio = render_audio(spec, codec.sample_rate)
        synth.append({"id": str(i), "audio": audio, "beats": np.asarray(spec.beat_times)})
    real, _ = roundtrip.real_tracks(real_dir, 20.0, codec.sample_rate)
    out = {}
    for name, clips in (("synthv2m", synth), ("real", real)):
        if clips:
            scores, _ = roundtrip.measure(codec, clips)
            out[name] = {k: scores[k] for k in ("chroma", "beat_f1", "onset_f1") if k in scores}
            out[name]["clips"] = len(clips)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = json.loads(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=["melvq", "encodec_32khz"])
    parser.add_argument("--clips", type=int, default=8, help="clips encoded and decoded per pass")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip")
    parser.add_argument("--fit-clips", type=int, default=160, help="melvq: SynthV2M clips it is fitted on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="BLAS and torch threads")
    parser.add_argument("--quality", action="store_true", help="score the round trip too (chroma, beat F1, onset F1)")
    parser.add_argument("--quality-clips", type=int, default=20, help="held-out SynthV2M clips scored by --quality")
    parser.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "music"),
                        help="real music scored by --quality (default ../shared/data/music)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a tokenize.melvq setting")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    overrides = parse_overrides(args.set)
    clips = synth_audio(range(args.clips), args.seconds)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with threadpool_limits(args.threads):
        for name in args.codecs:
            codec, extra = build(name, overrides, args.fit_clips, args.seconds, args.threads)
            row = {**codec.describe(), **extra, **measure(codec, clips, args.repeats), "threads": args.threads,
                   "settings": overrides if name == "melvq" else {}, "machine": f"{platform.machine()}, cpu",
                   "command": "python benchmarks/codec.py " + " ".join(argv or sys.argv[1:])}
            if args.quality:
                row["round_trip"] = quality(codec, args.quality_clips, args.seconds, Path(args.real))
            key = f"{name}@{codec.num_codebooks}x{codec.codebook_size}@{codec.frame_rate:g}Hz@{args.threads}t"
            key += "".join(f"@{k}={v}" for k, v in sorted(overrides.items()) if name == "melvq")
            results[key] = row
            print(json.dumps({key: row}, indent=1), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
