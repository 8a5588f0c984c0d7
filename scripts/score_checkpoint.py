"""Score a trained checkpoint on one split under several sampling settings: the studies' tool (docs/studies/: harmony,
guidance, harmony bias).

    python scripts/score_checkpoint.py MODEL [--params params.yaml] [--split val] [SETTINGS_JSON ...]

SETTINGS_JSON is e.g. '{}' (the params' `generate.sampling`: CFG 3, temperature 0.8, top-k 0, plausibility 0.03,
harmony bias 8 (none for a model without a token chroma table) in the embedded profile; seed 0) or
'{"temperature": 0.4, "seed": 1}'. Each setting generates every clip of the split in one batch (cached features, no
video decoding), decodes with the tokenize stage's codec, writes the wavs to a scratch folder and scores them with the
evaluate stage's per-clip scorer (`metrics.score.score_pair`): beat F1, tempo accuracy and key accuracy against the
SynthV2M labels of the ingest manifest, chroma cosine (pooled over frames) and AV-Align against the clip's music and
video. One JSON line per setting; clip problems go to stderr. Each clip is one draw: the stage's
`generate.candidates` (the best of several draws by the retrieved key) is not applied here. It is quicker than
`v2m generate --stage` + `v2m evaluate`, which score the stage's own generations (another draw) with the baselines
and confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import codecs  # noqa: E402
from pipeline.config import SamplingConfig, load_params  # noqa: E402
from pipeline.dataset import collate, load_dataset  # noqa: E402
from pipeline.media import write_wav  # noqa: E402
from pipeline.metrics import chroma  # noqa: E402
from pipeline.metrics.score import clip_labels, score_pair  # noqa: E402
from pipeline.model import V2M, ModelConfig  # noqa: E402

METRICS = ("beat_f1", "tempo_acc", "key_acc", "chroma", "av_align")


def score(model: V2M, items: list[dict], rows: pd.DataFrame, codec, setting: dict, scratch: Path,
          defaults: SamplingConfig) -> dict:
    """Generate the items under `setting` (what it leaves out: `defaults`, the params' generate.sampling), write them
    as the generate stage does and score each with the evaluate stage's per-clip scorer (`metrics.score.score_pair`,
    labels from the ingest manifest)."""
    batch = {k: v for k, v in collate(items).items() if k not in ("codes", "code_mask")}
    generator = torch.Generator().manual_seed(int(setting.get("seed", 0)))
    codes = model.generate(batch, items[0]["codes"].shape[1], setting.get("guidance", defaults.guidance),
                           setting.get("temperature", defaults.temperature), setting.get("top_k", defaults.top_k),
                           generator, plausibility=setting.get("plausibility", defaults.plausibility),
                           harmony_bias=setting.get("harmony_bias", defaults.harmony_bias)
                           if model.has_token_chroma() else 0.0,
                           mode_guard=setting.get("mode_guard", defaults.mode_guard)
                           if model.has_token_chroma() else 0.0)
    values, chromas = {m: [] for m in METRICS}, []
    for it, c in zip(items, codes, strict=True):
        row = rows.loc[it["id"]]
        path = scratch / f"{it['id']}.wav"
        write_wav(path, codec.decode(c[:, : it["codes"].shape[1]].numpy()), codec.sample_rate)
        result = score_pair(it["id"], path, Path(row["music_path"]), Path(row["clip_path"]),
                            clip_labels(row.to_dict()), frozenset(METRICS))
        if result.problems:
            print(f"{it['id']}: {'; '.join(result.problems)}", file=sys.stderr)
        chromas += [result.chroma] if result.chroma is not None else []
        for m in METRICS:
            values[m].append(result.values.get(m, float("nan")))
    out = {m: round(float(np.nanmean(v)), 4) for m, v in values.items()}
    out["chroma"] = round(chroma.pool(chromas), 4)  # frame-weighted over clips, as evaluate pools it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a v2m.pt (models/full/v2m.pt)")
    parser.add_argument("settings", nargs="*", default=["{}"], help="sampling settings as JSON objects")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="val")
    parser.add_argument("--keep", metavar="DIR", help="write the generated wavs to DIR/<setting number>/ and keep them "
                        "(default: a scratch folder, deleted)")
    args = parser.parse_intermixed_args(argv)  # options before or after the settings
    torch.set_num_threads(1)
    params = load_params(args.params)
    ckpt = torch.load(args.model, map_location="cpu", weights_only=True)
    model = V2M(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    try:
        codec = codecs.load_codec(params.tokenize.codec, params.tokenize)
    except Exception as exc:  # noqa: BLE001 - any reason the codec cannot be built gets the same answer
        raise SystemExit(f"score_checkpoint: the tokenize stage's codec is not available (run `v2m tokenize`): "
                         f"{type(exc).__name__}: {exc}") from None
    manifest = Path(params.ingest.out_dir) / "manifest.parquet"
    items, _ = load_dataset(Path(params.embed.out_dir), Path(params.tokenize.store_dir), manifest, codec.describe())
    items = [it for it in items if it["split"] == args.split]
    if not items:
        raise SystemExit(f"score_checkpoint: no {args.split} clips in {manifest}")
    music = pd.read_parquet(Path(params.separate.out_dir) / "manifest.parquet", columns=["id", "music_path"])
    rows = pd.read_parquet(manifest).merge(music, on="id").set_index("id", drop=False)
    with tempfile.TemporaryDirectory(prefix="score_checkpoint_") as scratch:
        for n, text in enumerate(args.settings):
            setting = json.loads(text)
            out = Path(args.keep) / str(n) if args.keep else Path(scratch)
            out.mkdir(parents=True, exist_ok=True)
            print(json.dumps({"model": args.model, "split": args.split, "clips": len(items), "settings": setting,
                              **score(model, items, rows, codec, setting, out, params.generate.sampling)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
