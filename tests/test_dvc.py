"""The DVC pipeline for real, in a temporary git repo: repro, a no-op rerun, and a param change that reruns only
what depends on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import Params, deep_merge, to_dict

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "base": {"clip_seconds": 2.0, "fps": 12, "sample_rate": 16000},
    "synth": {"n_train": 2, "n_val": 1, "n_test": 1, "width": 96, "height": 96, "preview_clips": 1},
    "ingest": {"short_side": 64},
}


def sh(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's v2m and dvc
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_params(path: Path, overlay: dict) -> None:
    path.write_text(yaml.safe_dump(deep_merge(to_dict(Params()), overlay), sort_keys=False))


TARGET = "ingest"  # this test covers synth -> ingest; later stages have tests of their own


def stage_status(repo: Path) -> set[str]:
    """Names of the stages up to ingest that DVC considers changed (from `dvc status --json`)."""
    return set(json.loads(sh(repo, "dvc", "status", TARGET, "--json").stdout or "{}"))


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root / "params.yaml", TINY)
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    return root


def test_repro_twice_then_an_ingest_param_reruns_ingest_only(repo):
    sh(repo, "dvc", "repro", TARGET)
    manifest = pd.read_parquet(repo / "data/ingest/manifest.parquet")
    assert list(manifest["status"]) == ["ok"] * 4 and set(manifest["height"]) == {64}
    assert (repo / "reports/synth_preview.png").stat().st_size > 0
    assert stage_status(repo) == set()
    synth_before, ingest_before = mtimes(repo / "data/raw/synth"), mtimes(repo / "data/ingest")
    sh(repo, "dvc", "repro", TARGET)  # nothing to do
    assert mtimes(repo / "data/raw/synth") == synth_before and mtimes(repo / "data/ingest") == ingest_before

    write_params(repo / "params.yaml", deep_merge(TINY, {"ingest": {"short_side": 48}}))
    assert stage_status(repo) == {"ingest"}
    sh(repo, "dvc", "repro", TARGET)
    assert mtimes(repo / "data/raw/synth") == synth_before  # synth did not rerun
    manifest = pd.read_parquet(repo / "data/ingest/manifest.parquet")
    assert set(manifest["height"]) == {48}
    assert stage_status(repo) == set()
