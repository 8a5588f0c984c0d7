"""Why instrument accuracy stays low: the timbre study of docs/baselines.md (issue parts "timbre" and "text steering").

    python scripts/timbre_study.py probe                  # how much of the instrument the cached features carry
    python scripts/timbre_study.py confusion full reference retrieval   # the tagger's instrument per generated clip
    python scripts/timbre_study.py steer [--out DIR]      # a text-conditioned full model steered to other instruments
    python scripts/timbre_study.py prior [--weights 0,2,4,8] [--plausibility P]  # an instrument prior on the tokens

`probe`: a logistic regression (sklearn, standardised inputs, C in 0.01 / 0.1 / 1) from per-clip summaries of the
embed stage's streams (`data/features/{clip,flow}`) to the SynthV2M instrument, fitted on the train split and scored
on val + test: the ceiling of what any model that reads these features can know about the instrument. `confusion`:
true instrument x the tagger's instrument head on `data/generated/{system}/{id}.wav` for the test clips. `steer`:
trains the full system with text (train.text: true) whose captions are `--template` filled with each clip's instrument
(seed base.seed, the demo's settings), then generates every test clip without a prompt, with its own instrument and
with another one (`other_instrument`), and scores the tagger's instrument against the prompt's and beat F1 against the
labels (the evaluate stage's beat tracker and F-measure). Prints JSON lines; `steer` also writes its per-clip rows to
OUT/steer.csv. `prior`: can the decoder play an instrument it is told at the token level? P(instrument | token) per
codebook is counted from the train split's tokens and SynthV2M labels (`instrument_prior`, add-one smoothed), and
`weight` x log P(target | token) is added to every token's logit at sampling, beside the harmony bias (the study wraps
`V2M._harmony_bias` for its run: a measurement, not a feature), with the target the clip's own instrument or
another one; the tagger's instrument against the target and beat F1, per weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate import read_labels  # noqa: E402
from pipeline.shards import load_features, stable_hash  # noqa: E402

INSTRUMENTS = ("piano", "organ", "pluck", "bell")  # SynthV2M's (pipeline/synth.py INSTRUMENT_SHAPES)
TEMPLATE = "music played on the {instrument}"



def scene_rows(params) -> dict:
    """The scene stream's rows by id (models that read the scene need them), or {} without the stream."""
    folder = Path(params.embed.out_dir) / "scene"
    return load_features(folder) if folder.is_dir() else {}


def scene_of(scene: dict, item_id: str, fps: pd.DataFrame) -> dict:
    """The scene rows of a clip as generate_codes' features (at the CLIP stream's rate), if there are any."""
    if item_id not in scene:
        return {}
    return {"scene": np.asarray(scene[item_id]), "scene_fps": float(fps.loc[item_id, "clip_fps"])}

def summaries(rows: np.ndarray) -> np.ndarray:
    """A stream's rows (T, D) -> (2D,): mean and standard deviation over time."""
    return np.concatenate([rows.mean(0), rows.std(0)])


def probe_accuracy(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> dict[float, float]:
    """{C: held-out accuracy} of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    out = {}
    for c in (0.01, 0.1, 1.0):
        model = LogisticRegression(C=c, max_iter=5000).fit((train_x - mu) / sd, train_y)
        out[c] = round(float(model.score((test_x - mu) / sd, test_y)), 3)
    return out


def other_instrument(clip_id: str, instrument: str) -> str:
    """A fixed other instrument for a clip (one of the three others, by the id's stable hash)."""
    others = [i for i in INSTRUMENTS if i != instrument]
    return others[int(stable_hash(clip_id), 16) % len(others)]


def probe(params) -> int:
    labels = read_labels(Path(params.ingest.out_dir))
    streams = {s: load_features(Path(params.embed.out_dir) / s) for s in ("clip", "flow")}
    train = [i for i in labels.index if labels.loc[i, "split"] == "train" and all(i in s for s in streams.values())]
    test = [i for i in labels.index if labels.loc[i, "split"] != "train" and all(i in s for s in streams.values())]
    for name, keys in (("clip", ("clip",)), ("flow", ("flow",)), ("clip+flow", ("clip", "flow"))):
        def x(ids, keys=keys):
            return np.stack([np.concatenate([summaries(np.asarray(streams[k][i], np.float64)) for k in keys])
                             for i in ids])
        acc = probe_accuracy(x(train), list(labels.loc[train, "instrument"]), x(test), list(labels.loc[test,
                                                                                                    "instrument"]))
        print(json.dumps({"features": name, "train": len(train), "held_out": len(test), "accuracy_by_C": acc}))
    return 0


def confusion(params, systems: list[str]) -> int:
    from pipeline.media import load_audio
    from pipeline.metrics.tagger import load_tagger

    tagger = load_tagger(Path(params.evaluate.tagger.out_dir) / "tagger.pt")
    labels = read_labels(Path(params.ingest.out_dir))
    test = labels[labels["split"] == params.evaluate.split]
    for system in systems:
        rows = []
        for i, true in zip(test["id"], test["instrument"], strict=True):
            wav = Path(params.evaluate.generated_dir) / system / f"{i}.wav"
            y, sr = load_audio(wav, params.evaluate.tagger.sample_rate)
            rows.append({"true": true, "predicted": tagger.predict(y, sr)["instrument"]})
        frame = pd.DataFrame(rows)
        table = pd.crosstab(frame["true"], frame["predicted"])
        print(json.dumps({"system": system, "accuracy": round(float((frame["true"] == frame["predicted"]).mean()), 3),
                          "confusion": {t: {p: int(n) for p, n in row.items() if n} for t, row in
                                        table.iterrows()}}))
    return 0


def instrument_prior(codes: dict[str, np.ndarray], instruments: dict[str, str], num_codebooks: int,
                     codebook_size: int, alpha: float = 1.0) -> np.ndarray:
    """log P(instrument | token) (K, V, len(INSTRUMENTS)): per codebook, how often each token was written in clips of
    each instrument (codes[id]: (T, K) as the token store keeps them), add-`alpha` smoothed; a token never written
    gets the uniform log(1 / 4)."""
    counts = np.zeros((num_codebooks, codebook_size, len(INSTRUMENTS)))
    for clip_id, instrument in instruments.items():
        c = np.asarray(codes[clip_id]).T  # (K, T)
        for k in range(num_codebooks):
            np.add.at(counts[k, :, INSTRUMENTS.index(instrument)], c[k], 1)
    return np.log((counts + alpha) / (counts + alpha).sum(-1, keepdims=True))


def prior(params, model_path: Path, weights: list[float], plausibility: float | None = None) -> int:
    import torch

    from pipeline.inference import decode_windows, generate_codes, load_model
    from pipeline.metrics import rhythm
    from pipeline.metrics.tagger import load_tagger
    from pipeline.model.v2m import V2M

    labels = read_labels(Path(params.ingest.out_dir))
    model = load_model(model_path, params)
    if not model.net.has_token_chroma():
        raise SystemExit(f"timbre_study prior: {model_path} has no harmony bias to add the prior to")
    dec = model.net.cfg.decoder
    train = labels[labels["split"] == "train"]
    table = torch.from_numpy(instrument_prior(load_features(Path(params.tokenize.store_dir)),
                                              dict(zip(train["id"], train["instrument"], strict=True)),
                                              dec.num_codebooks, dec.codebook_size)).float()
    state = {"weight": 0.0, "target": 0}
    harmony_bias = V2M._harmony_bias

    def with_prior(net, batch, n_frames, weight, *rest):  # the harmony bias (B, F, K, V) plus the target's prior
        return harmony_bias(net, batch, n_frames, weight, *rest) + state["weight"] * table[:, :, state["target"]]

    torch.set_num_threads(params.train.threads or 1)
    tagger = load_tagger(Path(params.evaluate.tagger.out_dir) / "tagger.pt")
    clip, flow = (load_features(Path(params.embed.out_dir) / s) for s in ("clip", "flow"))
    scene = scene_rows(params)
    fps = pd.read_parquet(Path(params.embed.out_dir) / "manifest.parquet").set_index("id")
    gen = params.generate
    if plausibility is not None:
        gen = dataclasses.replace(gen, sampling=dataclasses.replace(gen.sampling, plausibility=plausibility))
    V2M._harmony_bias = with_prior
    try:
        for weight in weights:
            rows = []
            for _, r in labels.query("split == @gen.split").iterrows():
                feats = {"clip": np.asarray(clip[r["id"]]), "flow": np.asarray(flow[r["id"]]),
                         "clip_fps": float(fps.loc[r["id"], "clip_fps"]),
                         "flow_fps": float(fps.loc[r["id"], "flow_fps"]), **scene_of(scene, r["id"], fps)}
                n = int(round(float(r["duration_s"]) * model.codec.sample_rate))
                beats = np.asarray(json.loads(r["beat_times"]))
                for target_of in ("own", "other"):
                    target = r["instrument"] if target_of == "own" else other_instrument(r["id"], r["instrument"])
                    state.update(weight=weight, target=INSTRUMENTS.index(target))
                    windows = generate_codes(model, feats, model.codec.num_frames(n), gen, params.base.seed, None,
                                             progress=False)
                    wav = decode_windows(model.codec, windows, n)
                    rows.append({"target": target_of,
                                 "ok": tagger.predict(wav, model.codec.sample_rate)["instrument"] == target,
                                 "beat_f1": rhythm.beat_f1(rhythm.estimate_beats(wav, model.codec.sample_rate)[1],
                                                           beats)})
            for target_of, part in pd.DataFrame(rows).groupby("target", sort=False):
                print(json.dumps({"weight": weight, "target": target_of, "clips": len(part),
                                  "plausibility": gen.sampling.plausibility,
                                  "instrument_acc_vs_target": round(float(part["ok"].mean()), 3),
                                  "beat_f1": round(float(part["beat_f1"].mean()), 3)}), flush=True)
    finally:
        V2M._harmony_bias = harmony_bias
    return 0


def steer(params, params_path: Path, out: Path, template: str, bias: float | None) -> int:
    import torch
    import yaml

    from pipeline import train
    from pipeline.inference import decode_windows, generate_codes, load_model, text_embedding
    from pipeline.metrics import rhythm
    from pipeline.metrics.tagger import load_tagger

    out.mkdir(parents=True, exist_ok=True)
    ingest = Path(params.ingest.out_dir)
    frame = pd.read_parquet(ingest / "manifest.parquet")
    ok = frame["status"] == "ok"
    frame.loc[ok, "caption"] = [template.format(instrument=i) for i in frame.loc[ok, "instrument"]]
    frame.to_parquet(out / "manifest.parquet")
    raw = yaml.safe_load(params_path.read_text())
    raw["train"]["text"] = True
    (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    model_dir = out / "model"
    if not (model_dir / "v2m.pt").exists():
        assert train.main(["--params", str(out / "params.yaml"), "--system", "full", "--manifest",
                           str(out / "manifest.parquet"), "--out", str(model_dir), "--metrics", str(out)]) == 0
    gen = params.generate
    if bias is not None:
        gen = dataclasses.replace(gen, sampling=dataclasses.replace(gen.sampling, harmony_bias=bias))
    model = load_model(model_dir / "v2m.pt", params)
    torch.set_num_threads(params.train.threads or 1)
    tagger = load_tagger(Path(params.evaluate.tagger.out_dir) / "tagger.pt")
    clip, flow = (load_features(Path(params.embed.out_dir) / s) for s in ("clip", "flow"))
    scene = scene_rows(params)
    fps = pd.read_parquet(Path(params.embed.out_dir) / "manifest.parquet").set_index("id")
    rows = []
    for _, r in read_labels(ingest).query("split == @params.generate.split").iterrows():
        feats = {"clip": np.asarray(clip[r["id"]]), "flow": np.asarray(flow[r["id"]]),
                 "clip_fps": float(fps.loc[r["id"], "clip_fps"]), "flow_fps": float(fps.loc[r["id"], "flow_fps"]),
                 **scene_of(scene, r["id"], fps)}
        n = int(round(float(r["duration_s"]) * model.codec.sample_rate))
        beats = np.asarray(json.loads(r["beat_times"]) if isinstance(r["beat_times"], str) else r["beat_times"])
        for prompt in ("none", "own", "other"):
            target = other_instrument(r["id"], r["instrument"]) if prompt == "other" else r["instrument"]
            text = None if prompt == "none" else text_embedding(model, template.format(instrument=target))
            windows = generate_codes(model, feats, model.codec.num_frames(n), gen, params.base.seed, text,
                                     progress=False)
            wav = decode_windows(model.codec, windows, n)
            predicted = tagger.predict(wav, model.codec.sample_rate)["instrument"]
            f1 = rhythm.beat_f1(rhythm.estimate_beats(wav, model.codec.sample_rate)[1], beats)  # the evaluate stage's
            rows.append({"id": r["id"], "prompt": prompt, "target": target, "predicted": predicted,
                         "instrument_ok": predicted == target, "beat_f1": round(f1, 4)})
    table = pd.DataFrame(rows)
    table.to_csv(out / "steer.csv", index=False)
    for prompt, part in table.groupby("prompt", sort=False):
        print(json.dumps({"prompt": prompt, "clips": len(part), "template": template,
                          "harmony_bias": gen.sampling.harmony_bias,
                          "instrument_acc_vs_prompt": round(float(part["instrument_ok"].mean()), 3),
                          "beat_f1": round(float(part["beat_f1"].mean()), 3)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("probe", "confusion", "steer", "prior"))
    parser.add_argument("systems", nargs="*", default=["full", "reference", "retrieval"], help="confusion: systems")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/.cache/timbre_study", help="steer: its model, params and steer.csv")
    parser.add_argument("--template", default=TEMPLATE, help="steer: the caption and the prompt")
    parser.add_argument("--harmony-bias", type=float, help="steer: instead of generate.sampling.harmony_bias")
    parser.add_argument("--weights", default="0,2,4,8", help="prior: weights of log P(target | token), comma-separated")
    parser.add_argument("--model", default="models/full/v2m.pt", help="prior: the model to steer")
    parser.add_argument("--plausibility", type=float, help="prior: instead of generate.sampling.plausibility")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.what == "probe":
        return probe(params)
    if args.what == "confusion":
        return confusion(params, args.systems)
    if args.what == "prior":
        return prior(params, Path(args.model), [float(w) for w in args.weights.split(",")], args.plausibility)
    return steer(params, Path(args.params), Path(args.out), args.template, args.harmony_bias)


if __name__ == "__main__":
    sys.exit(main())
