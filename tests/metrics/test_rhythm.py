"""Beat and onset F-measure, tempo accuracy with octave errors apart, and Krumhansl-Schmuckler key finding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metrics_synth import clicks

from pipeline.metrics.rhythm import (
    KK_MINOR,
    Key,
    beat_f1,
    chroma_profile,
    chroma_track,
    estimate_beats,
    estimate_key,
    estimate_onsets,
    frame_chroma,
    key_accuracy,
    key_from_chroma,
    key_weighted_score,
    onset_f1,
    parse_key,
    tempo_accuracy,
    tempo_from_beats,
)

SR = 22_050


def test_beat_f1_has_a_70_ms_window():
    ref = np.arange(0.5, 10, 0.5)
    assert beat_f1(ref, ref) == 1.0
    assert beat_f1(ref + 0.06, ref) == 1.0
    assert beat_f1(ref + 0.1, ref) == 0.0
    assert beat_f1(ref[::2], ref) == pytest.approx(2 * 1 * (10 / 19) / (1 + 10 / 19))  # precision 1, recall 10/19
    assert beat_f1([], ref) == 0.0
    assert math.isnan(beat_f1(ref, []))
    assert beat_f1(ref[ref >= 5], ref, trim_s=5.0) == 1.0  # MIREX-style trimming is available, off by default


def test_onset_f1_has_a_50_ms_window():
    ref = np.array([0.5, 1.3, 2.0, 3.7])
    assert onset_f1(ref + 0.04, ref) == 1.0
    assert onset_f1(ref + 0.06, ref) == 0.0
    assert onset_f1([], ref) == 0.0


def test_tempo_accuracy_counts_octave_errors_apart():
    assert tempo_accuracy(124.8, 120.0).correct  # exactly 4 %
    assert not tempo_accuracy(125.0, 120.0).correct
    double, half = tempo_accuracy(240.0, 120.0), tempo_accuracy(61.0, 120.0)
    assert (double.correct, double.double, double.half) == (False, True, False)
    assert (half.correct, half.double, half.half) == (False, False, True)
    assert tempo_accuracy(100.0, 120.0) == tempo_accuracy(100.0, 120.0).__class__(False, False, False)
    with pytest.raises(ValueError):
        tempo_accuracy(120.0, 0.0)


def test_clicks_give_their_tempo_beats_and_onsets():
    times = list(np.arange(0.5, 12.0, 0.5))  # 120 BPM
    audio = clicks(times, 12.5, SR)
    tempo, beats = estimate_beats(audio, SR)
    assert tempo_accuracy(tempo, 120.0).correct
    assert beat_f1(beats, times) > 0.9
    assert onset_f1(estimate_onsets(audio, SR), times) == 1.0


def test_tempo_is_that_of_the_tracked_beats_to_within_one_percent():
    """131.8 BPM falls between two of librosa's tempogram values (129.2 and 136.0): the tempo of the tracked beats is
    within 1 %, also with a click missing and an extra click between two beats."""
    period = 60.0 / 131.8
    times = list(0.3 + period * np.arange(30))
    for clicks_at in (times, times[:12] + times[13:] + [times[20] + 0.4 * period]):
        tempo, beats = estimate_beats(clicks(sorted(clicks_at), 15.0, SR), SR)
        assert abs(tempo - 131.8) < 0.01 * 131.8, tempo
    assert tempo_from_beats(np.array([1.0, 1.5]), 97.0) == 97.0  # too few beats: the fallback
    assert tempo_from_beats(np.array([0.0, 0.5, 1.0, 2.0, 2.5]), 0.0) == pytest.approx(120.0)  # a gap is left out
    assert tempo_from_beats(np.array([0.0, 0.5, 1.5]), 0.0) == pytest.approx(80.0)  # two unlike intervals: median


def test_parse_key_normalises_names():
    assert parse_key("Db", "major") == Key("C#", "major")
    assert parse_key("a", "min") == Key("A", "minor")
    assert parse_key("F# minor") == Key("F#", "minor")
    assert parse_key("Bb", "Major") == Key("A#", "major")
    with pytest.raises(ValueError, match="not a key tonic"):
        parse_key("H")
    with pytest.raises(ValueError, match="not a key mode"):
        parse_key("C", "dorian")


def test_key_from_chroma_finds_the_rotated_profile():
    assert key_from_chroma(np.roll(KK_MINOR, 9)) == Key("A", "minor")
    assert key_accuracy(Key("A", "minor"), parse_key("A", "minor")) == 1.0
    assert key_accuracy(Key("C", "major"), Key("A", "minor")) == 0.0
    assert key_weighted_score(Key("C", "major"), Key("A", "minor")) == pytest.approx(0.3)  # relative
    assert key_weighted_score(Key("G", "major"), Key("C", "major")) == pytest.approx(0.5)  # fifth


def _melody(midi_notes, seconds_each=0.4):
    t = np.arange(int(seconds_each * SR)) / SR
    env = np.exp(-3 * t)
    notes = []
    for m in midi_notes:
        f = 440.0 * 2 ** ((m - 69) / 12)
        notes.append(sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)) * env)
    return (0.2 * np.concatenate(notes)).astype(np.float32)


@pytest.mark.parametrize("tonic_midi,scale,key", [
    (62, [0, 2, 4, 5, 7, 9, 11], Key("D", "major")),
    (57, [0, 2, 3, 5, 7, 8, 11], Key("A", "minor")),
])
def test_estimate_key_on_a_scale_and_tonic_triad(tonic_midi, scale, key):
    triad = [0, scale[2], 7]
    notes = [tonic_midi + s for s in scale] + [tonic_midi + s for s in triad] * 3 + [tonic_midi]
    assert estimate_key(_melody(notes), SR) == key


def test_chroma_profile_sums_to_one_and_peaks_on_the_notes_played():
    """A D major triad held: the profile (what the harmony head learns) is 12 values summing to 1, D, F# and A on
    top; key_from_chroma of it is what estimate_key says."""
    notes = [62, 66, 69] * 4
    audio = _melody(notes)
    profile = chroma_profile(audio, SR)
    assert profile.shape == (12,) and profile.dtype == np.float32 and abs(float(profile.sum()) - 1.0) < 1e-5
    assert set(np.argsort(profile)[-3:]) == {2, 6, 9}
    assert key_from_chroma(profile) == estimate_key(audio, SR)
    with pytest.raises(ValueError, match="silent"):
        chroma_profile(np.zeros(SR, np.float32), SR)


def test_chroma_track_follows_the_chord_in_each_window():
    """A C major triad, then an F major one: the rows around times in each half peak on that triad, every row sums to
    1, a window past the end is flat, and the profile is chroma_profile's."""
    def chord(notes):  # the triad struck together every 0.4 s
        return sum(_melody([n] * 6) for n in notes)

    audio = np.concatenate([chord([60, 64, 67]), chord([65, 69, 72])])
    half = len(audio) / SR / 2
    profile, rows = chroma_track(audio, SR, np.array([half / 2, 1.5 * half, 10 * half]))
    np.testing.assert_allclose(profile, chroma_profile(audio, SR), atol=1e-6)
    assert rows.shape == (3, 12) and rows.dtype == np.float32 and np.allclose(rows.sum(1), 1.0, atol=1e-5)
    assert set(np.argsort(rows[0])[-3:]) == {0, 4, 7} and set(np.argsort(rows[1])[-3:]) == {5, 9, 0}
    np.testing.assert_allclose(rows[2], np.full(12, 1 / 12), atol=1e-6)


def test_frame_chroma_names_the_chord_at_each_token_frame():
    """A C major triad then an F major one (22.05 kHz in, resampled to 32 kHz): at 25 frames a second each frame's
    row peaks on the triad sounding then, rows sum to 1, and frames past the end or in silence are flat."""
    def chord(notes):
        return sum(_melody([n] * 6) for n in notes)

    audio = np.concatenate([chord([60, 64, 67]), np.zeros(SR // 2, np.float32), chord([65, 69, 72])])
    first, gap = len(chord([60])) / SR, 0.5
    n = int((len(audio) / SR + 1.0) * 25)  # one second more than the audio
    rows = frame_chroma(audio, SR, 25.0, n)
    assert rows.shape == (n, 12) and rows.dtype == np.float32 and np.allclose(rows.sum(1), 1.0, atol=1e-5)
    t = np.arange(n) / 25.0
    c_frames = (t > 0.2) & (t < first - 0.2)
    f_frames = (t > first + gap + 0.2) & (t < len(audio) / SR - 0.2)
    assert all(set(np.argsort(r)[-3:]) == {0, 4, 7} for r in rows[c_frames])
    assert all(set(np.argsort(r)[-3:]) == {5, 9, 0} for r in rows[f_frames])
    flat = np.full(12, 1 / 12)
    np.testing.assert_allclose(rows[t > len(audio) / SR + 0.2], np.broadcast_to(flat, rows[t > len(audio) / SR
                                                                                            + 0.2].shape), atol=1e-6)
    np.testing.assert_allclose(rows[np.argmin(np.abs(t - (first + gap / 2)))], flat, atol=1e-6)


def test_silent_audio_has_no_key():
    with pytest.raises(ValueError, match="silent"):
        estimate_key(np.zeros(SR, np.float32), SR)
