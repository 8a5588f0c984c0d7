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
