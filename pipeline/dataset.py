"""The training set: per-id items from the cached stores (data/features/{clip,flow}, data/tokens/{codec}) and the
ingest manifest (split, caption, beat times), with no video or audio decoded; and `collate`, which pads items into the
model's batch. Used by the train stage and by the studies' scripts (scripts/score_checkpoint.py), which score a
checkpoint on the same items.
"""

from __future__ import annotations

import io
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
                 codec_info: dict | None = None, patch_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Items {id, split, clip (Tc, Dc), flow (Tf, Df), codes (K, T), clip_fps, flow_fps, beats, caption} and the
    codec info {frame_rate, num_codebooks, codebook_size, name}: from `codec_info` (the codec's `describe()`) when
    given, else from the token store's metadata (a frame_rate or fps column, codec.json). With `patch_dir` (the
    patch stream's store, `v2m embed --streams patch`: the spatial-fusion ablation) items also have patch (Tp, P x Dc)
    and patch_fps, and only ids with patches are kept. Items also have scene (Tc, 11), the scene stream's rows (at the
    CLIP stream's rate), when features_dir has that stream and it has the item."""
    clip, flow, tokens = (load_features(features_dir / "clip"), load_features(features_dir / "flow"),
                          load_features(tokens_dir))
    scene = load_features(features_dir / "scene") if (features_dir / "scene").is_dir() else {}
    patch = load_features(patch_dir) if patch_dir is not None else None
    ids = sorted(set(clip) & set(flow) & set(tokens) & (set(patch) if patch is not None else set(clip)))
    rows = {}
    if manifest is not None and Path(manifest).exists():
        frame = pd.read_parquet(manifest)
        frame = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
        rows = {r["id"]: r for r in frame.to_dict("records")}
        ids = [i for i in ids if i in rows]
    dropped = len(set(clip) | set(flow) | set(tokens) | set(patch or ())) - len(ids)
    if dropped:
        log.warning("%d id(s) are not in every store (clip, flow, %stokens, manifest) and are left out", dropped,
                    "patch, " if patch is not None else "")
    if not ids:
        raise SystemExit(f"train: no ids with clip + flow features ({features_dir}) and tokens ({tokens_dir})")
    clip_fps, flow_fps = _fps(features_dir / "clip", ids), _fps(features_dir / "flow", ids)
    frame_rate = {} if codec_info else _fps(tokens_dir, ids, "frame_rate")
    meta = codec_info or _store_info(tokens_dir)
    patch_fps = _fps(patch_dir, ids) if patch is not None else {}
    items = []
    for i in ids:
        row = rows.get(i, {})
        beats = row.get("beat_times")
        items.append({"id": i, "split": row.get("split", "train") or "train",
                      "clip": np.asarray(clip[i], np.float32), "flow": np.asarray(flow[i], np.float32),
                      "codes": np.asarray(tokens[i], np.int64).T, "clip_fps": clip_fps[i], "flow_fps": flow_fps[i],
                      "beats": np.asarray(json.loads(beats) if isinstance(beats, str) and beats else [], float),
                      "caption": str(row.get("caption") or ""), "instrument": str(row.get("instrument") or "")})
        if patch is not None:
            items[-1].update(patch=np.asarray(patch[i], np.float32), patch_fps=patch_fps[i])
        if i in scene:
            items[-1]["scene"] = np.asarray(scene[i], np.float32)
    rate = meta["frame_rate"] if codec_info else next(iter(frame_rate.values()))
    codec = {"frame_rate": float(rate), "num_codebooks": int(items[0]["codes"].shape[0]),
             "codebook_size": int(meta.get("codebook_size") or max(int(it["codes"].max()) for it in items) + 1),
             "name": meta.get("codec", tokens_dir.name)}
    return items, codec


def load_swaps(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{clip id: {instrument: codes [K, T] int64}} of the ok rows of a swaps folder (`v2m swaps`, pipeline/swaps.py)."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"train: {manifest} is missing; run `v2m swaps` (DVC stage `swaps`)")
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    out = {}
    for clip_id in frame.loc[frame["status"] == "ok", "id"]:
        with np.load(Path(folder) / f"{clip_id}.npz") as saved:
            out[clip_id] = {k: saved[k].astype(np.int64) for k in saved.files if k != "key"}
    if not out:
        raise SystemExit(f"train: {manifest} has no ok clip")
    return out


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
    if all("patch" in it for it in items):
        batch["patch"], batch["patch_mask"] = pad("patch", 0)
        batch["patch_fps"] = torch.tensor([it["patch_fps"] for it in items], dtype=torch.float32)
    if all("scene" in it for it in items):  # on the CLIP stream's time axis: clip_fps is its rate too
        batch["scene"], batch["scene_mask"] = pad("scene", 0)
    if all("harmony" in it for it in items):
        batch["harmony"] = torch.from_numpy(np.stack([it["harmony"] for it in items]))
    if all("harmony_track" in it for it in items):
        batch["harmony_track"] = pad("harmony_track", 0)[0]
    if any("bank_index" in it for it in items):
        batch["bank_index"] = torch.tensor([it.get("bank_index", -1) for it in items])
    if text is not None:
        batch["text"] = torch.from_numpy(np.stack([text[it.get("text_key", it["id"])] for it in items]))
        batch["text_mask"] = torch.tensor([bool(it["caption"]) for it in items])
        if any(it.get("text_force") for it in items):  # timbre swaps: their caption is never dropped
            batch["text_force"] = torch.tensor([bool(it.get("text_force")) for it in items])
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# harmony targets
# ----------------------------------------------------------------------------------------------------------------------

HARMONY_CACHE_VERSION = 1  # bump when rhythm.chroma_track / frame_chroma change what they compute


def harmony_cache_dir(music_dir: Path) -> Path:
    """Where add_harmony keeps what it computed: {music_dir}/../.cache/harmony/ (data/.cache/harmony for the default
    data/music), a side cache DVC does not track, as ingest's. Deleting it only costs the time to compute again."""
    return Path(music_dir).parent / ".cache" / "harmony"


def _harmony_job(job: tuple) -> tuple:
    """(item id, {harmony, harmony_track[, frame_chroma]} or None, error or None) of one item's music. Top level: it
    runs in the worker processes of `add_harmony`."""
    from pipeline.media import load_audio
    from pipeline.metrics.rhythm import FRAME_CHROMA_SR, SAMPLE_RATE, chroma_track, frame_chroma

    item_id, path, times, frame_rate, n_frames = job
    try:
        out = dict(zip(("harmony", "harmony_track"), chroma_track(*load_audio(path, SAMPLE_RATE), times),
                       strict=True))
        if frame_rate:
            out["frame_chroma"] = frame_chroma(*load_audio(path, FRAME_CHROMA_SR), frame_rate, n_frames)
        return item_id, out, None
    except (OSError, ValueError, RuntimeError) as exc:
        return item_id, None, str(exc)


def add_harmony(items: list[dict], music_dir: Path, frame_rate: float | None = None, workers: int = 1) -> None:
    """Set item["harmony"], the pitch-class profile [12] of the item's music (`rhythm.chroma_profile`): the harmony
    head's target, or what the kNN bank returns; and item["harmony_track"] [Tc, 12], the chroma of the half second
    around each CLIP row's time (`rhythm.chroma_track`), for `harmony_track`. With `frame_rate` (the codec's), also
    item["frame_chroma"] [T, 12], the chroma at each token frame (`rhythm.frame_chroma`), for the token chroma table.
    The music is the separate stage's (music_dir/manifest.parquet, the audio the tokens were made from); an item
    whose music is missing or silent stops training with the path and the reason.

    Both systems and every seed of the seed study need the same arrays, and the CQT is the slow part (~0.15 s a clip),
    so each item's arrays are kept in `harmony_cache_dir`, keyed by the music file's sha256, the item's row times and
    frame count, `frame_rate` and HARMONY_CACHE_VERSION: a cached entry holds the very arrays computed here. Missing
    ones are computed in `workers` processes."""
    from pipeline.shards import atomic_write_bytes, sha256_file, stable_hash

    manifest = Path(music_dir) / "manifest.parquet"
    if not manifest.exists():
        raise SystemExit(f"train: harmony needs the music the tokens were made from: {manifest} is missing "
                         "(run `v2m separate`, or set train.harmony_knn: 0 and train.harmony: 0)")
    paths = dict(pd.read_parquet(manifest, columns=["id", "music_path"]).itertuples(index=False))
    cache, by_id, todo = harmony_cache_dir(music_dir), {it["id"]: it for it in items}, []
    for it in items:
        path = paths.get(it["id"])
        if not path or not Path(path).is_file():
            raise SystemExit(f"train: harmony profile of {it['id']}: "
                             + (f"its music {path} is missing" if path else f"{it['id']} is not in {manifest}"))
        times = np.arange(it["clip"].shape[0]) / it["clip_fps"]
        n_frames = int(it["codes"].shape[1])
        key = stable_hash(json.dumps([HARMONY_CACHE_VERSION, sha256_file(path), len(times), float(it["clip_fps"]),
                                      frame_rate, n_frames if frame_rate else None]))
        it["_harmony_key"] = key
        try:
            with np.load(cache / f"{key}.npz") as saved:
                it.update({name: saved[name] for name in saved.files})
        except (OSError, ValueError, KeyError):
            todo.append((it["id"], path, times, frame_rate, n_frames))
    if todo:
        results = _map_jobs(_harmony_job, todo, workers, "harmony profiles")
        for (item_id, path, *_), (_, arrays, error) in zip(todo, results, strict=True):
            if error is not None:
                raise SystemExit(f"train: harmony profile of {item_id} ({path}): {error}")
            it = by_id[item_id]
            it.update(arrays)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            try:
                atomic_write_bytes(cache / f"{it['_harmony_key']}.npz", buffer.getvalue())
            except OSError as exc:  # a read-only data folder: the next run computes them again
                log.warning("harmony cache not written (%s): %s", cache, exc)
                break
        log.info("harmony profiles: %d computed, %d from %s", len(todo), len(items) - len(todo), cache)
    for it in items:
        it.pop("_harmony_key", None)


def _map_jobs(fn, jobs: list, workers: int, desc: str) -> list:
    """[fn(job) for job in jobs] with a progress bar, in `workers` spawned processes when there are enough jobs."""
    from tqdm import tqdm

    if workers <= 1 or len(jobs) < 4 * workers:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="clip", disable=None)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=8), total=len(jobs), desc=desc, unit="clip", disable=None))
