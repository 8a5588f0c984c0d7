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
                        "--json", str(out), "--report", str(report), "--compare-crossfade", "0.04"]) == 0
    result = json.loads(out.read_text())
    first, second = result["segments"]
    assert (first["start_s"], second["start_s"]) == (0.0, 8.0)
    assert abs(second["bpm"] / first["bpm"] - 1) >= 0.15 and second["key"] != first["key"]
    spans = result["spans"]
    assert [(s["start_s"], s["segment"]) for s in spans] == [(0.0, 0), (4.0, 0), (8.0, 1), (12.0, 1)]
    assert [s["label_key"] for s in spans] == [first["key"]] * 2 + [second["key"]] * 2
    assert result["summary"]["spans"] == 4 and 0 <= result["summary"]["key_acc"] <= result["summary"]["tonic_acc"]
    assert result["summary"]["truth_key_acc"] >= 0.5  # the estimator reads most of the true music's spans right
    # the seams are the crossfades: each window's own tokens start where the next one's prompt ends
    model = inference.load_model(trained_project["model"], load_params(trained_project["params"]))
    fr = model.frame_rate
    window, given, overlap = inference.window_plan(model, model.params.generate)
    starts = inference.plan_windows(round(16 * fr), window, given + overlap)
    expected = [(s + given) / fr for s in starts[1:] if 0.2 <= (s + given) / fr and (s + given + overlap) / fr <= 15.8]
    seams = result["seams"]
    assert seams["seams"]["n"] == seams["middle"]["n"] == seams["end"]["n"] == len(expected) >= 5
    assert len(seams["seams"]["spectral_jump"]) == len(expected) and seams["crossfade_s"] == overlap / fr
    # the control: every 0.1 s inside the windows, never within 0.5 s of a crossfade
    assert seams["inside"]["n"] >= 50
    jumps = [v for where in ("seams", "middle", "end") for v in seams[where]["spectral_jump"]]
    assert all(0 <= v <= 1 for v in jumps) and 0 <= seams["inside"]["spectral_jump_p90"] <= 1
    for key in ("spectral_jump", "onset_rel"):  # the share above the control's p90 is counted against that p90
        above = sum(v > seams["inside"][f"{key}_p90"] for v in seams["seams"][key]) / seams["seams"]["n"]
        assert abs(seams[f"{key}_above_inside_p90"] - above) < 1e-4
    for key in ("spectral_jump", "onset_rel"):
        for suffix in ("", "_middle", "_end"):
            assert 0 <= seams[f"{key}_above_inside_p90{suffix}"] <= 1 and 0 < seams[f"{key}_p_chance{suffix}"] <= 1
    # one frame of crossfade, for comparison: the same video scored the same way
    assert result["compare"]["crossfade_seconds"] == 0.04 and result["compare"]["seams"]["seams"]["n"] >= 5
    assert result["compare"]["seams"]["crossfade_s"] == max(1, round(0.04 * fr)) / fr
    text = report.read_text()
    assert "| the generated music, against its segment's labels |" in text and "(0.10 by chance)" in text
    assert "crossfade of 0.04 s" in text
    assert report.with_suffix(".png").stat().st_size > 5_000
