"""Chroma cosine similarity: cases known by construction, audiocraft's edge cases, and regression values that
audiocraft's own ChromaCosineSimilarityMetric gave on real music (see the cross-check in the metrics issue)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metrics_synth import tone, write_wav

from pipeline.media import load_audio, run_ffmpeg
from pipeline.metrics.chroma import HOP, N_FFT, chroma_cosine, chroma_cosine_clip, chroma_onehot, pool

SR = 32_000


def test_identical_audio_scores_one():
    rng = np.random.default_rng(0)
    audio = (tone(261.63, 5.0) + 0.05 * rng.standard_normal(5 * SR)).astype(np.float32)
    assert chroma_cosine([audio], [audio.copy()]) == pytest.approx(1.0, abs=1e-12)


def test_a_tone_against_e_tone_scores_zero():
    a, e = tone(440.0, 4.0), tone(329.63, 4.0)
    assert chroma_onehot(a).argmax(axis=1).tolist() == [9] * chroma_onehot(a).shape[0]  # A is bin 9 (C = 0)
    assert chroma_onehot(e).argmax(axis=1)[0] == 4  # E
    assert chroma_cosine([a], [e]) == 0.0


def test_frame_count_is_ceil_of_reference_over_hop():
    # audiocraft counts ceil(ref_len / hop) of the 1 + len // hop centered frames
    for n in (HOP * 20, HOP * 20 + 1, 50_001):
        assert chroma_cosine_clip(tone(440, n / SR), tone(440, n / SR)).frames == math.ceil(n / HOP)
    # a clip shorter than n_fft is zero-padded to n_fft first
    short = tone(440.0, 10_000 / SR)
    assert chroma_onehot(short).shape == (1 + N_FFT // HOP, 12)
    assert chroma_cosine_clip(short, short).frames == 3


def test_generated_is_cut_or_padded_to_reference_length():
    ref = tone(440.0, 3.0)
    longer = np.concatenate([tone(440.0, 3.0), tone(329.63, 5.0)])  # the E part lies past the reference: ignored
    assert chroma_cosine_clip(longer, ref).value == 1.0
    shorter = tone(440.0, 1.5)  # zero-padded: the padded frames are all-zero, argmax C, against A
    score = chroma_cosine_clip(shorter, ref)
    assert 0.3 < score.value < 0.7 and score.frames == math.ceil(3 * SR / HOP)


def test_near_silence_counts_as_c_like_the_float32_reference():
    # energy below float32's range is zero in audiocraft (torch float32), so argmax falls on the first bin, C
    rng = np.random.default_rng(0)
    whisper = (1e-36 * rng.standard_normal(3 * SR)).astype(np.float32)
    assert (chroma_onehot(whisper).argmax(axis=1) == 0).all()
    assert chroma_cosine([whisper], [tone(261.63, 3.0)]) == 1.0  # C tone vs silence: a quirk of the definition
    assert chroma_cosine([whisper], [tone(440.0, 3.0)]) == 0.0


def test_pooling_is_frame_weighted_not_a_mean_of_clips():
    long_match = chroma_cosine_clip(tone(440, 10.0), tone(440, 10.0))  # 79 frames at 1.0
    short_miss = chroma_cosine_clip(tone(440, 1.0), tone(329.63, 1.0))  # 8 frames at 0.0
    assert pool([long_match, short_miss]) == pytest.approx(79 / 87)
    assert chroma_cosine([tone(440, 10.0), tone(440, 1.0)], [tone(440, 10.0), tone(329.63, 1.0)]) == pytest.approx(
        79 / 87)


# Agreed values: audiocraft's ChromaCosineSimilarityMetric (torch 2.14.1, torchaudio 2.11.0) on the same 32 kHz mono
# arrays gave these (cosine sum / frames). Generated = reference re-encoded as 48 kbit/s MP3, or another piece.
REGRESSION = [
    # (reference, generated, first seconds, audiocraft value, frames)
    ("brahms_hungarian_dance5_us_army_strings.ogg", "mp3_48k", 30, 0.995745, 235),
    ("kevin_macleod_vibe_ace.ogg", "raylib_country.mp3", 30, 0.080851, 235),
    ("sfml_doodle_pop.ogg", "kevin_macleod_freepd_30s.mp3", 30, 0.148936, 188),
    ("sorohan_solo_trumpet_5s.ogg", "brahms_hungarian_dance5_us_army_strings.ogg", 30, 0.095238, 42),
    ("kevin_macleod_freepd_30s.mp3", "sfml_doodle_pop.ogg", 30, 0.208511, 235),
]


@pytest.mark.parametrize("reference,generated,seconds,expected,frames", REGRESSION, ids=lambda x: str(x)[:12])
def test_matches_audiocraft_on_real_music(shared_data, tmp_path, reference, generated, seconds, expected, frames):
    music = shared_data / "music"
    ref = load_audio(music / reference, SR, duration_s=seconds)[0][0]
    if generated == "mp3_48k":
        wav = write_wav(tmp_path / "ref.wav", ref, SR)
        run_ffmpeg(["-i", str(wav), "-c:a", "libmp3lame", "-b:a", "48k", str(tmp_path / "gen.mp3")], wav)
        gen = load_audio(tmp_path / "gen.mp3", SR)[0][0]
    else:
        gen = load_audio(music / generated, SR, duration_s=seconds)[0][0]
    score = chroma_cosine_clip(gen, ref)
    assert score.frames == frames
    assert score.value == pytest.approx(expected, abs=1e-4)
