"""AV-Align: cases known by construction, the reference's matching and peak rules, and regression values that
TempoTokens' own av_align.py (2025 version) gave on real clips (see the cross-check in the metrics issue)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metrics_synth import clicks, jump_video, write_wav

from pipeline.media import MediaError, load_audio, run_ffmpeg
from pipeline.metrics.av_align import av_align, find_peaks, flow_magnitudes, onset_times, peak_iou, video_peaks

FPS = 12
JUMPS = [10, 22, 34, 46]


@pytest.fixture(scope="module")
def jumps_video(tmp_path_factory):
    return video_peaks(jump_video(tmp_path_factory.mktemp("av") / "jumps.mp4", JUMPS, 60, FPS))


def test_flow_peaks_sit_on_the_motion_frames(jumps_video):
    assert jumps_video.fps == FPS
    assert len(jumps_video.magnitudes) == 60
    assert np.round(jumps_video.peaks * FPS).astype(int).tolist() == JUMPS
    assert jumps_video.magnitudes[JUMPS].min() > 2.5  # a 3 px shift of the whole frame


def test_onsets_on_the_peaks_score_one_and_two_frames_late_score_zero(jumps_video):
    on_time = clicks([k / FPS for k in JUMPS], 5.0)
    late = clicks([(k + 2) / FPS for k in JUMPS], 5.0)
    assert av_align(jumps_video, on_time, 22_050) == 1.0
    assert av_align(jumps_video, late, 22_050) == 0.0


def test_av_align_reads_the_video_file_and_any_sample_rate(tmp_path):
    video = jump_video(tmp_path / "v.mp4", JUMPS, 60, FPS)
    import librosa

    audio = librosa.resample(clicks([k / FPS for k in JUMPS], 5.0), orig_sr=22_050, target_sr=48_000)
    stereo = np.stack([audio, audio])
    assert av_align(video, stereo, 48_000) == 1.0


def test_flow_cache_gives_the_same_trajectory(tmp_path):
    video = jump_video(tmp_path / "v.mp4", JUMPS, 30, FPS)
    fresh = video_peaks(video, tmp_path / "cache")
    [cached_file] = (tmp_path / "cache").glob("*.npy")
    again = video_peaks(video, tmp_path / "cache")
    assert np.array_equal(fresh.magnitudes, again.magnitudes) and np.array_equal(fresh.peaks, again.peaks)
    np.save(cached_file, np.zeros(30))  # proof that the second call read the cache
    assert len(video_peaks(video, tmp_path / "cache").peaks) == 0


def test_matching_is_one_to_one_and_strict():
    fps = 10.0  # tolerance 0.1 s, strict on both sides
    assert peak_iou([1.0, 1.05], [1.0], fps) == pytest.approx(1 / 2)  # one video peak serves one audio peak
    assert peak_iou([1.0], [1.0, 1.05], fps) == pytest.approx(1 / 2)
    assert peak_iou([1.1], [1.0], fps) == 0.0  # exactly 1/fps away: no match (strict <)
    assert peak_iou([1.0999], [1.0], fps) == 1.0
    assert peak_iou([], [1.0, 2.0], fps) == 0.0
    assert math.isnan(peak_iou([], [], fps))
    # in time order each audio peak takes the first unused video peak
    assert peak_iou([1.06, 1.12], [1.0, 1.09], fps) == 1.0


def test_peaks_are_strict_local_maxima_of_at_least_a_tenth():
    m = np.array([0.0, 0.5, 0.2, 0.3, 0.3, 0.2, 0.09, 0.05, 0.08, 1.0])
    # 0.5 at 1: peak; 0.3 plateau: no; 0.09 is a local max below 0.1... (0.2 > 0.09) not a max anyway; last: never
    assert (find_peaks(m, 10.0) * 10).round().astype(int).tolist() == [1]
    assert (find_peaks(np.array([0.0, 0.09, 0.0, 0.1, 0.0]), 1.0)).tolist() == [3.0]


def test_first_frame_repeats_the_first_pair():
    frames = [np.zeros((32, 32), np.uint8)] * 3
    mags = flow_magnitudes(iter(frames))
    assert len(mags) == 3 and mags[0] == mags[1]
    assert len(flow_magnitudes(iter(frames[:1]))) == 0


def test_a_video_without_frames_is_an_error(tmp_path):
    wav = write_wav(tmp_path / "a.wav", np.zeros(1000, np.float32), 16_000)
    with pytest.raises(MediaError, match="a.wav"):
        video_peaks(wav)


def test_silence_has_no_onsets():
    assert len(onset_times(np.zeros(22_050 * 2, np.float32), 22_050)) == 0


# Agreed values: TempoTokens' own av_align.py (cv2.VideoCapture frames, librosa.load of the wav) on each clip's
# soundtrack extracted to 16-bit wav. Its trajectories and ours differ by < 1e-10. (audio onsets, video peaks, score)
REGRESSION = [
    ("videos_with_music/tears_of_steel_2s.webm", 15, 13, 5 / 15),
    pytest.param("videos/mdn_toy_frog_8s.webm", 8, 64, 5 / 67, marks=pytest.mark.slow),
    pytest.param("videos/mdn_toy_rabbit_8s.webm", 11, 73, 7 / 77, marks=pytest.mark.slow),
    pytest.param("videos_with_music/sintel_excerpt_26s.mp4", 32, 157, 19 / 170, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("video,n_audio,n_video,expected", REGRESSION, ids=lambda x: str(x).split("/")[-1])
def test_matches_tempotokens_on_real_clips(shared_data, tmp_path, video, n_audio, n_video, expected):
    wav = tmp_path / "soundtrack.wav"
    run_ffmpeg(["-i", str(shared_data / video), "-vn", "-c:a", "pcm_s16le", str(wav)], wav)
    audio, sr = load_audio(wav, mono=False)
    peaks = video_peaks(shared_data / video)
    onsets = onset_times(audio, sr)
    assert (len(onsets), len(peaks.peaks)) == (n_audio, n_video)
    assert peak_iou(onsets, peaks.peaks, peaks.fps) == pytest.approx(expected, abs=1e-4)
