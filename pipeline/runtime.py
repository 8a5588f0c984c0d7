"""Where a stage runs: its rank in a torchrun / SLURM world, the barrier at the end of a sharded stage, its device and
its thread count. Shared by the stages so that scale-out and thread choice behave the same in every one of them.

Rank and world size come from torchrun (RANK / WORLD_SIZE) or SLURM (SLURM_PROCID / SLURM_NTASKS); one process alone
is rank 0 of 1, or `local_ranks` starts the ranks itself on this machine (a stage's `workers` param). Threads: more
threads than free cores makes every small op wait for a descheduled thread, so a count of 0 means the cores divided
by the processes sharing them; scale out with processes, not threads.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from pipeline.shards import atomic_write_json, stable_hash

BARRIER_TIMEOUT = timedelta(hours=12)  # ranks can finish far apart on skewed shards
LAUNCH_ENV = "V2M_LAUNCH_ID"  # set by local_ranks in every rank it runs: keys the barrier's marker files
_children: list[tuple[int, subprocess.Popen]] = []  # (rank, process) that local_ranks started
_launch: dict = {}  # rank 0 of local_ranks' launch: {"id", "world"}


@contextlib.contextmanager
def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise SystemExit(128 + signal), as Ctrl-C raises KeyboardInterrupt, so context
    managers and finally blocks (temp files, scratch folders, ffmpeg children) clean up before the process ends. A
    no-op off the main thread (Python delivers signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun (RANK / WORLD_SIZE) or SLURM (SLURM_PROCID / SLURM_NTASKS); (0, 1) alone."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} is not in [0, {world_key}={world})")
            return rank, world
    return 0, 1


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 alone): the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The processes on this node (torchrun's LOCAL_WORLD_SIZE, or local_ranks' workers; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", _launch.get("world", 1)))


def cores_per_process(processes: int) -> int:
    """This machine's cores divided by `processes` (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def local_ranks(workers: int, command: str, argv: list[str]) -> tuple[int, int]:
    """(rank, world) of this process for a sharded stage whose `workers` param is `workers`.

    Under torchrun or SLURM (dist_env's world > 1), or with workers <= 1: dist_env's answer. Else this process
    becomes rank 0 of `workers` and starts ranks 1 .. workers-1 itself: `python -m pipeline.cli COMMAND ARGV` with
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and a fresh launch id (which keys the barrier's marker files, so
    markers of an earlier launch never count). They write their shards and exit; rank 0 does its own, waits for them
    in `wait_for_ranks` (which stops at once, naming the rank, when one exits with an error) and writes what rank 0
    writes. Same shards, same bytes as one process (each rank writes whole shards). This process's environment is
    left as it was (a later call starts a new launch); the ranks it started are terminated when it exits, and get
    SIGTERM when it dies (Linux)."""
    rank, world = dist_env()
    if world > 1 or workers <= 1:
        return rank, world
    _stop_children()
    _launch.update(id=uuid.uuid4().hex, world=workers)
    shared = {"WORLD_SIZE": str(workers), "LOCAL_WORLD_SIZE": str(workers), LAUNCH_ENV: _launch["id"]}
    for r in range(1, workers):
        env = {**os.environ, **shared, "RANK": str(r), "LOCAL_RANK": str(r)}
        env.pop("MASTER_ADDR", None)  # marker files, not a gloo rendezvous
        _children.append((r, subprocess.Popen([sys.executable, "-m", "pipeline.cli", command, *argv], env=env,
                                              preexec_fn=_die_with_parent)))
    atexit.register(_stop_children)
    return 0, workers


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_children() -> None:
    for _, proc in _children:
        if proc.poll() is None:
            proc.terminate()
    for _, proc in _children:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    _children.clear()
    _launch.clear()


def _failed_child() -> str | None:
    """'rank R exited with status S' for the first rank local_ranks started that failed, else None."""
    for rank, proc in _children:
        if proc.poll() not in (None, 0):
            return f"rank {rank} exited with status {proc.returncode}"
    return None


def wait_for_ranks(out_dir: Path, rank: int, world: int, token: str, stage: str) -> None:
    """Return on rank 0 once every rank has finished its shards; other ranks return at once (after the barrier).

    A gloo barrier when MASTER_ADDR and MASTER_PORT are set (as under torchrun); else marker files in
    {out_dir}/.ranks/ holding `token` keyed by the SLURM job step (or local_ranks' launch id), so markers of another
    run never count; rank 0 removes them once all are in. `stage` names the stage in the error when rank 0 gives up
    after BARRIER_TIMEOUT, or at once when a rank local_ranks started has failed.
    """
    if world == 1:
        return
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
        dist.barrier()
        dist.destroy_process_group()
        return
    # no rendezvous (e.g. plain `srun python -m pipeline.embed`): marker files, keyed by the job step and the inputs
    launch = os.environ.get(LAUNCH_ENV) or _launch.get("id", "")
    job = f"{os.environ.get('SLURM_JOB_ID', '')}.{os.environ.get('SLURM_STEP_ID', '')}.{launch}"
    token = stable_hash(f"{job}:{token}")
    markers = out_dir / ".ranks"
    atomic_write_json(markers / f"{rank:05d}.json", {"token": token, "world": world})
    if rank != 0:
        return
    deadline = time.monotonic() + BARRIER_TIMEOUT.total_seconds()
    while time.monotonic() < deadline:
        tokens = []
        for r in range(world):
            try:
                tokens.append(json.loads((markers / f"{r:05d}.json").read_text())["token"])
            except (OSError, ValueError, KeyError):
                tokens.append(None)
        if all(t == token for t in tokens):
            for r in range(world):  # every rank is past its marker: the output folder keeps none (DVC hashes it)
                (markers / f"{r:05d}.json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                markers.rmdir()
            _stop_children()  # they have all exited (or are exiting): this launch is over
            return
        if failed := _failed_child():
            raise SystemExit(f"{stage}: {failed}; its shards are kept, rerun to finish")
        time.sleep(0.5 if _children else 2.0)
    raise SystemExit(f"{stage}: rank 0 waited {BARRIER_TIMEOUT} for the other ranks' markers in {markers}")


def resolve_device(device: str) -> str:
    """`auto` -> this process's GPU when torch sees one (cuda:$LOCAL_RANK under torchrun), else "cpu"."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank() % torch.cuda.device_count()}"


def set_threads(threads: int) -> int:
    """Set torch's (and OpenCV's) intra-op threads; 0 = the cores divided by the processes on this node.

    More threads than free cores makes every small op wait for a descheduled thread: on a 2-core machine shared with
    other work, 2 threads ran the embedded CLIP model ~8x slower than 1. Scale out with processes (torchrun), not
    threads. Returns the number set.
    """
    import cv2
    import torch

    if threads <= 0:
        threads = cores_per_process(local_world_size())
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads
