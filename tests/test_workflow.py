"""The team workflow with real git and DVC in temporary repos, on a tiny SynthV2M profile.

Teammate A runs the pipeline and `dvc push`es to a local-directory remote; teammate B clones, `dvc pull`s, and
`dvc repro` reruns nothing; B changes `train.lr` and only train and the stages after it rerun, on the pulled
features. The default suite runs this up to `train_report` (~1 min of compute on 2 cores); the slow suite runs it on
the whole pipeline, whatever stages dvc.yaml has by then. `dvc exp run -S` and `dvc exp show` (a queued sweep: slow)
on A's repo. The scale-out commands of docs/team-workflow.md (torchrun with 2 CPU processes, scripts/torchrun_stage.sh,
scripts/slurm/v2m.sbatch with stand-in srun and scontrol, then `dvc commit`) on the pipeline's own outputs (slow).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import Params, deep_merge, to_dict
from pipeline.shards import load_features
from tests.test_dvc import TINY, mtimes, sh, write_params

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def known(overlay: dict, defaults: dict) -> dict:
    """The overlay's keys that params.yaml has (stages still being written may not have their section yet)."""
    return {k: known(v, defaults[k]) if isinstance(v, dict) else v for k, v in overlay.items() if k in defaults}


# `dvc repro` up to train_report in ~40 s on 2 idle cores: 6 clips of 2 s, a tiny melvq fit, 4 debug-model steps.
TEAM = known(deep_merge(TINY, {
    "synth": {"n_train": 4},
    "embed": {"num_shards": 2, "report_clips": 1},
    "tokenize": {"num_shards": 2, "threads": 1, "eval_max_clips": 1, "real_music_dir": "no-real-music",
                 "melvq": {"codebook_size": 16, "kmeans_iters": 3, "griffin_lim_iters": 2, "fit_frames": 2048}},
    "train": {"preset": "debug", "max_steps": 4, "batch_size": 2, "ckpt_every": 4, "log_every": 1, "beat_clips": 0,
              "warmup_steps": 1},
    "generate": {"max_clips": 1, "prompt_seconds": 0.5, "crossfade_seconds": 0.25},  # 2 s clips
    "evaluate": {"bootstrap": 20, "workers": 1, "example_clips": 1,
                 "tagger": {"epochs": 2, "crop_s": 1.0, "embed_hop_s": 0.5, "batch_size": 4}},
}), to_dict(Params()))
UPSTREAM_OF_TRAIN = {"synth", "ingest", "separate", "encoders", "embed", "tokenize"}
OUTPUTS = ("data", "models")  # every cached output of the pipeline lives under these


def git_identity(repo: Path) -> None:
    sh(repo, "git", "config", "user.name", "v2m test")
    sh(repo, "git", "config", "user.email", "v2m-test@example.invalid")


def copy_checkout(dst: Path) -> None:
    """The files of this checkout that git tracks or would (not ignored), as in the working tree: a clone's content."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the workflow tests copy the tracked files")
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    """Stages `dvc repro` / `dvc exp run` ran, from its "Running stage 'X':" lines."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def dag(repo: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """Stages and edges (before, after) of `dvc dag --dot`."""
    dot = sh(repo, "dvc", "dag", "--dot").stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    return set(re.findall(r'^"([^"]+)";$', dot, re.M)) | {x for e in edges for x in e}, edges


def closure(start: set[str], edges: list[tuple[str, str]]) -> set[str]:
    """`start` and every stage reachable from it along `edges`."""
    found, grew = set(start), True
    while grew:
        grew = False
        for before, after in edges:
            if before in found and after not in found:
                found.add(after)
                grew = True
    return found


def downstream(repo: Path, stages: set[str]) -> set[str]:
    """`stages` and every stage after them (so generate, evaluate, ... count once they exist)."""
    return closure(stages, dag(repo)[1])


def in_scope(repo: Path, *targets: str) -> set[str]:
    """The stages `dvc repro TARGETS` covers: the targets and all they depend on; every stage without targets."""
    stages, edges = dag(repo)
    return closure(set(targets), [(b, a) for a, b in edges]) if targets else stages


def changed(repo: Path, *targets: str) -> set[str]:
    """Stages `dvc status --with-deps TARGETS` reports changed (all of them without targets)."""
    return set(json.loads(sh(repo, "dvc", "status", "--json", "--with-deps", *targets).stdout or "{}"))


def stage_outputs(repo: Path, stages: set[str]) -> dict[str, int]:
    """mtimes of every file the given stages output (paths from dvc.lock)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    paths = {o["path"] for name in stages & set(lock) for o in lock[name].get("outs", [])}
    found: dict[str, int] = {}
    for path in sorted(paths):
        found.update(mtimes(repo / path) if (repo / path).is_dir() else {path: (repo / path).stat().st_mtime_ns})
    return found


def teammate_a(root: Path, *targets: str) -> Path:
    """Teammate A: a repo from this checkout on the tiny profile, `dvc repro TARGETS`, `dvc push` to a
    local-directory remote (root/remote), and a commit of dvc.lock, the metrics and the remote's config."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    a = root / "a"
    a.mkdir()
    copy_checkout(a)
    write_params(a / "params.yaml", TEAM)
    sh(a, "git", "init", "-q")
    git_identity(a)
    if not (a / ".dvc").is_dir():
        sh(a, "dvc", "init", "-q")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "tiny profile")
    sh(a, "dvc", "repro", *targets)
    sh(a, "dvc", "remote", "add", "--default", "--force", "shared", str(root / "remote"))
    pushed = sh(a, "dvc", "push", "--with-deps", *targets)
    assert re.search(r"\d+ files? pushed", pushed.stdout), pushed.stdout
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "pipeline run: dvc.lock, metrics, remote")
    assert changed(a, *targets) == set()
    return a


def teammate_b(root: Path, a: Path, *targets: str) -> None:
    """Teammate B: clone A, `dvc pull`, nothing reruns; then `train.lr` changes and only train and what follows
    (within `targets`) reruns, on the pulled features."""
    b = root / "b"
    sh(root, "git", "clone", "-q", str(a), str(b))
    git_identity(b)
    sh(b, "dvc", "pull", "--with-deps", *targets)
    for out in ("data/ingest/manifest.parquet", "data/music/manifest.parquet", "data/features/manifest.parquet",
                "data/tokens/melvq/manifest.parquet", "models/codecs/melvq", "models/full/v2m.pt",
                "models/no_motion/v2m.pt"):
        assert (b / out).exists(), f"{out} was not pulled"  # persist: true outputs are cached and pushed too
    assert changed(b, *targets) == set()
    assert sh(b, "dvc", "status", "--cloud", "--with-deps", "--json", *targets).stdout.strip() in ("", "{}")

    before = {k: v for folder in OUTPUTS for k, v in mtimes(b / folder).items()}
    proc = sh(b, "dvc", "repro", *targets)
    assert ran(proc) == set() and "Data and pipelines are up to date" in proc.stdout, proc.stdout
    assert {k: v for folder in OUTPUTS for k, v in mtimes(b / folder).items()} == before

    write_params(b / "params.yaml", deep_merge(TEAM, {"train": {"lr": 1e-3}}))
    direct = changed(b, *targets)
    assert {"train@full", "train@no_motion"} <= direct and not direct & UPSTREAM_OF_TRAIN
    expected = downstream(b, direct) & in_scope(b, *targets)
    assert "train_report" in expected
    upstream_before = stage_outputs(b, UPSTREAM_OF_TRAIN)
    proc = sh(b, "dvc", "repro", *targets)
    assert ran(proc) == expected, proc.stdout
    assert stage_outputs(b, UPSTREAM_OF_TRAIN) == upstream_before  # the pulled clips, features and tokens, as they were
    assert changed(b, *targets) == set()


TARGET = "train_report"  # the default run stops here; the whole pipeline (generate, evaluate, ...) is a slow test


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("team")
    return {"root": root, "a": teammate_a(root, TARGET)}


def test_teammate_pulls_reruns_nothing_then_a_train_param_reruns_train_onward(team):
    teammate_b(team["root"], team["a"], TARGET)


@pytest.mark.slow
def test_whole_pipeline_shared_through_a_remote(tmp_path):
    teammate_b(tmp_path, teammate_a(tmp_path))


def test_exp_run_sets_a_param_and_exp_show_lists_its_metrics(team):
    a = team["a"]
    proc = sh(a, "dvc", "exp", "run", "-S", "train.lr=0.01", "train@full")  # one system keeps the test short
    assert ran(proc) == {"train@full"}, proc.stdout
    table = json.loads(sh(a, "dvc", "exp", "show", "--json").stdout)
    runs = [rev for row in table for exp in row.get("experiments") or [] for rev in exp["revs"]]
    assert runs, table
    params = runs[0]["data"]["params"]["params.yaml"]["data"]
    assert params["train"]["lr"] == 0.01
    metrics = runs[0]["data"]["metrics"]["metrics/train/full.json"]["data"]["full"]
    assert metrics["steps"] == TEAM["train"]["max_steps"] and np.isfinite(metrics["val_loss"])
    csv = sh(a, "dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "Experiment|train.lr").stdout
    assert "0.01" in csv and "0.003" in csv  # the experiment beside the commit it started from
    sh(a, "git", "checkout", "-q", "--", ".")  # back to the committed run, for the other tests of the module
    sh(a, "dvc", "checkout", "--force", "-q", "--with-deps", TARGET)  # dvc.lock may list later stages not run here
    assert changed(a, TARGET) == set()


@pytest.mark.slow
def test_exp_queue_sweep_runs_every_value(team):
    a = team["a"]
    sh(a, "dvc", "exp", "run", "--queue", "-S", "train.lr=0.02,0.03", TARGET)
    sh(a, "dvc", "exp", "run", "--run-all", "--jobs", "1")
    table = json.loads(sh(a, "dvc", "exp", "show", "--json").stdout)
    lrs = {rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
           for row in table for exp in row.get("experiments") or [] for rev in exp["revs"]
           if "metrics/train.json" in (rev["data"].get("metrics") or {})}  # with the two systems merged
    assert {0.02, 0.03} <= lrs


def torchrun(cwd: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ...` as docs/team-workflow.md documents it (one node, CPU: gloo)."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed beside this python")
    return sh(cwd, str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *args)


@pytest.mark.slow
def test_torchrun_tokenize_with_two_processes_writes_the_stage_tokens(team, tmp_path):
    """The tokenize stage's own outputs, rebuilt from cold by 2 torchrun processes (rank 0 fits, rank 1 waits)."""
    a = team["a"]
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["tokenize"].update(out_dir=str(tmp_path / "tokens"), model_dir=str(tmp_path / "codecs"),
                              metrics_path=str(tmp_path / "codec.json"), figure_path=str(tmp_path / "codec.png"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = torchrun(a, "-m", "pipeline.tokenize", "--params", str(tmp_path / "params.yaml"))
    assert "rank 0/2" in proc.stdout + proc.stderr and "rank 1/2" in proc.stdout + proc.stderr
    one, two = load_features(a / "data/tokens/melvq"), load_features(tmp_path / "tokens/melvq")
    assert set(one) == set(two) and len(one) == 6 and all(np.array_equal(one[i], two[i]) for i in one)
    stage, ranks = (pd.read_parquet(p / "melvq/manifest.parquet") for p in (a / "data/tokens", tmp_path / "tokens"))
    assert stage[["id", "status", "shard", "n_frames"]].equals(ranks[["id", "status", "shard", "n_frames"]])
    assert changed(a, "tokenize") == set()  # nothing of the stage's was touched


def fake_slurm(repo: Path, bin_dir: Path) -> dict[str, str]:
    """One-node stand-ins for `scontrol` and `srun` (srun drops its options and runs the command), and the job's env."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do [[ $1 == *=* ]] && shift || shift 2; done\n'
                                  'exec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    (repo / ".venv").symlink_to(Path(sys.executable).parents[1])  # the script sources .venv/bin/activate
    return {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(repo),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_CPUS_PER_TASK": "2", "V2M_NPROC_PER_NODE": "2", "V2M_RDZV_PORT": str(free_port())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_scale_out_commands_then_dvc_commit(team, tmp_path):
    """docs/team-workflow.md, "Scale-out": each stage's command under torchrun (raw, through
    scripts/torchrun_stage.sh, through scripts/slurm/v2m.sbatch with stand-in srun/scontrol), `dvc commit`, and
    `dvc repro` goes on after them."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed beside this python")
    repo = tmp_path / "repo"
    shutil.copytree(team["a"], repo, symlinks=True)
    sh(repo, "git", "checkout", "-q", "--", ".")
    sh(repo, "dvc", "checkout", "--force", "-q", "--with-deps", TARGET)
    write_params(repo / "params.yaml", deep_merge(TEAM, {"embed": {"flow_fps": 4.0},
                                                         "tokenize": {"melvq": {"griffin_lim_iters": 3}}}))
    assert changed(repo, TARGET) == {"embed", "tokenize"}
    env = {**os.environ, "NPROC": "2", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["scripts/torchrun_stage.sh", "embed"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1/2" in proc.stdout  # and embed committed by the script: what is stale is tokenize, and train
    assert changed(repo, TARGET) == {"tokenize", "train@full", "train@no_motion"}  # since the features changed
    assert set(pd.read_parquet(repo / "data/features/manifest.parquet")["flow_fps"]) == {4.0}
    torchrun(repo, "-m", "pipeline.tokenize")
    sh(repo, "dvc", "commit", "--force", "tokenize")
    assert changed(repo, TARGET) == {"train@full", "train@no_motion"}

    proc = subprocess.run(["bash", "scripts/slurm/v2m.sbatch", "train@full"], cwd=repo, capture_output=True,
                          text=True, env={**env, **fake_slurm(repo, tmp_path / "bin")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout + proc.stderr and "files pushed" in proc.stdout  # to the team's remote
    assert changed(repo, TARGET) == {"train@no_motion", "train_report"}
    torchrun(repo, "--no-python", "v2m", "train", "--system", "no_motion")
    sh(repo, "dvc", "commit", "--force", "train@no_motion")
    assert ran(sh(repo, "dvc", "repro", TARGET)) == {"train_report"}
    assert changed(repo, TARGET) == set()
