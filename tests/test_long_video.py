"""scripts/long_video.py on the session's trained debug model: a video of two SynthV2M scores with different tempo
and key, generated window by window, scored span by span against the segment it lies in, seams against the middle
of the windows."""

from __future__ import annotations

import json

from pipeline import inference
from pipeline.config import load_params
from tests.conftest import load_script


def test_long_video_spans_follow_their_segment_and_every_seam_is_scored(trained_project, tmp_path):
    script = load_script("long_video")
    out, report = tmp_path / "long.json", tmp_path / "reports" / "long.md"
    assert script.main(["--model", str(trained_project["model"]), "--params", str(trained_project["params"]),
                        "--segments", "2", "--segment-seconds", "8", "--span-seconds", "4", "--size", "96",
                        "--json", str(out), "--report", str(report)]) == 0
    result = json.loads(out.read_text())
    first, second = result["segments"]
    assert (first["start_s"], second["start_s"]) == (0.0, 8.0)
    assert abs(second["bpm"] / first["bpm"] - 1) >= 0.15 and second["key"] != first["key"]
    spans = result["spans"]
    assert [(s["start_s"], s["segment"]) for s in spans] == [(0.0, 0), (4.0, 0), (8.0, 1), (12.0, 1)]
    assert [s["label_key"] for s in spans] == [first["key"]] * 2 + [second["key"]] * 2
    assert result["summary"]["spans"] == 4 and 0 <= result["summary"]["key_acc"] <= result["summary"]["tonic_acc"]
    assert result["summary"]["truth_key_acc"] >= 0.5  # the estimator reads most of the true music's spans right
    # the seams are where each window's own tokens start: the model's window (4 s) continuing its prompt (2 s)
    model = inference.load_model(trained_project["model"], load_params(trained_project["params"]))
    fr = model.frame_rate
    window = round(model.params.base.clip_seconds * fr)
    prompt = round(model.params.generate.prompt_seconds * fr)
    starts = inference.plan_windows(round(16 * fr), window, prompt)
    expected = [(s + prompt) / fr for s in starts[1:] if 0.2 <= (s + prompt) / fr <= 15.8]
    assert result["seams"]["seams"]["n"] == len(expected) >= 5
    assert len(result["seams"]["seams"]["spectral_jump"]) == len(expected)
    jumps = result["seams"]["seams"]["spectral_jump"] + result["seams"]["inside"]["spectral_jump"]
    assert all(0 <= v <= 1 for v in jumps)
    text = report.read_text()
    assert "| the generated music, against its segment's labels |" in text and "(0.10 by chance)" in text
    assert report.with_suffix(".png").stat().st_size > 5_000
