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
