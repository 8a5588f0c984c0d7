"""`make demo` stage by stage: wall time, CPU time and peak memory of each DVC stage on a fresh copy, a second
`dvc repro` that has nothing to do, and the cost of adding one video.

    python benchmarks/demo_stages.py [--out results/demo_stages.json] [--install] [--keep DIR] [--params Y] [--no-add]

A fresh copy of this checkout (the files git tracks or would track, as in the working tree: what a clone holds) goes
into a scratch git repo, and each stage of `dvc repro` runs in pipeline order as `dvc repro --single-item STAGE`,
under a poller that sums the resident memory of the whole process tree (dvc and the stage's processes) every 0.1 s.
CPU time is the tree's user + system time. Then `dvc repro` again (nothing to do), and one more SynthV2M test clip
(`synth.n_test` + 1) through `dvc repro embed tokenize` (every data stage; training has to start over when the data
change, so it is not part of an incremental add): which stages ran, their wall time, and the ratio to the same
stages' cold time. `--install` first runs the Makefile's `make venv` in the copy (a fresh .venv: pip, torch, ...) and
times it apart; the stages then use that venv. Without it they use the venv of this python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "demo_stages.json"


def copy_checkout(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the checkout, as they are in the working tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)


class PeakMemory:
    """Polls the summed RSS of a process and its descendants, and the largest single process, until stopped."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.root, self.every_s = psutil.Process(pid), every_s
        self.peak_tree = self.peak_process = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = []
            for proc in procs:
                try:
                    rss.append(proc.memory_info().rss)
                except psutil.Error:
                    pass
            if rss:
                self.peak_tree, self.peak_process = max(self.peak_tree, sum(rss)), max(self.peak_process, max(rss))
            self._stop.wait(self.every_s)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return round(self.peak_tree / 2**20, 1), round(self.peak_process / 2**20, 1)


def run(cmd: list[str], cwd: Path, env: dict, log) -> dict:
    """Run a command with its output to `log`; wall, CPU (children's user + sys) and peak RSS of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    output = proc.communicate()[0]
    wall = time.perf_counter() - started
    peak_tree, peak_process = memory.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write(output)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime
                                                       - before.ru_stime, 1),
            "peak_rss_mb": peak_tree, "peak_process_rss_mb": peak_process, "output": output}


def run_stages(names: list[str], repo, env: dict, log, options: tuple[str, ...] = ()) -> list[dict]:
    """`dvc repro [options] --single-item STAGE` for each stage in turn: a row per stage (wall, CPU, peak RSS),
    printed as it ends."""
    stages = []
    for stage in names:
        row = run(["dvc", "repro", *options, "--single-item", stage], repo, env, log)
        row.pop("output")
        stages.append({"stage": stage, **row})
        print(f"{stage}: {row['wall_s']:.1f} s, {row['cpu_s']:.0f} CPU-s, peak {row['peak_rss_mb']:.0f} MB",
              flush=True)
    return stages


def pipeline_order(repo: Path, env: dict) -> list[str]:
    """Stages in dvc.yaml order, moved so that every stage comes after the stages it depends on."""
    names = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=repo, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    dot = subprocess.run(["dvc", "dag", "--dot"], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    order: list[str] = []
    while len(order) < len(names):
        order.append(next(n for n in names if n not in order and all(a in order for a, b in edges if b == n)))
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--install", action="store_true", help="time `make venv` in the copy and use that venv")
    parser.add_argument("--keep", type=Path, help="build the copy in this (new) folder and keep it")
    parser.add_argument("--params", type=Path, help="use this params.yaml instead of the checkout's (a pilot run)")
    parser.add_argument("--no-add", action="store_true", help="skip the add-one-SynthV2M-clip step (real data)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="v2m-demo-"))
    repo = work / "v2m" if args.keep is None else work
    repo.mkdir(parents=True, exist_ok=args.keep is None)
    copy_checkout(repo)
    if (REPO.parent / "shared").is_dir() and not (repo.parent / "shared").exists():
        (repo.parent / "shared").symlink_to(REPO.parent / "shared")  # ../shared beside the copy, as beside a clone
    if args.params:
        shutil.copy(args.params, repo / "params.yaml")
    log_path = args.out.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"about": __doc__.split("\n\n")[2].replace("\n", " "), "started": datetime.now(timezone.utc)
                     .isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                     f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "load_avg_1m_before": os.getloadavg()[0]}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    bin_dir = Path(sys.executable).parent
    with open(log_path, "w") as log:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        identity = ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", *identity, "commit", "-qm", "copy"]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        if args.install:
            make = run(["make", "venv"], repo, env, log)
            bin_dir = repo / ".venv" / "bin"
            size = subprocess.run(["du", "-sm", str(repo / ".venv")], capture_output=True, text=True).stdout.split()
            results["install"] = {"command": "make venv (python -m venv, pip install -e .[dev], ptlflow --no-deps)",
                                  "wall_s": make["wall_s"], "cpu_s": make["cpu_s"],
                                  "venv_gb": round(int(size[0]) / 1024, 2) if size else None,
                                  "date": results["started"]}
            print(f"install: make venv {make['wall_s']:.0f} s", flush=True)
        elif "install" in previous:
            results["install"] = previous["install"]  # measured by an earlier --install run (see its date)
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        if not (repo / ".dvc").is_dir():
            subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)

        stages = run_stages(pipeline_order(repo, env), repo, env, log)
        results["stages"] = stages
        results["total_s"] = round(sum(s["wall_s"] for s in stages), 1)
        noop = run(["dvc", "repro"], repo, env, log)
        results["repro_noop"] = {"wall_s": noop["wall_s"], "ran": re.findall(r"Running stage '([^']+)'",
                                                                               noop["output"])}
        print(f"second dvc repro: {noop['wall_s']:.1f} s, ran {results['repro_noop']['ran']}", flush=True)

        if args.no_add:
            return finish(results, args, work, log_path)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["synth"]["n_test"] += 1
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        add = run(["dvc", "repro", "embed", "tokenize"], repo, env, log)
        ran = re.findall(r"Running stage '([^']+)'", add["output"])
        cold = sum(s["wall_s"] for s in stages if s["stage"] in ran)
        results["incremental_add"] = {"added": "1 SynthV2M test clip (synth.n_test + 1)",
                                      "command": "dvc repro embed tokenize", "ran": ran, "wall_s": add["wall_s"],
                                      "cold_wall_s_same_stages": round(cold, 1),
                                      "ratio": round(add["wall_s"] / cold, 3) if cold else None}
        print(f"add one clip: {add['wall_s']:.1f} s for {ran} (cold {cold:.0f} s)", flush=True)
    return finish(results, args, work, log_path)


def finish(results: dict, args, work: Path, log_path: Path) -> int:
    results["load_avg_1m_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} (log: {log_path})")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
