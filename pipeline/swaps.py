"""Timbre swaps: each SynthV2M train clip's score played on the other instruments, as codec tokens.

    v2m swaps [--params params.yaml] [--out DIR]

What the text-steered system (`train --system text`, docs/baselines.md "Text steering") learns from. In SynthV2M the
scene always shows the instrument it plays (a star is a piano), so a caption that names the instrument says nothing
the video does not, and a decoder trained on the clips alone learns to take the timbre from the scene: asked for
another instrument, it plays the scene's. A swap is the same score (tempo, beats, chords, melody) rendered with
another instrument by `synth.render_audio`, under the same video; with the caption naming that instrument, the
caption is the only thing that tells the timbre, so the decoder learns to follow it.

Output ({ablations.swaps_dir}, a DVC output): `{id}.npz`, one int16 array of codes [K, T] per other instrument, named
after it, encoded by the tokenize stage's codec; `manifest.csv`, one row per train clip of the synth manifest: ok, or
failed with the reason (a clip whose spec no longer renders to its manifest's spec_hash, a codec error). Each file is
written atomically (`dataset.load_swaps` reads them), and a rerun redoes only clips whose file is missing or was made
from another spec or codec.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import synth
from pipeline.config import Params, load_params
from pipeline.shards import atomic_write_bytes, stable_hash, write_manifest

log = logging.getLogger(__name__)

COLUMNS = ["id", "status", "reason", "instruments"]
_CODEC: dict = {}  # the codec, loaded once per worker process


def other_instruments(instrument: str) -> list[str]:
    """The instruments a clip of `instrument` is swapped to, in SynthV2M's order."""
    return [i for i in synth.INSTRUMENT_SHAPES if i != instrument]


def _key(spec_hash: str, codec_hash: str) -> str:
    return stable_hash(json.dumps([spec_hash, codec_hash]))


def _job(job: tuple) -> dict:
    """One clip: render its score with each other instrument and encode it -> its manifest row. Top level: it runs in
    worker processes."""
    params, clip_id, want_hash, out = job
    import torch

    from pipeline import codecs

    torch.set_num_threads(1)
    row = {"id": clip_id, "status": "failed", "reason": "", "instruments": ""}
    try:
        codec = _CODEC.get("codec") or _CODEC.setdefault("codec", codecs.load_codec(params.tokenize.codec,
                                                                                     params.tokenize))
        index = int(clip_id.rsplit("_", 1)[-1])
        spec = synth.make_spec(params.base.seed, index, params.synth, params.base)
        got = synth.spec_hash(spec, params.base.fps, params.synth.width, params.synth.height,
                              params.base.sample_rate, params.synth)
        if spec.id != clip_id or got != want_hash:
            row["reason"] = (f"spec_mismatch: {clip_id} does not render from these params (spec_hash {got}, the "
                             f"manifest says {want_hash}); rerun `v2m synth` with them")
            return row
        key = _key(got, codec.state_hash())
        path = out / f"{clip_id}.npz"
        others = other_instruments(spec.instrument)
        if not _is_done(path, key):
            arrays = {"key": np.array(key)}
            for instrument in others:
                audio = synth.render_audio(dataclasses.replace(spec, instrument=instrument), params.base.sample_rate)
                arrays[instrument] = codec.encode(audio).astype(np.int16)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            atomic_write_bytes(path, buffer.getvalue())
        row.update(status="ok", instruments=" ".join(others))
    except ValueError as exc:  # an id that is not synth_NNNNN
        row["reason"] = f"not_synth: {exc}"
    except Exception as exc:  # noqa: BLE001 - one bad clip is a failed row; the rest go on
        row["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def _is_done(path: Path, key: str) -> bool:
    try:
        with np.load(path) as saved:
            return str(saved["key"]) == key
    except (OSError, ValueError, KeyError):
        return False


def run(params: Params, out: Path, workers: int = 1) -> pd.DataFrame:
    """Render and encode the swaps of every train clip of the synth manifest into `out`; returns the manifest."""
    from pipeline import codecs

    manifest = Path(params.synth.manifest)
    if not manifest.exists():
        raise SystemExit(f"v2m swaps: {manifest} is missing; run `v2m synth` (the swaps are SynthV2M's)")
    try:
        codecs.load_codec(params.tokenize.codec, params.tokenize)
    except Exception as exc:  # noqa: BLE001 - not fitted: say what to run
        raise SystemExit(f"v2m swaps: the tokenize stage's codec is not there ({exc}); run `dvc repro tokenize`"
                         ) from None
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    rows = frame[frame["split"] == "train"]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(params, r["id"], r["spec_hash"], out) for r in rows.to_dict("records")]
    if workers > 1 and len(jobs) >= 2 * workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = list(tqdm(pool.map(_job, jobs, chunksize=4), total=len(jobs), desc="swaps", unit="clip",
                               disable=None))
    else:
        result = [_job(j) for j in tqdm(jobs, desc="swaps", unit="clip", disable=None)]
    table = write_manifest(out / "manifest.csv", result, COLUMNS)
    failed = table[table["status"] != "ok"]
    for r in failed.to_dict("records"):
        log.error("swaps %s: %s", r["id"], r["reason"])
    log.info("swaps: %d clips ok, %d failed -> %s", len(table) - len(failed), len(failed), out)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m swaps", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", help="output folder (default: ablations.swaps_dir)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    table = run(params, Path(args.out or params.ablations.swaps_dir), params.ablations.swap_workers)
    return 0 if (table["status"] == "ok").any() else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    sys.exit(main())
