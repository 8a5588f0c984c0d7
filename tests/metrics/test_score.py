"""The public per-clip scoring API: labels from a manifest row, beat lists, the flow cache location."""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics import rhythm
from pipeline.metrics.score import clip_labels, default_flow_cache, parse_beats


def test_parse_beats_and_clip_labels(monkeypatch):
    assert parse_beats("[1.5, 0.5]").tolist() == [0.5, 1.5]
    assert parse_beats("0.5; 1.0;").tolist() == [0.5, 1.0]
    assert parse_beats("") is None and parse_beats(None) is None and parse_beats(math.nan) is None
    labels = clip_labels({"tempo_bpm": 120.0, "beat_times": "[0.5, 1.0]", "key": "A", "mode": "minor"})
    assert labels.tempo_bpm == 120.0 and np.array_equal(labels.beats, [0.5, 1.0])
    assert labels.key == rhythm.parse_key("A", "minor")
    empty = clip_labels({"tempo_bpm": math.nan, "beat_times": "", "key": ""})
    assert empty.tempo_bpm is None and empty.beats is None and empty.key is None
    monkeypatch.setenv("V2M_CACHE_DIR", "/x/cache")
    assert str(default_flow_cache()) == "/x/cache/av_align_flow"
