"""Same params and inputs, same bytes on any machine (docs/reproducibility.md).

Another machine differs from this one in its BLAS kernel (OPENBLAS_CORETYPE: Haswell on an AMD EPYC, SkylakeX here),
its thread count and its file mtimes. Each variant runs the real stage in a subprocess, since OpenBLAS reads its
environment once, at load: threads 1 and 2, the core type left to OpenBLAS, forced to Haswell and to a generic
x86-64 one. A float32 product of the same matrices differs in its last bits between these, so before the exact
quantiser the codebooks (and every token) moved with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_video
from tests.test_tokenize import make_music, write_params

BLAS_VARIANTS = (
    {"OPENBLAS_NUM_THREADS": "1"},
    {"OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"},
    {"OPENBLAS_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Haswell"},
    {"OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Prescott"},
)
DATA_STAGES = ("synth", "ingest", "separate", "encoders", "embed", "tokenize")


def tree_digest(*folders: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under the folders."""
    out = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            out[str(path.relative_to(folder.parent))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_v2m(args: list[str], cwd: Path, variant: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")} | variant | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_codec_fit_tokens_and_round_trip_are_the_same_bytes_under_any_blas(tmp_path):
    make_music(tmp_path / "music")
    write_params(tmp_path, melvq={"codebook_size": 64, "kmeans_iters": 6, "griffin_lim_iters": 4})
    outputs = (tmp_path / "tokens", tmp_path / "models", tmp_path / "metrics")
    digests = []
    for variant in BLAS_VARIANTS:
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
        (tmp_path / "codec.png").unlink(missing_ok=True)
        proc = run_v2m(["tokenize", "--params", str(tmp_path / "params.yaml")], tmp_path, variant)
        assert proc.returncode == 1, proc.stderr[-2000:]  # two bad inputs of twelve: recorded, and over the ratio
        digest = tree_digest(*outputs) | {"codec.png": hashlib.sha256((tmp_path / "codec.png").read_bytes())
                                          .hexdigest()}
        assert len(digest) > 10 and any(k.startswith("models/melvq/codebooks") for k in digest)
        digests.append((variant, digest))
    first_variant, first = digests[0]
    for variant, digest in digests[1:]:
        differ = sorted(k for k in first.keys() | digest.keys() if first.get(k) != digest.get(k))
        assert not differ, f"{variant} vs {first_variant}: {differ}"


CLIP_PROBE = """
import hashlib, sys
from pipeline.config import ClipEncoderConfig
from pipeline.encoders.streams import sample_frames
from pipeline.encoders.clip import ClipEncoder, init_seeded
cfg = ClipEncoderConfig()
init_seeded(cfg, 0, sys.argv[2])
frames = sample_frames(sys.argv[1], 2.0)[0]
print(hashlib.sha256(ClipEncoder(cfg, sys.argv[2])(frames).tobytes()).hexdigest())
"""


def test_clip_features_are_the_same_bytes_on_avx2_and_avx512_kernels(tmp_path):
    """torch picks its CPU kernels by instruction set (ATEN_CPU_CAPABILITY forces one): in float32 the embeddings of
    an AVX2 and an AVX-512 machine differ in their last bits; the float64 model rounded to FEATURE_GRID does not."""
    import torch

    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, size="160x120")
    capabilities = [{}, {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}]
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # this CPU has no AVX-512: compare AVX2 with itself
        capabilities[0] = {"OMP_NUM_THREADS": "1"}
    digests = set()
    for variant in capabilities:
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")} | variant
        proc = subprocess.run([sys.executable, "-c", CLIP_PROBE, str(clip), str(tmp_path / "enc")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_ingest_outputs_hold_nothing_of_the_machine(tmp_path):
    """Two checkouts (other paths, other mtimes, other BLAS) ingest the same video to the same bytes; the source's
    mtime, used to skip re-hashing, is in the side cache, outside the DVC output."""
    digests = []
    source = make_video(tmp_path / "tone.mp4", seconds=2.0)
    for name, variant in (("one", BLAS_VARIANTS[0]), ("two", BLAS_VARIANTS[1])):
        root = tmp_path / name
        (root / "videos").mkdir(parents=True)
        shutil.copyfile(source, root / "videos" / "tone.mp4")
        os.utime(root / "videos" / "tone.mp4", ns=(10**18 + len(name), 10**18 + len(name)))
        (root / "manifest.csv").write_text("id,source,start_s,split\ntone,videos/tone.mp4,0,train\n")
        proc = run_v2m(["ingest", "--manifest", "manifest.csv", "--out", "data/ingest"], root, variant)
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = json.loads((root / "data/ingest/rows/tone.json").read_text())
        assert record["status"] == "ok" and not any(k.startswith("_") for k in record)
        assert json.loads((root / "data/.cache/ingest/tone.stat.json").read_text())[1] == 10**18 + len(name)
        digests.append(tree_digest(root / "data" / "ingest"))
    assert digests[0] == digests[1]
    assert {"ingest/clips/tone.mp4", "ingest/audio/tone.wav", "ingest/manifest.parquet"} <= set(digests[0])


def _stage_outs(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


@pytest.mark.slow
def test_a_fresh_copy_rebuilds_the_committed_data_stages(tmp_path):
    """The repo's tracked files, copied as a clone holds them, rebuild synth -> tokenize with another BLAS kernel and
    thread count to exactly the output hashes the committed dvc.lock records (about 12 minutes on 2 cores)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    copy = tmp_path / "v2m"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    env |= {"OPENBLAS_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Haswell", "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    proc = subprocess.run([str(dvc), "repro", "tokenize"], cwd=copy, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rebuilt = yaml.safe_load((copy / "dvc.lock").read_text())
    for stage in DATA_STAGES:
        assert _stage_outs(rebuilt, stage) == _stage_outs(committed, stage), stage
