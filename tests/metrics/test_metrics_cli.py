"""`v2m metrics` end to end on generated folders: pairing by stem, the JSON shape, per-metric pooling, labels,
videos, and every problem (missing pair, unreadable file, silence, missing video or label) reported by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metrics_synth import clicks, jump_video, tone, write_wav

from pipeline.cli import main as v2m
from pipeline.metrics.cli import index_folder, main, read_labels

SR = 32_000
FPS = 12
BEATS = [k / FPS for k in (6, 12, 18, 24, 30, 36, 42, 48, 54)]  # every 0.5 s from 0.5 s: 120 BPM


def _music(freq, seconds=5.0):
    return tone(freq, seconds, SR, 0.2) + clicks(BEATS, seconds, SR)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_cli")
    gen, ref, vid = root / "gen", root / "ref", root / "videos"
    for d in (gen, ref, vid):
        d.mkdir()
    write_wav(gen / "a.wav", _music(440.0), SR)  # same as its reference
    write_wav(ref / "a.wav", _music(440.0), SR)
    (ref / "a.mp4").write_bytes(b"never read: .wav wins for the stem")
    write_wav(gen / "b.wav", _music(329.63), SR)  # E against A: chroma 0
    write_wav(ref / "b.wav", _music(440.0, 3.0), SR)  # shorter reference: generated cut to 3 s
    write_wav(gen / "c.wav", np.zeros(SR * 2, np.float32), SR)  # silent
    write_wav(ref / "c.wav", _music(440.0, 2.0), SR)
    (gen / "d.wav").write_bytes(b"RIFF this is not audio")  # unreadable
    write_wav(ref / "d.wav", _music(440.0, 2.0), SR)
    write_wav(gen / "only_generated.wav", _music(440.0, 1.0), SR)
    write_wav(ref / "only_reference.wav", _music(440.0, 1.0), SR)
    (gen / "notes.txt").write_text("not media")
    jump_video(vid / "a.mp4", [round(t * FPS) for t in BEATS], 60, FPS)
    labels = root / "labels.csv"
    labels.write_text("id,tempo_bpm,beat_times,key,mode\n"
                      f'a,120,"{json.dumps(BEATS)}",A,major\n'
                      f"b,60,{';'.join(map(str, BEATS))},C,major\n")
    return root


def test_index_folder_pairs_by_stem_and_prefers_audio(folders):
    index = index_folder(folders / "ref", (".wav", ".mp4"))
    assert index["a"].name == "a.wav" and "notes" not in index_folder(folders / "gen", (".wav",))


def test_read_labels_accepts_json_and_semicolon_beats(folders):
    labels = read_labels(folders / "labels.csv")
    assert labels["a"].beats.tolist() == pytest.approx(BEATS) and labels["b"].beats.tolist() == pytest.approx(BEATS)
    assert labels["a"].tempo_bpm == 120 and str(labels["b"].key) == "C major"
    bad = folders / "bad_labels.csv"
    bad.write_text("id,beat_times\nx,[0.5\n")
    with pytest.raises(ValueError, match="bad_labels.csv: id 'x': bad label"):
        read_labels(bad)


def test_metrics_cli_end_to_end(folders, capsys):
    out, cache = folders / "metrics.json", folders / "flow_cache"
    rc = main(["--generated", str(folders / "gen"), "--reference", str(folders / "ref"), "--flow-cache", str(cache),
               "--videos", str(folders / "videos"), "--labels", str(folders / "labels.csv"), "--out", str(out)])
    assert rc == 0
    assert len(list(cache.glob("*.npy"))) == 1  # the flow of videos/a.mp4, for the next system scored
    report = json.loads(out.read_text())
    files, overall = report["files"], report["overall"]
    assert set(files) == {"a", "b", "c"}
    assert files["a"]["chroma"] == 1.0 and files["b"]["chroma"] == 0.0
    assert files["a"]["onset_f1"] == 1.0 and files["a"]["beat_f1"] > 0.9
    assert files["a"]["av_align"] == 1.0 and "av_align" not in files["b"]
    assert files["a"]["tempo_acc"] == 1.0
    assert files["b"]["tempo_acc"] == 0.0 and files["b"]["tempo_double"] == 1.0  # 120 BPM found, 60 labelled
    assert files["a"]["key_acc"] == 1.0 and files["b"]["key_acc"] == 0.0
    # chroma pools frames: a has 40 frames at 1, b 24 at 0, c 16 (silent vs A: C vs A, 0)
    assert overall["chroma"] == pytest.approx(40 / (40 + 24 + 16))
    assert overall["av_align"] == 1.0 and overall["onset_f1"] == pytest.approx(np.mean(
        [files[s]["onset_f1"] for s in files]))
    assert set(report["omitted"]) == {"kld_pq", "kld_qp", "fad"} and "classifier" in report["omitted"]["kld_pq"]
    problems = report["problems"]
    assert any("no reference" in p for p in problems["only_generated"])
    assert any("no generated file" in p for p in problems["only_reference"])
    assert any("unreadable" in p and "d.wav" in p for p in problems["d"])
    assert any("silent generated" in p for p in problems["c"])
    assert any("no video" in p for p in problems["b"]) and any("no row" in p for p in problems["c"])
    printed = capsys.readouterr().out
    assert "overall" in printed and "kld_pq: not computed" in printed and "problem: d: unreadable" in printed


def test_without_labels_beats_come_from_the_reference_and_tempo_key_are_omitted(folders):
    out = folders / "nolabels.json"
    rc = v2m(["metrics", "--generated", str(folders / "gen"), "--reference", str(folders / "ref"),
              "--out", str(out), "--metrics", "chroma,beat_f1,tempo_acc,key_acc,av_align"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["files"]["a"]["beat_f1"] == 1.0  # same audio, same estimated beats
    assert set(report["overall"]) == {"chroma", "beat_f1"}
    assert set(report["omitted"]) == {"tempo_acc", "key_acc", "av_align"}  # only those asked for
    assert "--labels" in report["omitted"]["tempo_acc"] and "--videos" in report["omitted"]["av_align"]
    assert report["inputs"]["beat_reference"] == "beats estimated from reference audio"


def test_bad_arguments_and_missing_models_exit_with_a_message(folders, tmp_path, capsys):
    args = ["--generated", str(folders / "gen"), "--reference", str(folders / "ref")]
    assert main([*args, "--metrics", "chroma,loudness"]) == 2
    assert main(["--generated", str(tmp_path / "none"), "--reference", str(folders / "ref")]) == 2
    assert main([*args, "--metrics", "kld_pq", "--passt", str(tmp_path / "passt.pt")]) == 2
    assert "passt.pt: PaSST (KLD) weights not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--generated", str(empty), "--reference", str(folders / "ref"), "--metrics", "chroma"]) == 1


def test_parallel_jobs_give_the_same_numbers(folders):
    one, two = folders / "one.json", folders / "two.json"
    base = ["--generated", str(folders / "gen"), "--reference", str(folders / "ref"), "--metrics", "chroma,onset_f1"]
    assert main([*base, "--out", str(one)]) == 0 and main([*base, "--out", str(two), "--workers", "2"]) == 0
    assert json.loads(one.read_text())["files"] == json.loads(two.read_text())["files"]


def test_model_metrics_alone_score_every_readable_pair(folders, tmp_path, capsys):
    """--metrics fad (no per-file metric beside it) embeds every readable pair: a, b and the silent c, not the
    unreadable d. Random VGGish weights in the published layout (scripts/production_weights.py): the value is
    meaningless, its presence is what is tested."""
    pytest.importorskip("torchvggish")
    from tests.conftest import load_script

    vggish = load_script("production_weights").vggish(tmp_path)
    out = tmp_path / "fad.json"
    args = ["--generated", str(folders / "gen"), "--reference", str(folders / "ref"), "--out", str(out)]
    assert main([*args, "--metrics", "fad", "--vggish", str(vggish)]) == 0
    report = json.loads(out.read_text())
    assert np.isfinite(report["overall"]["fad"]) and "fad" not in report["omitted"], report["omitted"]
    assert "no file could be scored" not in capsys.readouterr().out
    assert main([*args, "--metrics", "fad"]) == 1  # nothing computable at all: an error, not an empty success
    assert "fad: not computed: needs an embedder" in capsys.readouterr().out
