"""separate: the real Demucs code path with a small random HTDemucs in a local repo dir, pass-through, bad input,
out-of-memory fallbacks and the error when no weights can be found."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from pipeline import separate
from pipeline.config import BaseConfig, SeparateConfig
from pipeline.media import write_wav
from pipeline.shards import read_manifest, sha256_file, write_manifest

BASE = BaseConfig(seed=0, clip_seconds=1.5, fps=12, sample_rate=16000)


@pytest.fixture(scope="module")
def demucs_repo(tmp_path_factory) -> Path:
    """A Demucs local repo (htdemucs.yaml + tiny.th) holding a small randomly initialised HTDemucs."""
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], samplerate=8000, segment=Fraction(1),
                     channels=8, depth=3, nfft=512, t_layers=1, t_heads=2, dconv_comp=4)
    args, kwargs = model._init_args_kwargs
    repo = tmp_path_factory.mktemp("demucs_repo")
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": model.state_dict()}, repo / "tiny.th")
    (repo / "htdemucs.yaml").write_text("models: ['tiny']\n")
    return repo


def tone(seconds: float, channels: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * BASE.sample_rate)) / BASE.sample_rate
    rng = np.random.default_rng(seed)
    mono = 0.3 * np.sin(2 * np.pi * 220 * (1 + seed) * t) + 0.05 * rng.standard_normal(len(t))
    return np.stack([mono * (0.8 + 0.2 * c) for c in range(channels)]).astype(np.float32)


def upstream(tmp_path: Path, channels: int = 1, n: int = 3, corrupt: bool = False) -> Path:
    """An ingest manifest with n ok tracks (+ one skipped upstream row, + a corrupt wav when asked)."""
    rows = []
    for i in range(n):
        wav = tmp_path / "audio" / f"t{i}.wav"
        wav.parent.mkdir(exist_ok=True)
        write_wav(wav, tone(1.5 - 0.25 * i, channels, i), BASE.sample_rate)
        rows.append({"id": f"t{i}", "split": "train", "status": "ok", "reason": "", "error": "",
                     "clip_path": "", "audio_path": str(wav), "duration_s": 1.5, "source_sha256": f"s{i}",
                     "params_hash": "p", "caption": f"track {i}"})
    rows.append({"id": "gone", "split": "test", "status": "skipped", "reason": "no_audio", "error": "x",
                 "clip_path": "", "audio_path": "", "source_sha256": "", "params_hash": "p", "caption": ""})
    if corrupt:
        bad = tmp_path / "audio" / "bad.wav"
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
        rows.append({**rows[0], "id": "bad", "audio_path": str(bad), "source_sha256": "sbad"})
    write_manifest(tmp_path / "ingest.parquet", rows)
    return tmp_path / "ingest.parquet"


def test_htdemucs_from_local_repo_stems_add_up_and_outputs_are_right(tmp_path, demucs_repo):
    cfg = SeparateConfig(model="htdemucs", weights_dir=str(demucs_repo), shifts=1, overlap=0.25)
    kind, files = separate.find_weights("htdemucs", str(demucs_repo))
    assert kind == "local" and files[0] == demucs_repo / "htdemucs.yaml"
    model = separate.load_model("htdemucs", kind, files)
    for channels in (1, 2):
        mix = tone(1.3, channels, 3)
        vocals, instrumental = separate.split_vocals(model, mix, BASE.sample_rate, 1.0, 0.25, 1, "cpu", seed=7)
        assert vocals.shape == instrumental.shape == mix.shape
        assert np.isfinite(vocals).all() and np.isfinite(instrumental).all()
        np.testing.assert_allclose(vocals + instrumental, mix, atol=1e-6)  # the two stems add up to the mix
        assert np.abs(vocals).max() > 1e-4  # the model did something
        again = separate.split_vocals(model, mix, BASE.sample_rate, 1.0, 0.25, 1, "cpu", seed=7)[0]
        np.testing.assert_array_equal(vocals, again)  # shifts are seeded: reruns give the same audio

    frame, processed = separate.run(upstream(tmp_path, channels=2, corrupt=True), tmp_path / "music", BASE, cfg)
    status = dict(zip(frame["id"], zip(frame["status"], frame["reason"], strict=True), strict=True))
    assert status == {"t0": ("ok", ""), "t1": ("ok", ""), "t2": ("ok", ""), "gone": ("skipped", "upstream_skipped"),
                      "bad": ("failed", "corrupt")}
    assert processed == 4 and "bad.wav" in frame.set_index("id").loc["bad", "error"]
    assert list(frame["caption"][:3]) == ["track 0", "track 1", "track 2"]  # labels pass through
    for rec in frame[frame["status"] == "ok"].to_dict("records"):
        audio, rate = sf.read(rec["music_path"], always_2d=True)
        source, _ = sf.read(tmp_path / "audio" / f"{rec['id']}.wav", always_2d=True)
        assert rate == rec["sample_rate"] == BASE.sample_rate and audio.shape == source.shape and rec["channels"] == 2
        assert np.isfinite(audio).all() and rec["duration_s"] == pytest.approx(len(source) / BASE.sample_rate)
    assert read_manifest(tmp_path / "music" / "manifest.parquet").columns[:9].tolist() == [
        "id", "split", "status", "reason", "error", "music_path", "duration_s", "sample_rate", "channels"]

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "music").glob("*.wav")}
    frame, processed = separate.run(tmp_path / "ingest.parquet", tmp_path / "music", BASE, cfg)
    assert processed == 0 and before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "music").glob("*.wav")}
    relabelled = read_manifest(tmp_path / "ingest.parquet").assign(split="test")  # new splits upstream
    write_manifest(tmp_path / "ingest.parquet", relabelled.to_dict("records"))
    frame, processed = separate.run(tmp_path / "ingest.parquet", tmp_path / "music", BASE, cfg)
    assert processed == 0 and set(frame["split"]) == {"test"}


def test_pass_through_copies_the_audio(tmp_path):
    frame, _ = separate.run(upstream(tmp_path, n=2), tmp_path / "music", BASE, SeparateConfig(model="none"))
    assert list(frame["status"]) == ["ok", "ok", "skipped"]
    for rec in frame.head(2).to_dict("records"):
        assert sha256_file(rec["music_path"]) == sha256_file(tmp_path / "audio" / f"{rec['id']}.wav")
    # a track at another rate is resampled to base.sample_rate
    other = BaseConfig(seed=0, clip_seconds=1.5, fps=12, sample_rate=8000)
    frame, processed = separate.run(tmp_path / "ingest.parquet", tmp_path / "music8k", other,
                                    SeparateConfig(model="none"))
    rec = frame.iloc[0]
    assert processed == 2 and rec["sample_rate"] == 8000 and sf.info(rec["music_path"]).samplerate == 8000
    assert sf.info(rec["music_path"]).frames == 12000


def oom(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_retries_smaller_then_cpu_then_fails(tmp_path, demucs_repo, monkeypatch):
    real = separate._apply
    calls = []

    def small_segments_only(model, mix, **kwargs):
        calls.append((kwargs["device"], kwargs["segment"]))
        return oom() if kwargs["segment"] > 0.6 else real(model, mix, **kwargs)

    monkeypatch.setattr(separate, "_apply", small_segments_only)
    cfg = SeparateConfig(model="htdemucs", weights_dir=str(demucs_repo), device="cpu", shifts=0)
    frame, _ = separate.run(upstream(tmp_path, n=1), tmp_path / "a", BASE, cfg)
    assert frame.iloc[0]["status"] == "ok" and frame.iloc[0]["segment_s"] == 0.5 and calls[:2] == [("cpu", 1.0),
                                                                                                   ("cpu", 0.5)]

    def gpu_runs_out(model, mix, **kwargs):
        return oom() if kwargs["device"] != "cpu" else real(model, mix, **kwargs)

    monkeypatch.setattr(separate, "_apply", gpu_runs_out)
    cfg = SeparateConfig(model="htdemucs", weights_dir=str(demucs_repo), device="cuda", shifts=0)
    frame, _ = separate.run(tmp_path / "ingest.parquet", tmp_path / "b", BASE, cfg)
    assert (frame.iloc[0]["status"], frame.iloc[0]["device"], frame.iloc[0]["segment_s"]) == ("ok", "cpu", 0.5)

    monkeypatch.setattr(separate, "_apply", oom)
    frame, _ = separate.run(tmp_path / "ingest.parquet", tmp_path / "c", BASE, cfg)
    assert (frame.iloc[0]["status"], frame.iloc[0]["reason"]) == ("failed", "oom")
    assert "out of memory" in frame.iloc[0]["error"]


def test_no_weights_says_where_it_looked_and_how_to_provide_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as info:
        separate.run(upstream(tmp_path, n=1), tmp_path / "music", BASE,
                     SeparateConfig(model="htdemucs", weights_dir=str(tmp_path / "nowhere")))
    message = str(info.value)
    for expected in (str(tmp_path / "nowhere"), str(tmp_path / "hf"), str(tmp_path / "torch"), "955717e8-8726e21a.th",
                     "separate.weights_dir", "get_model('htdemucs')", "separate.model: none"):
        assert expected in message, expected


def test_main_writes_the_contract_tokenize_reads(tmp_path):
    manifest = upstream(tmp_path, n=2)
    params = tmp_path / "params.yaml"
    params.write_text("base: {sample_rate: 16000}\nseparate: {model: none}\n")
    assert separate.main(["--params", str(params), "--ingest", str(manifest), "--out", str(tmp_path / "m")]) == 0
    frame = pd.read_parquet(tmp_path / "m" / "manifest.parquet")
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 2 and all(Path(p).exists() for p in ok["music_path"])
