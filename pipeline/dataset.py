"""The training set: per-id items from the cached stores (data/features/{clip,flow}, data/tokens/{codec}) and the
ingest manifest (split, caption, beat times), with no video or audio decoded; and `collate`, which pads items into the
model's batch. Used by the train stage and by the studies' scripts (scripts/score_checkpoint.py), which score a
checkpoint on the same items.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.shards import FeatureStore, load_features

log = logging.getLogger(__name__)


def _fps(root: Path, ids: list[str], column: str = "fps") -> dict[str, float]:
    """{id: rate} from a store's index (`column`, else "fps"): a feature stream's rows or a token store's frames per
    second."""
    layout = json.loads((root / "store.json").read_text())["num_shards"] if (root / "store.json").exists() else None
    meta = FeatureStore(root, layout or len(list(root.glob("*.done.json")))).metadata()
    meta = meta[meta["id"].isin(ids)]
    col = column if column in meta.columns else "fps"
    return dict(zip(meta["id"], meta[col].astype(float), strict=True))


def load_dataset(features_dir: Path, tokens_dir: Path, manifest: Path | None,
                 codec_info: dict | None = None) -> tuple[list[dict], dict]:
    """Items {id, split, clip (Tc, Dc), flow (Tf, Df), codes (K, T), clip_fps, flow_fps, beats, caption} and the
    codec info {frame_rate, num_codebooks, codebook_size, name}: from `codec_info` (the codec's `describe()`) when
    given, else from the token store's metadata (a frame_rate or fps column, codec.json)."""
    clip, flow, tokens = (load_features(features_dir / "clip"), load_features(features_dir / "flow"),
                          load_features(tokens_dir))
    ids = sorted(set(clip) & set(flow) & set(tokens))
    rows = {}
    if manifest is not None and Path(manifest).exists():
        frame = pd.read_parquet(manifest)
        frame = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
        rows = {r["id"]: r for r in frame.to_dict("records")}
        ids = [i for i in ids if i in rows]
    dropped = len(set(clip) | set(flow) | set(tokens)) - len(ids)
    if dropped:
        log.warning("%d id(s) are not in every store (clip, flow, tokens, manifest) and are left out", dropped)
    if not ids:
        raise SystemExit(f"train: no ids with clip + flow features ({features_dir}) and tokens ({tokens_dir})")
    clip_fps, flow_fps = _fps(features_dir / "clip", ids), _fps(features_dir / "flow", ids)
    frame_rate = {} if codec_info else _fps(tokens_dir, ids, "frame_rate")
    meta = codec_info or _store_info(tokens_dir)
    items = []
    for i in ids:
        row = rows.get(i, {})
        beats = row.get("beat_times")
        items.append({"id": i, "split": row.get("split", "train") or "train",
                      "clip": np.asarray(clip[i], np.float32), "flow": np.asarray(flow[i], np.float32),
                      "codes": np.asarray(tokens[i], np.int64).T, "clip_fps": clip_fps[i], "flow_fps": flow_fps[i],
                      "beats": np.asarray(json.loads(beats) if isinstance(beats, str) and beats else [], float),
                      "caption": str(row.get("caption") or "")})
    rate = meta["frame_rate"] if codec_info else next(iter(frame_rate.values()))
    codec = {"frame_rate": float(rate), "num_codebooks": int(items[0]["codes"].shape[0]),
             "codebook_size": int(meta.get("codebook_size") or max(int(it["codes"].max()) for it in items) + 1),
             "name": meta.get("codec", tokens_dir.name)}
    return items, codec


def _store_info(tokens_dir: Path) -> dict:
    """Codec facts the tokenize stage records beside its store (codec.json), if any."""
    for name in ("codec.json", "info.json"):
        if (tokens_dir / name).exists():
            return json.loads((tokens_dir / name).read_text())
    return {}


def collate(items: list[dict], text: dict[str, np.ndarray] | None = None) -> dict:
    """Pad a list of items into a batch: features (B, T, D) + masks (B, T), codes (B, K, T) + code_mask (B, T)."""
    def pad(key: str, axis: int):
        n = max(it[key].shape[axis] for it in items)
        out = np.zeros((len(items), *(n if a == axis else s for a, s in enumerate(items[0][key].shape))),
                       items[0][key].dtype)
        mask = np.zeros((len(items), n), bool)
        for b, it in enumerate(items):
            m = it[key].shape[axis]
            if axis == 0:
                out[b, :m] = it[key]
            else:
                out[b, :, :m] = it[key]
            mask[b, :m] = True
        return torch.from_numpy(out), torch.from_numpy(mask)

    batch = {}
    batch["clip"], batch["clip_mask"] = pad("clip", 0)
    batch["flow"], batch["flow_mask"] = pad("flow", 0)
    batch["codes"], batch["code_mask"] = pad("codes", 1)
    batch["clip_fps"] = torch.tensor([it["clip_fps"] for it in items], dtype=torch.float32)
    batch["flow_fps"] = torch.tensor([it["flow_fps"] for it in items], dtype=torch.float32)
    if all("harmony" in it for it in items):
        batch["harmony"] = torch.from_numpy(np.stack([it["harmony"] for it in items]))
    if all("harmony_track" in it for it in items):
        batch["harmony_track"] = pad("harmony_track", 0)[0]
    if any("bank_index" in it for it in items):
        batch["bank_index"] = torch.tensor([it.get("bank_index", -1) for it in items])
    if text is not None:
        batch["text"] = torch.from_numpy(np.stack([text[it["id"]] for it in items]))
        batch["text_mask"] = torch.tensor([bool(it["caption"]) for it in items])
    return batch
