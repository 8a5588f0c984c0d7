"""The media layer on real files: probe, decode, encode, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.media import MediaError, count_frames, encode_video, iter_frames, load_audio, probe, rms_db, write_wav
from tests.conftest import make_video


def test_encode_then_probe_and_decode(tmp_path):
    frames = [np.full((48, 64, 3), i * 10, np.uint8) for i in range(20)]
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
    encode_video(tmp_path / "v.mp4", frames, fps=10, audio=tone, sample_rate=16000)
    info = probe(tmp_path / "v.mp4")
    assert (info.video_codec, info.audio_codec, info.width, info.height, info.fps) == ("h264", "aac", 64, 48, 10.0)
    assert info.duration_s == pytest.approx(1.0, abs=0.1) and count_frames(tmp_path / "v.mp4") == 10  # -shortest
    decoded = list(iter_frames(tmp_path / "v.mp4", gray=True))
    assert decoded[0].shape == (48, 64) and abs(int(decoded[5].mean()) - 50) <= 3
    audio, sr = load_audio(tmp_path / "v.mp4", sample_rate=8000)
    assert sr == 8000 and audio.shape[0] == 1 and rms_db(audio) == pytest.approx(-9.0, abs=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no temporary files left


def test_wav_round_trip_and_silence(tmp_path):
    stereo = np.stack([np.linspace(-0.5, 0.5, 800), np.zeros(800)]).astype(np.float32)
    write_wav(tmp_path / "a.wav", stereo, 8000)
    audio, sr = load_audio(tmp_path / "a.wav", mono=False)
    assert sr == 8000 and audio.shape == (2, 800)
    np.testing.assert_allclose(audio, stereo, atol=1e-4)
    assert rms_db(np.zeros((1, 100))) == -200.0


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00garbage" * 10, b"\x00" * 4096])
def test_unreadable_files_raise_media_error_naming_the_file(tmp_path, content):
    for name in ("bad.wav", "bad.mp4"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MediaError, match=str(path)):
            probe(path)
        with pytest.raises(MediaError, match=str(path)):
            load_audio(path, mono=False)
    with pytest.raises(MediaError, match="no such file"):
        probe(tmp_path / "absent.mp4")


def test_no_audio_and_rotation(tmp_path):
    silent = make_video(tmp_path / "v.mp4", seconds=1, audio=None)
    with pytest.raises(MediaError) as info:
        load_audio(silent)
    assert info.value.reason == "no_audio"
    assert probe(silent).has_audio is False and probe(silent).rotation == 0


@pytest.mark.parametrize("preset", ["ultrafast", "veryfast"])  # without and with B-frames
@pytest.mark.parametrize("start_s", [0.0, 0.02, 0.3, 1.3])
def test_normalised_audio_stays_on_the_source_clock_whatever_the_start_and_encoder(tmp_path, preset, start_s):
    """Clicks every 0.5 s (at 0.1, 0.6, ...) come out of normalise_video where the source has them, minus the start.
    An input seek to a time inside the first AAC frame of a source without B-frames (x264 ultrafast) dropped that
    whole frame: the audio came out 1024 samples (32 ms) early. Starts before 1 s are cut by the filters now."""
    import soundfile as sf

    from pipeline.media import normalise_video

    clicks = "aevalsrc='if(between(mod(t\\,0.5)\\,0.1\\,0.1015)\\,0.8\\,0)':s=32000:c=mono:d=3"
    src = make_video(tmp_path / f"src_{preset}.mp4", seconds=3, audio=clicks, extra=["-preset", preset])
    clip, wav = tmp_path / "clip.mp4", tmp_path / "music.wav"
    normalise_video(src, clip, 24, 24.0, 224, 20, "ultrafast", start_s, wav, 32000, 1)
    audio, rate = sf.read(wav)
    assert rate == 32000 and len(audio) == 32000
    first = int(np.argmax(np.abs(audio) > 0.3))  # the first click's attack
    due = ((0.1 - start_s) % 0.5) * rate
    assert abs(first - due) < 48, (first, due)  # 1.5 ms: AAC smears an attack, it does not move it
    assert count_frames(clip) == 24
