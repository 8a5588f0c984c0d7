"""ingest on real media: lavfi-generated edge cases, the clips in ../shared/data, and a yt-dlp boundary on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import ingest
from pipeline.config import BaseConfig, IngestConfig, Params, to_dict
from pipeline.media import count_frames, load_audio, probe
from pipeline.shards import sha256_file
from tests.conftest import ffmpeg, make_video

BASE = BaseConfig(seed=0, clip_seconds=2.0, fps=10, sample_rate=16000)
CFG = IngestConfig(short_side=64, workers=2)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run(tmp_path: Path, rows: list[dict], base=BASE, cfg=CFG, out="out") -> pd.DataFrame:
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    frame, _ = ingest.run(manifest, tmp_path / out, base, cfg)
    return frame.set_index("id")


def row(item_id: str, source: Path | str, start_s: float = 0.0, split: str = "train") -> dict:
    return {"id": item_id, "source": str(source), "start_s": start_s, "split": split}


def test_bad_inputs_each_get_one_row_and_the_batch_goes_on(tmp_path):
    good = make_video(tmp_path / "good.mp4", seconds=3)
    silent_src = make_video(tmp_path / "noaudio.mp4", seconds=3, audio=None)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    whole = make_video(tmp_path / "whole.mp4", seconds=6, extra=["-movflags", "+faststart"])
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(50_000))
    rows = [row("good", good), row("noaudio", silent_src), row("empty", empty), row("truncated", truncated),
            row("garbage", garbage), row("missing", tmp_path / "nope.mp4"), row("good", good),
            row("bad id!", good), row("late", good, start_s=10.0)]
    frame = run(tmp_path, rows)
    assert len(frame) == len(rows)  # exactly one row per input, duplicates included
    status = {i: (r.status, r.reason) for i, r in frame.reset_index().drop_duplicates("id").set_index("id").iterrows()}
    assert status["good"] == ("ok", "")
    assert status["noaudio"] == ("skipped", "no_audio")
    assert status["empty"] == ("failed", "corrupt")
    assert status["truncated"] == ("failed", "corrupt")
    assert status["garbage"] == ("failed", "corrupt")
    assert status["missing"] == ("failed", "missing")
    assert status["bad id!"] == ("failed", "bad_row")
    assert status["late"] == ("skipped", "start_past_end")
    assert list(frame.loc["good", "reason"]) == ["", "duplicate_id"]
    for item_id in ("empty", "truncated", "garbage"):
        assert str(tmp_path / item_id) in frame.loc[item_id, "error"] or item_id in frame.loc[item_id, "error"]
    # no partial outputs of failed items, no temporary files
    assert sorted(p.name for p in (tmp_path / "out" / "clips").iterdir()) == ["good.mp4"]
    assert sorted(p.name for p in (tmp_path / "out" / "audio").iterdir()) == ["good.wav"]


def test_exact_duration_and_constant_fps_from_variable_frame_rate(tmp_path):
    vfr = tmp_path / "vfr.mp4"
    # drop ~40 % of frames at random and keep their timestamps: a genuinely variable frame rate
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x240:rate=30:duration=4", "-f", "lavfi", "-t", "4",
           "-i", "sine=frequency=330", "-vf", "select='lt(random(0),0.6)'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(vfr))
    with av.open(str(vfr)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.pts is not None]
    assert len(set(np.diff(sorted(pts)))) > 1, "fixture should have variable frame durations"
    frame = run(tmp_path, [row("vfr", vfr, start_s=0.55)])
    rec = frame.loc["vfr"]
    assert rec.status == "ok"
    assert count_frames(rec.clip_path) == BASE.clip_seconds * BASE.fps == rec.n_frames
    audio, sr = load_audio(rec.audio_path, mono=False)
    assert sr == BASE.sample_rate and audio.shape[1] == BASE.clip_seconds * BASE.sample_rate
    assert probe(rec.clip_path).fps == BASE.fps


def test_rotation_4k_and_short_source(tmp_path):
    landscape = make_video(tmp_path / "land.mp4", seconds=3, size="320x240")
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(landscape), "-c", "copy", str(rotated))
    assert probe(rotated).rotation in (90, 270)
    big = make_video(tmp_path / "4k.mp4", seconds=1.5, size="3840x2160", rate="10")
    frame = run(tmp_path, [row("rot", rotated), row("big", big)])
    rot, big_rec = frame.loc["rot"], frame.loc["big"]
    assert rot.status == big_rec.status == "ok"
    assert (rot.width, rot.height) == (64, 86)  # portrait: 240x320 scaled to a 64-pixel short side
    first = next(iter_frames_of(rot.clip_path))
    assert first.shape[:2] == (86, 64)
    assert (big_rec.width, big_rec.height) == (114, 64)  # 16:9, even width
    # a source shorter than clip_seconds is ok with its real duration
    assert big_rec.duration_s == pytest.approx(1.5, abs=1 / BASE.fps)


def iter_frames_of(path):
    from pipeline.media import iter_frames

    return iter_frames(path)


@pytest.mark.parametrize("channels", [1, 2])
def test_audio_rates_layouts_and_centre_channel(tmp_path, channels):
    sources = {
        "mono8k": make_video(tmp_path / "mono8k.mp4", audio="sine=frequency=300:sample_rate=8000"),
        "stereo96k": make_video(tmp_path / "st96.mkv", audio="sine=frequency=300:sample_rate=96000,"
                                "aformat=channel_layouts=stereo", extra=["-c:a", "pcm_s24le"]),
    }
    centre = tmp_path / "centre51.mp4"  # a 1 kHz tone in the centre channel only, the other five silent
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=3", "-f", "lavfi", "-i",
           "sine=frequency=1000:sample_rate=48000:duration=3,pan=5.1|FC=c0", "-c:v", "libx264", "-preset",
           "ultrafast", "-c:a", "aac", "-b:a", "256k", str(centre))
    assert probe(centre).channels == 6
    sources["centre51"] = centre
    cfg = IngestConfig(short_side=64, audio_channels=channels)
    frame = run(tmp_path, [row(k, v) for k, v in sources.items()], cfg=cfg)
    for item_id in sources:
        rec = frame.loc[item_id]
        assert rec.status == "ok", rec.error
        info = probe(rec.audio_path)
        assert (info.sample_rate, info.channels) == (BASE.sample_rate, channels)
    audio, sr = load_audio(frame.loc["centre51", "audio_path"], mono=False)
    assert frame.loc["centre51", "audio_rms_db"] > -40  # the centre tone survives the downmix (silence: -200)
    spectrum = np.abs(np.fft.rfft(audio.mean(axis=0)))
    assert np.fft.rfftfreq(audio.shape[1], 1 / sr)[spectrum.argmax()] == pytest.approx(1000, abs=2)


def test_silent_audio_is_flagged(tmp_path):
    quiet = make_video(tmp_path / "quiet.mp4", audio="anullsrc=r=44100:cl=stereo")
    frame = run(tmp_path, [row("quiet", quiet)])
    assert (frame.loc["quiet", "status"], frame.loc["quiet", "reason"]) == ("skipped", "silent_audio")
    frame = run(tmp_path, [row("quiet", quiet)], cfg=IngestConfig(short_side=64, skip_silent=False), out="keep")
    assert frame.loc["quiet", "status"] == "ok" and bool(frame.loc["quiet", "silent"]) is True


def test_second_run_does_nothing_and_a_changed_param_retrims(tmp_path):
    a = make_video(tmp_path / "a.mp4", seconds=3)
    b = make_video(tmp_path / "b.mp4", seconds=3, audio="sine=frequency=550")
    manifest = write_manifest(tmp_path / "manifest.csv", [row("a", a), row("b", b)])
    out = tmp_path / "out"
    _, processed = ingest.run(manifest, out, BASE, CFG)
    assert processed == 2
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"}
    _, processed = ingest.run(manifest, out, BASE, CFG)
    assert processed == 0
    # a new split (more training clips in SynthV2M relabels the rest) is taken up without re-ingesting
    relabelled = write_manifest(tmp_path / "relabelled.csv", [row("a", a), row("b", b, split="val")])
    frame, processed = ingest.run(relabelled, out, BASE, CFG)
    assert processed == 0 and frame.set_index("id")["split"].to_dict() == {"a": "train", "b": "val"}
    _, processed = ingest.run(manifest, out, BASE, CFG)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"}
    shorter = BaseConfig(seed=0, clip_seconds=1.0, fps=10, sample_rate=16000)
    frame, processed = ingest.run(manifest, out, shorter, CFG)
    assert processed == 2 and set(frame["n_frames"]) == {10}
    # a source file that changes is re-ingested
    make_video(a, seconds=3, audio="sine=frequency=880")
    _, processed = ingest.run(manifest, out, shorter, CFG)
    assert processed == 1


def test_killed_run_resumes_with_identical_outputs(tmp_path):
    sources = [make_video(tmp_path / f"v{i}.mp4", seconds=3, audio=f"sine=frequency={200 + 50 * i}")
               for i in range(8)]
    manifest = write_manifest(tmp_path / "manifest.csv", [row(f"v{i}", s) for i, s in enumerate(sources)])
    params = tmp_path / "params.yaml"
    data = to_dict(Params(base=BASE, ingest=IngestConfig(short_side=64, workers=1)))
    params.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--params", str(params), "--manifest", str(manifest)]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    rows_dir = tmp_path / "killed" / "rows"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(rows_dir.glob("*.json"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(rows_dir.glob("*.json")))
    assert 2 <= done_before < 8, "the run should have been killed midway"
    assert not (tmp_path / "killed" / "manifest.parquet").exists()
    assert subprocess.run([*cmd, "--out", str(tmp_path / "killed")], capture_output=True).returncode == 0
    assert subprocess.run([*cmd, "--out", str(tmp_path / "clean")], capture_output=True).returncode == 0
    killed, clean = (pd.read_parquet(tmp_path / d / "manifest.parquet") for d in ("killed", "clean"))
    assert list(killed["status"]) == ["ok"] * 8
    for sub in ("clips", "audio"):
        names = sorted(p.name for p in (tmp_path / "clean" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "killed" / sub).iterdir())  # no temp files left
        for name in names:
            assert sha256_file(tmp_path / "clean" / sub / name) == sha256_file(tmp_path / "killed" / sub / name)
    cols = ["id", "status", "n_frames", "duration_s", "source_sha256", "audio_rms_db"]
    pd.testing.assert_frame_equal(killed[cols], clean[cols])


def test_exit_status_follows_max_fail_ratio(tmp_path):
    good = make_video(tmp_path / "good.mp4")
    manifest = write_manifest(tmp_path / "m.csv", [row("good", good), row("gone", tmp_path / "gone.mp4")])
    params = tmp_path / "params.yaml"
    for ratio, expected in ((0.6, 0), (0.1, 1)):
        data = to_dict(Params(base=BASE, ingest=IngestConfig(short_side=64, max_fail_ratio=ratio)))
        params.write_text(yaml.safe_dump(data))
        code = ingest.main(["--params", str(params), "--manifest", str(manifest), "--out", str(tmp_path / "o")])
        assert code == expected


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,path\nx,y\n")
    with pytest.raises(SystemExit, match=r"bad\.csv: missing column\(s\) id, source"):
        ingest.run(bad, tmp_path / "o", BASE, CFG)
    with pytest.raises(SystemExit, match="no such manifest"):
        ingest.run(tmp_path / "absent.csv", tmp_path / "o", BASE, CFG)


def test_extra_manifest_columns_pass_through(tmp_path):
    src = make_video(tmp_path / "a.mp4")
    rows = [{**row("a", src), "caption": "a test tone", "tempo_bpm": 120.0}]
    frame = run(tmp_path, rows)
    assert frame.loc["a", "caption"] == "a test tone" and frame.loc["a", "tempo_bpm"] == 120.0
    assert json.loads(frame.loc["a", "tool_versions"])["pyav"] == av.__version__


# The real clips in ../shared/data: (file, expected status, reason, expected duration at clip_seconds=8)
REAL = [
    ("videos_with_music/big_buck_bunny_0-30s.webm", "ok", "", 8.0),
    ("videos_with_music/sintel_excerpt_26s.mp4", "ok", "", 8.0),
    ("videos_with_music/tears_of_steel_2s.webm", "ok", "", 2.0),
    ("videos/mdn_toy_frog_8s.webm", "ok", "", 8.0),
    ("videos/nasa_earth_night_30s.mp4", "skipped", "silent_audio", None),
    ("videos/rocket_launch_17s.mp4", "skipped", "no_audio", None),
]


def test_real_clips_from_shared_data(tmp_path, shared_data):
    base = BaseConfig(clip_seconds=8.0, fps=12, sample_rate=32000)
    rows = [row(Path(name).stem.replace("-", "_"), shared_data / name) for name, *_ in REAL]
    frame = run(tmp_path, rows, base=base, cfg=IngestConfig(short_side=96))
    for (name, status, reason, duration), r in zip(REAL, rows, strict=True):
        rec = frame.loc[r["id"]]
        assert (rec.status, rec.reason) == (status, reason), f"{name}: {rec.error}"
        if duration is not None:
            assert rec.duration_s == pytest.approx(duration, abs=1 / base.fps)
            assert rec.height == 96 and rec.width > rec.height  # landscape films
            audio, sr = load_audio(rec.audio_path)
            assert audio.shape[1] == round(rec.duration_s * sr)
    assert bool(frame.loc["rocket_launch_17s", "has_audio"]) is False
