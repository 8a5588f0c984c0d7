"""separate: data/ingest/audio -> {out}/{id}.wav (the instrumental) + {out}/manifest.parquet. Params: base, separate.

Demucs (`separate.model`, e.g. htdemucs) splits each track into vocals and the rest; we keep the instrumental, computed
as mix - vocals (Demucs' `--two-stems vocals --other-method minus`): whatever Demucs does not call vocals stays, and
the two stems add up to the mix exactly. Audio goes to the model's rate and channels (polyphase resampling), through
`apply_model` with `segment_s`, `overlap` and `shifts` (seeded per id, so reruns give the same bytes), and back to
`base.sample_rate` with the input's channel count. `separate.model: none` passes the audio through (a copy at
`base.sample_rate`): SynthV2M has no vocals, and downstream always reads `music_path`.

Weights are looked up as Demucs does, without downloading: `separate.weights_dir` (a local repo: {model}.yaml +
{sig}.th), then the Hugging Face cache, then the torch hub cache; when none has them the stage stops with a message
that says where it looked and how to provide them.

Bad input never stops the batch: every upstream id gets one row; ids not ok upstream are skipped(upstream_<status>),
an undecodable wav is failed(corrupt), and out-of-memory retries with half the segment, then on the CPU, then is
failed(oom). Each finished id gets {out}/rows/{id}.json after its wav, so reruns redo only new or changed ids.
As in ingest: the out dir is locked for the run, a folder that is not an earlier separate's is refused, and only
recorded outputs are pruned, never all of them unless `--prune-all` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import resample_poly
from tqdm import tqdm

from pipeline.config import BaseConfig, SeparateConfig, load_params
from pipeline.manifest import (
    INGEST_COLUMNS,
    SEPARATE_COLUMNS,
    label_columns,
    owned_out_dir,
    prune,
    read_upstream,
    skipped_upstream,
    upstream_hash,
)
from pipeline.media import write_wav
from pipeline.runtime import resolve_device, set_threads
from pipeline.shards import (
    FAILED,
    OK,
    SKIPPED,
    atomic_path,
    atomic_write_json,
    clean_stale_temps,
    params_hash,
    report_rows,
    sha256_file,
    stable_hash,
    write_manifest,
)

log = logging.getLogger(__name__)

VERSION = 1  # bump when the processing changes, so every id is separated again
RETRY_ON_RERUN = {"oom", "error"}


class Failure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------------------------------ weights
def find_weights(name: str, weights_dir: str | None) -> tuple[str, list[Path]]:
    """Where the weights of Demucs model `name` are: ("local" | "hf" | "torch_hub", files). Loads nothing.

    Raises SystemExit with every place it looked and how to provide the weights.
    """
    import torch
    from demucs.pretrained import REMOTE_ROOT

    looked = []
    if weights_dir:
        repo = Path(weights_dir).expanduser()
        files = _local_repo_files(repo, name) if repo.is_dir() else None
        if files:
            return "local", files
        looked.append(f"separate.weights_dir {repo}: " + ("no such folder" if not repo.is_dir() else
                                                         f"no {name}.yaml (+ its .th files) or {name}.th"))
    else:
        looked.append("separate.weights_dir: not set")
    hf = _hf_cache_files(name)
    if hf[1]:
        return "hf", hf[1]
    looked.append(f"Hugging Face cache {hf[0]}: not there")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    names = _torch_hub_names(name)
    if names and all((hub / n).is_file() for n in names):
        return "torch_hub", [REMOTE_ROOT / f"{name}.yaml", *(hub / n for n in names)]
    looked.append(f"torch hub cache {hub}: " + (f"no {', '.join(names)}" if names else f"{name!r} is not a "
                                                                                       "published Demucs model"))
    raise SystemExit(
        f"separate: no weights for Demucs model {name!r} (nothing is downloaded during the pipeline). Looked in:\n"
        + "".join(f"  - {where}\n" for where in looked)
        + "Provide them in one of these ways:\n"
        f"  - on a machine with internet, run python -c \"from demucs.pretrained import get_model; "
        f"get_model('{name}')\" and copy its Hugging Face cache ($HF_HOME/hub) here;\n"
        f"  - or put {name}.yaml (from the demucs package, demucs/remote/) and its .th files (listed in "
        "demucs/remote/files.txt, under https://dl.fbaipublicfiles.com/demucs/) in a folder and set "
        "separate.weights_dir to it;\n"
        "  - or set separate.model: none to pass the audio through unchanged."
    )


def _local_repo_files(repo: Path, name: str) -> list[Path] | None:
    import yaml
    from demucs.repo import LocalRepo

    models = LocalRepo(repo).list_model()
    if (repo / f"{name}.yaml").is_file():
        sigs = yaml.safe_load((repo / f"{name}.yaml").read_text())["models"]
        if all(sig in models for sig in sigs):
            return [repo / f"{name}.yaml", *(Path(models[sig]) for sig in sigs)]
        return None
    return [Path(models[name])] if name in models else None


def _hf_cache_files(name: str) -> tuple[str, list[Path]]:
    import yaml
    from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name
    from huggingface_hub import constants, try_to_load_from_cache

    namespace, short = name.split("/", 1) if "/" in name else (DEFAULT_NAMESPACE, name)
    repo_id = f"{namespace}/{hf_repo_name(short)}"
    where = f"{constants.HF_HUB_CACHE} ({repo_id})"
    bag = try_to_load_from_cache(repo_id, f"{short}.yaml")
    if not isinstance(bag, str):
        return where, []
    files = [Path(bag)]
    for sig in yaml.safe_load(Path(bag).read_text())["models"]:
        path = try_to_load_from_cache(repo_id, f"{sig}.safetensors")
        if not isinstance(path, str):
            return where, []
        files.append(Path(path))
    return where, files


def _torch_hub_names(name: str) -> list[str]:
    import yaml
    from demucs.pretrained import REMOTE_ROOT

    urls = {}
    for line in (REMOTE_ROOT / "files.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "root:")):
            urls[line.split("-", 1)[0]] = line
    bag = REMOTE_ROOT / f"{name}.yaml"
    sigs = yaml.safe_load(bag.read_text())["models"] if bag.is_file() else [name]
    return [urls[s] for s in sigs] if all(s in urls for s in sigs) else []


def load_model(name: str, kind: str, files: list[Path]):
    """Load a Demucs model (a BagOfModels or one model) from the files `find_weights` found, in eval mode.

    Raises SystemExit naming the files when they do not load (truncated, or not a Demucs model)."""
    try:
        return _load_model(name, kind, files)
    except Exception as exc:  # noqa: BLE001 - torch, yaml and demucs raise many kinds: one message naming the files
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SystemExit(f"separate: the weights of Demucs model {name!r} do not load from "
                         f"{', '.join(str(f) for f in files)}: {type(exc).__name__}: {first}. The file is truncated "
                         f"or not a {name} checkpoint (a Demucs package: klass, args, kwargs, state); download it "
                         "again (docs/real-data.md#demucs-separate).") from None


def _load_model(name: str, kind: str, files: list[Path]):
    import yaml
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model
    from demucs.states import load_model as load_package

    if kind == "local":
        return get_model(name, repo=files[0].parent)
    bag = yaml.safe_load(files[0].read_text())
    if kind == "hf":
        from demucs.hf import load_safetensors_model

        models = [load_safetensors_model(p) for p in files[1:]]
    else:
        models = [load_package(p) for p in files[1:]]
    return BagOfModels(models, bag.get("weights"), bag.get("segment")).eval()


# --------------------------------------------------------------------------------------------------------- separation
def _apply(model, mix, **kwargs):
    """demucs.apply.apply_model, kept behind a name so tests can make it run out of memory."""
    from demucs.apply import apply_model

    return apply_model(model, mix, **kwargs)


def _resample(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return audio
    g = math.gcd(src, dst)
    return resample_poly(audio, dst // g, src // g, axis=-1).astype(np.float32)


def max_segment(model) -> float:
    """The longest chunk the model takes (HTDemucs cannot go beyond its training segment)."""
    if hasattr(model, "max_allowed_segment"):
        return float(model.max_allowed_segment)
    return float(getattr(model, "segment", Fraction(39, 5)))


def split_vocals(model, mix: np.ndarray, sample_rate: int, segment: float, overlap: float, shifts: int,
                 device: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split [C, N] audio at `sample_rate` into (vocals, instrumental), both [C, N] at that rate, summing to `mix`."""
    import torch

    wav = torch.from_numpy(_resample(mix, sample_rate, model.samplerate))
    if wav.shape[0] != model.audio_channels:  # as Demucs does: mono is duplicated, other layouts are averaged
        wav = wav.mean(0, keepdim=True).expand(model.audio_channels, -1)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8  # Demucs' own input normalisation
    random.seed(seed)  # shifts draw their offsets from `random`
    torch.manual_seed(seed)
    with torch.no_grad():
        sources = _apply(model, ((wav - mean) / std)[None], shifts=shifts, split=True, overlap=overlap,
                         segment=segment, device=device, progress=False)[0]  # (S, C, N)
    vocals = (sources[model.sources.index("vocals")] * std + mean).cpu().numpy()
    vocals = vocals.mean(0, keepdims=True) if mix.shape[0] == 1 else vocals[: mix.shape[0]]
    vocals = _resample(vocals, model.samplerate, sample_rate)
    vocals = np.pad(vocals, ((0, 0), (0, max(0, mix.shape[1] - vocals.shape[1]))))[:, : mix.shape[1]]
    return vocals, mix - vocals


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def separate_with_fallback(model, mix, sample_rate, cfg: SeparateConfig, device: str, seed: int):
    """`split_vocals`, retried on out-of-memory with half the segment, then on the CPU. Returns (stems, device, seg)."""
    import torch

    segment = min(cfg.segment_s or max_segment(model), max_segment(model))
    plans = [(device, segment), (device, segment / 2)] + ([("cpu", segment / 2)] if device != "cpu" else [])
    for attempt, (dev, seg) in enumerate(plans):
        try:
            return split_vocals(model, mix, sample_rate, seg, cfg.overlap, cfg.shifts, dev, seed), dev, seg
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if attempt + 1 < len(plans):
                log.warning("out of memory on %s with %.2f s segments; retrying on %s with %.2f s", dev, seg,
                            *plans[attempt + 1])
    raise Failure("oom", f"out of memory even on {plans[-1][0]} with {plans[-1][1]:.2f} s segments")


# -------------------------------------------------------------------------------------------------------------- stage
class Separator:
    def __init__(self, base: BaseConfig, cfg: SeparateConfig, out_dir: Path):
        self.base, self.cfg, self.out = base, cfg, out_dir
        self.device = resolve_device(cfg.device)
        self.model = None
        identity: dict = {"model": cfg.model, "sample_rate": base.sample_rate, "version": VERSION}
        if cfg.model != "none":
            self.kind, self.files = find_weights(cfg.model, cfg.weights_dir)
            identity.update(weights=[sha256_file(p) for p in self.files], segment_s=cfg.segment_s,
                            overlap=cfg.overlap, shifts=cfg.shifts, seed=base.seed)
        self.phash = params_hash(identity)
        for sub in ("", "rows"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir / sub)

    def record_path(self, item_id: str) -> Path:
        return self.out / "rows" / f"{item_id}.json"

    def previous(self, item_id: str, source_hash: str) -> dict | None:
        try:
            rec = json.loads(self.record_path(item_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("source_hash") != source_hash or rec.get("params_hash") != self.phash:
            return None
        if rec["status"] == FAILED and rec["reason"] in RETRY_ON_RERUN:
            return None
        return rec if rec["status"] != OK or Path(rec["music_path"]).exists() else None

    def process(self, row: dict, source_hash: str) -> dict:
        """Separate one ok upstream row; always returns its record (never raises for bad audio)."""
        rec = {"id": row["id"], "split": row["split"], "source_hash": source_hash, "params_hash": self.phash}
        out = self.out / f"{row['id']}.wav"
        try:
            rec.update(self._separate(Path(row["audio_path"]), out))
            rec.update(status=OK, reason="", error="", music_path=str(out))
        except Failure as exc:
            rec.update(status=FAILED, reason=exc.reason, error=str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch; recorded, retried on rerun
            log.exception("%s: unexpected error", row["id"])
            rec.update(status=FAILED, reason="error", error=f"{type(exc).__name__}: {exc}"[:500])
        atomic_write_json(self.record_path(row["id"]), rec)
        return rec

    def _separate(self, src: Path, out: Path) -> dict:
        try:
            info = sf.info(str(src))
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise Failure("corrupt", f"{src}: cannot be read as audio ({exc})") from None
        if self.cfg.model == "none" and info.samplerate == self.base.sample_rate:
            with atomic_path(out) as tmp:
                shutil.copyfile(src, tmp)  # already at the target rate: a byte copy
            return dict(duration_s=round(info.frames / info.samplerate, 6), sample_rate=info.samplerate,
                        channels=info.channels, device="", segment_s=0.0)
        try:
            data, rate = sf.read(str(src), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise Failure("corrupt", f"{src}: cannot be decoded ({exc})") from None
        mix = _resample(data.T, rate, self.base.sample_rate)  # (C, N)
        device, segment = "", 0.0
        if self.cfg.model != "none":
            if self.model is None:
                self.model = load_model(self.cfg.model, self.kind, self.files)
                log.info("separate: Demucs %s from %s on %s", self.cfg.model, self.files[0].parent, self.device)
            seed = int(stable_hash(f"{self.base.seed}:{src.stem}", 8), 16)
            (_, mix), device, segment = separate_with_fallback(self.model, mix, self.base.sample_rate, self.cfg,
                                                               self.device, seed)
        if not np.isfinite(mix).all():
            raise Failure("error", f"{src}: the separated audio is not finite")
        write_wav(out, mix, self.base.sample_rate)
        return dict(duration_s=round(mix.shape[1] / self.base.sample_rate, 6), sample_rate=self.base.sample_rate,
                    channels=mix.shape[0], device=device, segment_s=round(segment, 4))


def run(ingest_manifest: Path, out_dir: Path, base: BaseConfig, cfg: SeparateConfig,
        prune_all: bool = False) -> tuple[pd.DataFrame, int]:
    """Separate every ok row of `ingest_manifest`; returns (the written manifest, number of ids actually processed).
    `prune_all`: an upstream with nothing usable empties out_dir (else it is refused)."""
    upstream = read_upstream(ingest_manifest, "separate", "ingest")
    with owned_out_dir(out_dir, "separate"):
        return _run_locked(ingest_manifest, upstream, out_dir, base, cfg, prune_all)


def _run_locked(ingest_manifest: Path, upstream: pd.DataFrame, out_dir: Path, base: BaseConfig, cfg: SeparateConfig,
                prune_all: bool) -> tuple[pd.DataFrame, int]:
    labels = label_columns(upstream, INGEST_COLUMNS)
    set_threads(cfg.threads)
    separator = Separator(base, cfg, out_dir)
    rows, processed = [], 0
    todo = upstream[upstream["status"] == OK]
    bar = tqdm(total=len(todo), desc=f"separate ({cfg.model})", unit="track", disable=None)
    for row in upstream.to_dict("records"):
        rec: dict = {"id": row["id"], "split": row["split"]}
        if row["status"] != OK:
            rec.update(skipped_upstream(row, "ingest"))
        elif not row.get("audio_path"):
            rec.update(status=SKIPPED, reason="no_audio", error=f"{row['id']}: ingested without audio")
            bar.update()
        else:
            source_hash = upstream_hash(row, "audio_path")
            rec = separator.previous(row["id"], source_hash)
            if rec is None:
                rec, processed = separator.process(row, source_hash), processed + 1
            bar.update()
        rows.append({**{c: row.get(c) for c in labels}, **rec, "split": row["split"]})  # a reused record's may be stale
    bar.close()
    prune(out_dir, ("{id}.wav",), {r["id"] for r in rows if r["status"] != SKIPPED}, "separate", ingest_manifest,
          prune_all)
    return write_manifest(out_dir / "manifest.parquet", rows, columns=SEPARATE_COLUMNS + labels), processed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m separate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--ingest", help="ingest manifest (default: {ingest.out_dir}/manifest.parquet)")
    parser.add_argument("--out", help="output folder (default: separate.out_dir)")
    parser.add_argument("--prune-all", action="store_true", help="let an upstream with nothing usable remove every "
                        "earlier output (refused without it)")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    cfg = params.separate
    out_dir = Path(args.out or cfg.out_dir)
    frame, processed = run(Path(args.ingest or Path(params.ingest.out_dir) / "manifest.parquet"), out_dir,
                           params.base, cfg, args.prune_all)
    print(f"separate: {len(frame)} rows, {processed} processed, the rest unchanged since the last run -> {out_dir}")
    return report_rows("separate", frame, cfg.max_fail_ratio)


if __name__ == "__main__":
    sys.exit(main())
