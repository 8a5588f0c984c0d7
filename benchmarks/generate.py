"""Generation speed and the real videos of ../shared/data.

    python benchmarks/generate.py [--model models/full/v2m.pt] [--seconds 32] [--threads 1]
    python benchmarks/generate.py --preset musicgen-small --device cuda          # on a GPU (random weights)
    python benchmarks/generate.py --real ../shared/data --out /tmp/gen_real      # per-clip table
    python benchmarks/generate.py --seams 4 --seconds 32 --prompts 0.5 4         # window seams vs prompt length

Real-time factor (RTF) = seconds of music per wall-clock second, for the token generation alone (the model's part:
windows, prompt prefill, CFG), with the KV cache and without it, over `--seconds` of music (past the window, so the
window continuation is included); for the trained embedded model, also end to end on a real video (features on the
fly + tokens + codec decode + mux). `--real` runs `v2m generate` on every video of the folder and reports, per clip,
the input and output durations (container and video stream), whether the video stream was copied, and the AV-Align
of the result (and of the original soundtrack, for comparison). Results are merged into
benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "generate.json"


def rtf_tokens(model, seconds: float, use_cache: bool, repeats: int = 1) -> float:
    """Seconds of music per wall second of `generate_codes` on random video features."""
    from pipeline import inference

    rng = np.random.default_rng(0)
    dc, df = model.net.cfg.fusion.clip_dim, model.net.cfg.fusion.flow_dim
    feats = {"clip": rng.normal(size=(int(seconds * 2) + 1, dc)).astype(np.float32), "clip_fps": 2.0,
             "flow": rng.normal(size=(int(seconds * 8) + 1, df)).astype(np.float32), "flow_fps": 8.0}
    cfg = dataclasses.replace(model.params.generate, use_cache=use_cache)
    n = int(round(seconds * model.frame_rate))
    inference.generate_codes(model, feats, min(n, 20), cfg, 0, None, progress=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        inference.generate_codes(model, feats, n, cfg, 0, None, progress=False)
        if model.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return round(seconds / best, 2)


def random_model(preset: str, device: str):
    """A Model with random weights of `preset` (no codec): for timing the token generation only."""
    import torch

    from pipeline import inference
    from pipeline.config import Params
    from pipeline.model import create_model, load_preset

    shapes = {"embedded": (2, 256, 25.0), "debug": (2, 256, 25.0), "musicgen-small": (4, 2048, 50.0)}
    K, card, fr = shapes[preset]
    cfg = load_preset(preset, decoder={"num_codebooks": K, "codebook_size": card},
                      fusion={"clip_dim": 512 if preset == "musicgen-small" else 256, "flow_dim": 160},
                      frame_rate=fr, pretrained="")
    net = create_model(cfg).to(device).eval()
    return inference.Model(Path(f"<random {preset}>"), net, "full", Params(), None, torch.device(device))


def speed(args) -> dict:
    import torch

    from pipeline import inference
    from pipeline.config import load_params

    torch.set_num_threads(args.threads)
    if args.preset:
        model = random_model(args.preset, args.device)
        name = args.preset
    else:
        model = inference.load_model(args.model, load_params(REPO / "params.yaml"))
        name = "embedded"
    out = {"preset": name, "device": str(model.device), "threads": args.threads, "seconds": args.seconds,
           "window_s": model.params.base.clip_seconds, "prompt_s": model.params.generate.prompt_seconds,
           "guidance": model.params.generate.sampling.guidance, "machine": f"{platform.machine()}, {model.device.type}",
           "rtf_kv_cache": rtf_tokens(model, args.seconds, True, args.repeats),
           "rtf_no_cache": rtf_tokens(model, args.seconds, False, 1)}
    if not args.preset and args.video:  # end to end on a real video
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(args.video)
            t0 = time.perf_counter()
            res = inference.generate_one(model, src, Path(tmp) / f"out{src.suffix}", model.params.generate, 0, None,
                                        progress=False)
            out["end_to_end"] = {"video": src.name, "seconds": round(res["duration_in_s"], 2),
                                 "wall_s": round(time.perf_counter() - t0, 2),
                                 "rtf": round(res["duration_in_s"] / (time.perf_counter() - t0), 2)}
    return out


def _packets(path: Path) -> list[tuple]:
    """(pts, bytes) of every packet of the first video stream."""
    import av

    with av.open(str(path)) as container:
        return [(pk.pts, bytes(pk)) for pk in container.demux(container.streams.video[0]) if pk.size]


def real_videos(folder: Path, out_dir: Path, model_path: Path) -> list[dict]:
    from pipeline import inference
    from pipeline.config import load_params
    from pipeline.media import load_audio, probe, video_duration
    from pipeline.metrics.av_align import av_align, video_peaks

    model = inference.load_model(model_path, load_params(REPO / "params.yaml"))
    rows = []
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in inference.VIDEO_SUFFIXES)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in videos:
        dest = out_dir / src.name
        res = inference.generate_one(model, src, dest, model.params.generate, 0, None, progress=False)
        info_in, info_out = probe(src), probe(dest)
        v_in, fps = video_duration(src)
        v_out, _ = video_duration(dest)
        peaks = video_peaks(src)
        music, sr = load_audio(dest, 22050)
        row = {"video": f"{src.parent.name}/{src.name}", "size": f"{info_in.display_width}x{info_in.display_height}",
               "fps": round(fps, 3), "codec": info_in.video_codec, "duration_in_s": round(info_in.duration_s, 3),
               "video_in_s": round(v_in, 3), "duration_out_s": round(info_out.duration_s, 3),
               "video_out_s": round(v_out, 3),
               "diff_frames": round(abs(info_out.duration_s - max(v_in, info_in.duration_s)) * fps, 2),
               "video_stream": res["video"], "packets_identical": _packets(src) == _packets(dest),
               "windows": res["windows"], "wall_s": round(res["seconds"], 1),
               "av_align": round(float(av_align(peaks, music, sr)), 3)}
        if info_in.has_audio:
            original, sr0 = load_audio(src, 22050)
            row["av_align_original_audio"] = round(float(av_align(peaks, original, sr0)), 3)
        rows.append(row)
        print(json.dumps(row))
    return rows


def seam_study(model_path: Path, clips: int, seconds: float, prompts: list[float], seeds: int) -> dict:
    """Long SynthV2M videos (one tempo and key throughout, `seconds` long) generated with each prompt length: beat F1
    against the true beats over the whole clip, and the chroma cosine of the 2 s before vs the 2 s after each window
    seam (where a window's own tokens start; pitch-class histograms of 3 s each side), against the same measure at
    the middle of the windows."""
    import librosa

    from pipeline import inference
    from pipeline.config import BaseConfig, SynthConfig, load_params
    from pipeline.media import encode_video
    from pipeline.metrics.rhythm import beat_f1, estimate_beats
    from pipeline.synth import make_spec, render_audio, render_frames

    model = inference.load_model(model_path, load_params(REPO / "params.yaml"))
    base = BaseConfig(clip_seconds=seconds)
    sr, fr = model.codec.sample_rate, model.frame_rate
    window = int(round(model.params.base.clip_seconds * fr))
    scores: dict = {str(p): {"beat_f1": [], "seam_chroma": [], "mid_chroma": []} for p in prompts}

    def chroma_cos(wav: np.ndarray, t: float) -> float:
        """Cosine of the pitch-class histograms (per-frame chroma argmax, as the chroma metric) of the 3 s before
        and the 3 s after t: 1 = the same notes on both sides."""
        a, b = (wav[int(max(0, t - 3) * sr) : int(t * sr)], wav[int(t * sr) : int((t + 3) * sr)])
        ca, cb = (np.bincount(librosa.feature.chroma_stft(y=x, sr=sr).argmax(0), minlength=12) for x in (a, b))
        return float(ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb) + 1e-12))

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(clips):
            spec = make_spec(7, 10_000 + i, SynthConfig(), base)
            video = Path(tmp) / f"{spec.id}.mp4"
            encode_video(video, render_frames(spec, 24, 256, 256), 24, render_audio(spec, sr)[None], sr)
            feats = inference.video_features(model, video, Path(tmp))
            n = model.codec.num_frames(int(round(feats["duration_s"] * sr)))
            for prompt_s in prompts:
                # a crossfade of at most half the prompt (0.25 s for VidMuse's 0.5 s)
                cfg = dataclasses.replace(model.params.generate, prompt_seconds=prompt_s,
                                          crossfade_seconds=min(model.params.generate.crossfade_seconds, prompt_s / 2))
                for seed in range(seeds):
                    windows = inference.generate_codes(model, feats, n, cfg, seed, None, False)
                    wav = inference.decode_windows(model.codec, windows, n * model.codec.hop_length)
                    row = scores[str(prompt_s)]
                    row["beat_f1"].append(beat_f1(estimate_beats(wav, sr)[1], np.asarray(spec.beat_times)))
                    prompt = windows.given + windows.overlap
                    seams = [end / fr for _, end in windows.seams()]
                    mids = [(s + prompt + (window - prompt) / 2) / fr for s in windows.starts[1:-1]]
                    row["seam_chroma"] += [chroma_cos(wav, t) for t in seams if 3 <= t <= seconds - 3]
                    row["mid_chroma"] += [chroma_cos(wav, t) for t in mids if 3 <= t <= seconds - 3]
            print(spec.id, {k: {m: round(float(np.mean(v)), 3) for m, v in r.items() if v} for k, r in scores.items()})
    return {"clips": clips, "seconds": seconds, "seeds": seeds, "window_s": model.params.base.clip_seconds,
            **{f"prompt_{k}s": {m: round(float(np.mean(v)), 3) for m, v in r.items() if v} | {"n_seams":
               len(r["seam_chroma"])} for k, r in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/full/v2m.pt")
    parser.add_argument("--preset", help="time a random-weight preset instead (e.g. musicgen-small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=32.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--video", default=str(REPO.parent / "shared/data/videos/nasa_earth_night_30s.mp4"))
    parser.add_argument("--real", type=Path, help="a folder of videos: the per-clip table")
    parser.add_argument("--out", type=Path, default=Path("/tmp/v2m_generate_real"))
    parser.add_argument("--seams", type=int, metavar="CLIPS", help="the window-seam study on this many clips")
    parser.add_argument("--prompts", type=float, nargs="+", default=[0.5, 4.0])
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.seams:
        results["seams"] = seam_study(Path(args.model), args.seams, args.seconds, args.prompts, args.repeats)
    elif args.real:
        results["real_videos"] = real_videos(args.real, args.out, Path(args.model))
    else:
        row = speed(args)
        key = args.preset or "embedded"
        results[key if row["device"] == "cpu" else f"{key}@{row['device']}"] = row
        print(json.dumps(row, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
