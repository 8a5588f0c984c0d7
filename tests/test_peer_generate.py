"""benchmarks/peer_generate.py compares v2m's generation with a peer that generates correctly: transformers'
MusicgenForCausalLM with its KV cache must give what it gives without one (greedy, the same codes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_generate.py"
    spec = importlib.util.spec_from_file_location("peer_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarked_peer_with_its_cache_equals_the_peer_without(monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "DECODER", {"d_model": 64, "n_heads": 4, "ffn_dim": 128})  # a small peer, same code
    torch.manual_seed(0)
    generate, info = bench.peer_side("cpu", 2, memory_len=7)
    assert "MusicgenForCausalLM" in info["what"]
    cached = generate(12, do_sample=False)
    assert tuple(cached.shape[-2:]) == (bench.K, 12)
    assert torch.equal(cached, generate(12, do_sample=False, use_cache=False))
