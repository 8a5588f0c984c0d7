"""Rank, device and thread selection shared by the stages."""

from __future__ import annotations

from pipeline.runtime import cores_per_process, dist_env, resolve_device


def test_dist_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert dist_env() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert dist_env() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_env() == (1, 2)  # torchrun wins


def test_cores_per_process_and_devices(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [cores_per_process(n) for n in (0, 1, 3, 16)] == [8, 8, 2, 1]
    assert resolve_device("cpu") == "cpu"


RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR",
             "V2M_LAUNCH_ID")


def test_local_ranks_start_the_others_and_a_failed_one_stops_rank_0_at_once(monkeypatch, tmp_path):
    """runtime.local_ranks(2, ...): this process is rank 0 of 2 and rank 1 is `python -m pipeline.cli COMMAND ...`;
    here that command does not exist, so rank 1 exits with status 2 and rank 0's barrier says so within seconds
    (not after the 12 h timeout). The environment rank 0 runs in names its rank, the world and the launch."""
    import time

    import pytest

    from pipeline import runtime

    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert runtime.local_ranks(1, "embed", []) == (0, 1) and not runtime._children  # workers 1: alone
    assert runtime.local_ranks(2, "no-such-command", ["--params", str(tmp_path / "p.yaml")]) == (0, 2)
    import os

    assert not any(key in os.environ for key in RANK_KEYS)  # this process's environment is left as it was
    assert runtime.local_world_size() == 2 and len(runtime._launch["id"]) == 32
    start = time.monotonic()
    try:
        with pytest.raises(SystemExit, match=r"stage-x: rank 1 exited with status 2"):
            runtime.wait_for_ranks(tmp_path / "out", 0, 2, "token", "stage-x")
    finally:
        runtime._stop_children()
    assert time.monotonic() - start < 60
    assert runtime.local_world_size() == 1 and not runtime._children
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert runtime.local_ranks(2, "embed", []) == (1, 3) and not runtime._children  # torchrun / SLURM's world wins


def test_markers_of_an_earlier_launch_do_not_count_and_none_are_left(monkeypatch, tmp_path):
    """The barrier's marker files are keyed by the launch: rank 1's marker from an earlier launch with the same inputs
    does not let rank 0 through; once every rank's marker of this launch is in, rank 0 removes them all."""
    import threading

    from pipeline import runtime

    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("V2M_LAUNCH_ID", "earlier")
    runtime.wait_for_ranks(tmp_path, 1, 2, "same inputs", "stage-x")  # rank 1 of an earlier launch: its marker
    monkeypatch.setenv("V2M_LAUNCH_ID", "now")
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (runtime.wait_for_ranks(tmp_path, 0, 2, "same inputs", "stage-x"),
                                              done.set()))
    waiter.start()
    assert not done.wait(3.0)  # the stale marker is not enough
    runtime.wait_for_ranks(tmp_path, 1, 2, "same inputs", "stage-x")  # this launch's rank 1
    assert done.wait(10.0)
    waiter.join()
    assert not (tmp_path / ".ranks").exists()
