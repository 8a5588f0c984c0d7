"""SynthV2M: determinism, real H.264 + AAC files, and that motion, beats and key in the media match the labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import librosa
import mir_eval
import numpy as np
import pytest
import yaml
from scipy.signal import find_peaks

from pipeline import synth
from pipeline.config import BaseConfig, ConfigError, SynthConfig, load_params
from pipeline.media import iter_frames, load_audio, probe
from pipeline.shards import read_manifest

FPS, SECONDS, WIDTH, HEIGHT = 24, 6.0, 192, 160  # small, non-square clips keep the tests fast and catch w/h swaps
KS_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KS_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One `synth.main` run of 4 clips (train 2, val 1, test 1) with a preview."""
    root = tmp_path_factory.mktemp("synth")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "base": {"seed": 7, "clip_seconds": SECONDS, "fps": FPS},
        "synth": {"width": WIDTH, "height": HEIGHT, "n_train": 2, "n_val": 1, "n_test": 1, "preview_clips": 2},
    }))
    paths = {"params_file": params, "out": root / "raw", "manifest": root / "m.csv", "preview": root / "preview.png"}
    argv = ["--params", str(params), "--out", str(paths["out"]), "--manifest", str(paths["manifest"]),
            "--preview", str(paths["preview"])]
    assert synth.main(argv) == 0
    return {**paths, "frame": read_manifest(paths["manifest"]), "params": load_params(params)}


def _beats(row) -> np.ndarray:
    return np.array(json.loads(row["beat_times"]))


def _estimate_key(audio: np.ndarray, sample_rate: int) -> tuple[str, str]:
    """Krumhansl-Schmuckler on the mean CQT chroma above C3 (drums and bass left out)."""
    chroma = librosa.feature.chroma_cqt(y=audio, sr=sample_rate, fmin=librosa.note_to_hz("C3"), n_octaves=5).mean(1)
    scores = [(np.corrcoef(np.roll(profile, pc), chroma)[0, 1], synth.PITCH_NAMES[pc], mode)
              for pc in range(12) for profile, mode in ((KS_MAJOR, "major"), (KS_MINOR, "minor"))]
    _, key, mode = max(scores)
    return key, mode


def test_same_seed_same_labels_and_audio_different_seed_differs():
    cfg, base = SynthConfig(), BaseConfig(clip_seconds=4.0)
    a, b, other = synth.make_spec(3, 5, cfg, base), synth.make_spec(3, 5, cfg, base), synth.make_spec(4, 5, cfg, base)
    assert a == b and synth.labels(a) == synth.labels(b)
    audio_a, audio_b = synth.render_audio(a, 16000), synth.render_audio(b, 16000)
    assert audio_a.dtype == np.float32 and audio_a.shape == (64000,)
    np.testing.assert_array_equal(audio_a, audio_b)
    assert other != a and not np.array_equal(synth.render_audio(other, 16000), audio_a)
    frames_a = list(synth.render_frames(a, 12, 64, 48))
    assert len(frames_a) == 48 and frames_a[0].shape == (48, 64, 3) and frames_a[0].dtype == np.uint8
    for fa, fb in zip(frames_a, synth.render_frames(b, 12, 64, 48), strict=True):
        np.testing.assert_array_equal(fa, fb)


def test_labels_are_consistent_and_in_range():
    cfg, base = SynthConfig(), BaseConfig()
    for index in range(30):
        spec = synth.make_spec(0, index, cfg, base)
        beats = np.array(spec.beat_times)
        assert cfg.tempo_min_bpm <= spec.tempo_bpm <= cfg.tempo_max_bpm
        np.testing.assert_allclose(np.diff(beats), 60 / spec.tempo_bpm, atol=2e-4)
        assert 0 < beats[0] <= 0.05 + cfg.max_first_beat_frac * spec.period_s + 1e-4 and beats[-1] < base.clip_seconds
        assert spec.shape == synth.INSTRUMENT_SHAPES[spec.instrument] and spec.note_density in (1, 2, 4)
        scale = {(spec.key_pc + step) % 12 for step in synth.SCALES[spec.mode]}
        assert {midi % 12 for _, _, midi in spec.melody} <= scale
        assert len(spec.melody) == pytest.approx(len(beats) * spec.note_density, abs=spec.note_density)


def test_split_sizes():
    assert synth.split_sizes(SynthConfig()) == {"train": 320, "val": 20, "test": 20}  # the demo's
    cfg = SynthConfig(n_train=160, n_val=20, n_test=20)
    assert synth.split_sizes(cfg) == {"train": 160, "val": 20, "test": 20}
    assert synth.split_sizes(cfg, 200) == {"train": 160, "val": 20, "test": 20}
    assert synth.split_sizes(cfg, 3) == {"train": 1, "val": 1, "test": 1}
    assert synth.split_sizes(cfg, 10) == {"train": 8, "val": 1, "test": 1}
    assert synth.split_sizes(cfg, 1) == {"train": 1, "val": 0, "test": 0}


def test_params_that_cannot_be_rendered_fail_with_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": {"width": 255}}))
    with pytest.raises(ConfigError, match="synth.width"):
        synth.main(["--params", str(params), "--out", str(tmp_path / "raw"), "--manifest", str(tmp_path / "m.csv")])
    params.write_text(yaml.safe_dump({"synth": {"tempo_min_bpm": 150.0}}))
    with pytest.raises(ConfigError, match="tempo_min_bpm"):
        synth.main(["--params", str(params), "--out", str(tmp_path / "raw"), "--manifest", str(tmp_path / "m.csv")])
    assert not (tmp_path / "raw").exists()


def test_manifest_has_one_row_per_clip_with_the_labels(run):
    frame = run["frame"]
    assert list(frame.columns) == synth.COLUMNS
    assert list(frame["id"]) == [f"synth_{i:05d}" for i in range(4)]
    assert list(frame["split"]) == ["train", "train", "val", "test"]
    assert (frame["start_s"] == 0).all() and frame["license"].str.startswith("CC0").all()
    cfg, base = run["params"].synth, run["params"].base
    for i, row in frame.iterrows():
        spec = synth.make_spec(7, i, cfg, base)
        assert row["source"] == str(run["out"] / f"{spec.id}.mp4") and Path(row["source"]).exists()
        assert _beats(row).tolist() == list(spec.beat_times)
        assert (row["key"], row["mode"], row["instrument"]) == (spec.key, spec.mode, spec.instrument)
        assert row["tempo_bpm"] == spec.tempo_bpm and row["caption"] == spec.caption()


def test_mp4_is_h264_aac_with_the_right_duration_fps_and_size(run):
    for source in run["frame"]["source"]:
        info = probe(source)
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")
        assert (info.width, info.height) == (WIDTH, HEIGHT) and info.fps == pytest.approx(FPS)
        assert info.duration_s == pytest.approx(SECONDS, abs=0.1) and info.sample_rate == 32000


def test_motion_energy_peaks_on_the_beats(run):
    """Frame differences of the decoded video peak within one frame of (almost) every labelled beat, and hardly
    anywhere else; Farneback flow (AV-Align's estimator) agrees. The change from frame k-1 to frame k is timed at
    its midpoint, (k - 0.5) / fps."""
    hits = total = extra = 0
    for _, row in run["frame"].iterrows():
        beats = _beats(row)
        inside = beats[(beats > 1 / FPS) & (beats < SECONDS - 2 / FPS)]
        frames = np.stack(list(iter_frames(row["source"], gray=True)))  # (T, H, W)
        energy = synth.motion_energy(frames)  # (T,)
        peaks, _ = find_peaks(energy, height=0.3 * energy.max())
        peak_s = (peaks - 0.5) / FPS
        hits += sum(np.min(np.abs(peak_s - b)) <= 1 / FPS for b in inside)
        total += len(inside)
        extra += sum(np.min(np.abs(beats - p)) > 1.5 / FPS for p in peak_s)
        if row["split"] == "test":
            pairs = zip(frames[:-1], frames[1:], strict=True)
            flow = np.r_[0, [np.linalg.norm(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0), axis=-1)
                             .mean() for a, b in pairs]]
            flow_peaks, _ = find_peaks(flow, height=0.3 * flow.max())
            assert np.mean([np.min(np.abs((flow_peaks - 0.5) / FPS - b)) <= 1 / FPS for b in inside]) >= 0.9
    assert hits / total >= 0.95 and extra <= 0.05 * total


def test_more_notes_per_beat_means_faster_motion():
    spec = synth.make_spec(0, 1, SynthConfig(), BaseConfig(clip_seconds=3.0))
    energies = []
    for density in (1, 2, 4):
        frames = np.stack(list(synth.render_frames(dataclasses.replace(spec, note_density=density), 24, 128, 128)))
        energies.append(synth.motion_energy(frames).sum())
    assert energies[0] < energies[1] < energies[2]


def test_audio_onsets_and_beat_tracking_agree_with_the_labels(run):
    f_measures, tempo_ok = [], []
    for _, row in run["frame"].iterrows():
        beats = _beats(row)
        audio, sr = load_audio(row["source"], 22050)
        onsets = librosa.onset.onset_detect(y=audio[0], sr=sr, units="time")
        assert np.mean([np.min(np.abs(onsets - b)) <= 0.05 for b in beats]) >= 0.95  # a kick on every beat
        tempo, tracked = librosa.beat.beat_track(y=audio[0], sr=sr, units="time")
        tempo = float(np.atleast_1d(tempo)[0])
        tempo_ok.append(min(abs(tempo * f / row["tempo_bpm"] - 1) for f in (0.5, 1, 2)) <= 0.04)
        f_measures.append(mir_eval.beat.f_measure(beats, tracked))  # no trim_beats: it drops the first 5 s
    assert all(tempo_ok) and np.mean(f_measures) >= 0.85


def test_chroma_key_estimate_agrees_with_the_label(run):
    """Key (tonic + mode) by Krumhansl-Schmuckler: on the decoded clips, and on 12 more scores rendered to audio."""
    decoded = [_estimate_key(load_audio(row["source"], 22050)[0][0], 22050) == (row["key"], row["mode"])
               for _, row in run["frame"].iterrows()]
    assert sum(decoded) >= 3
    cfg, base = SynthConfig(), BaseConfig()  # the default 8 s: two to five bars
    specs = [synth.make_spec(11, i, cfg, base) for i in range(12)]
    estimates = [_estimate_key(synth.render_audio(s, 22050), 22050) for s in specs]
    assert sum(est[0] == s.key for est, s in zip(estimates, specs, strict=True)) >= 11
    assert sum(est == (s.key, s.mode) for est, s in zip(estimates, specs, strict=True)) >= 9


def test_preview_png_is_written(run):
    data = run["preview"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_rerun_renders_nothing_clip_i_is_independent_of_n_and_a_stale_clip_is_redone(run, tmp_path):
    out = run["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("synth_*")}
    manifest = tmp_path / "two.csv"
    argv = ["--params", str(run["params_file"]), "--out", str(out), "--manifest", str(manifest), "--n", "2",
            "--no-preview"]
    assert synth.main(argv) == 0  # the first two clips of a 4-clip run are the clips of a 2-clip run
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("synth_*")} == before
    two = read_manifest(manifest)
    same = [c for c in synth.COLUMNS if c != "split"]
    assert two[same].equals(run["frame"][same].iloc[:2])
    sidecar = out / "synth_00001.json"
    sidecar.write_text(json.dumps({"spec_hash": "stale"}))
    assert synth.main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("synth_*")}
    assert after["synth_00000.mp4"] == before["synth_00000.mp4"]
    assert after["synth_00001.mp4"] != before["synth_00001.mp4"]
    assert json.loads(sidecar.read_text())["spec_hash"] == two.loc[1, "spec_hash"]


def test_objects_take_the_hue_of_each_bars_chord_root():
    """The chord progression is visible: mid-bar, the objects are the palette colour of that bar's chord root, and the
    background keeps the key's hue throughout."""
    cfg, base = SynthConfig(), BaseConfig(clip_seconds=6.0)
    spec = next(s for s in (synth.make_spec(0, i, cfg, base) for i in range(50))
                if s.progression[1] != 0 and len(s.beat_times) >= 7)
    roots = synth.chord_roots(spec)
    assert roots[:4] == [spec.key_pc] * 4 and roots[4] != spec.key_pc
    assert synth.labels(spec)["chords"].split()[:2] == [synth.PITCH_NAMES[roots[0]], synth.PITCH_NAMES[roots[4]]]
    size = 160
    times = [spec.beat_times[1] + spec.period_s / 2, spec.beat_times[5] + spec.period_s / 2]  # at rest, mid bar
    frames = list(synth.render_frames(spec, FPS, size, size))
    hop = synth.DENSITY_HOP[spec.note_density] * size
    along = np.array([np.cos(spec.hop_angle), np.sin(spec.hop_angle)])
    for t, root in zip(times, (roots[1], roots[5]), strict=True):
        frame = frames[int(round(t * FPS))]
        step = round(t * FPS) / FPS
        n_hops = int(np.searchsorted(np.asarray(spec.beat_times), step))  # hops done: the objects rest at +-hop/2
        offset = (abs(n_hops % 2.0 - 1.0) - 0.5) * hop
        x, y = (np.array(spec.centres[0]) * size + offset * along).astype(int)
        expected = synth.palette(spec, root)[1] * 255
        assert np.abs(frame[y, x].astype(float) - expected).max() <= 3, (t, root, frame[y, x], expected)
        corner = frame[2, 2].astype(float) / 255  # background: the key's hue whatever the chord
        hue = cv2.cvtColor(corner[None, None].astype(np.float32), cv2.COLOR_RGB2HSV)[0, 0, 0] / 30  # degrees / 30
        assert min((hue - spec.key_pc) % 12, (spec.key_pc - hue) % 12) < 0.6
