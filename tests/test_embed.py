"""embed: incremental shards (count the encoder calls), per-stream encoder hashes, bad clips, rank splits (in process
and under torchrun), SIGKILL then rerun, the reader API, the flow descriptor, and the report on SynthV2M."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import embed
from pipeline.config import FlowEncoderConfig, Params, deep_merge, params_from_dict, to_dict
from pipeline.encoders import flow as flow_enc
from pipeline.encoders.streams import Encoders, sample_frames, sample_indices
from pipeline.runtime import set_threads
from pipeline.shards import Item, load_features, sha256_file, shard_of, write_manifest
from tests.conftest import ffmpeg, make_video

REPO = Path(__file__).resolve().parents[1]


def make_params(tmp: Path, **embed_overrides) -> Params:
    cfg = {"encoders_dir": str(tmp / "encoders"), "num_shards": 4, "report_path": str(tmp / "flow_beats.png"),
           "report_clips": 2, "threads": 1, "flow_fps": 8.0, **embed_overrides}  # 8 fps: small, fast tests
    return params_from_dict({"base": {"clip_seconds": 2.0, "fps": 12}, "embed": cfg})


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """One real 2 s H.264 clip (testsrc moves), copied under many ids: cheap inputs for many-video tests."""
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=2.0, size="96x64", rate="12", audio=None)


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("enc")
    embed.init_encoders(make_params(root))
    return root


def fake_ingest(tmp: Path, clip: Path, n: int, changed: dict[str, str] | None = None,
                bad: dict[str, bytes | None] | None = None) -> Path:
    """An ingest manifest of n ok clips v000.. (+ one skipped row); `bad` replaces a clip by bytes (None: no file)."""
    changed, bad = changed or {}, bad or {}
    rows = []
    (tmp / "clips").mkdir(exist_ok=True)
    for i in range(n):
        item_id = f"v{i:03d}"
        path = tmp / "clips" / f"{item_id}.mp4"
        if item_id in bad:
            path.unlink(missing_ok=True)
            if bad[item_id] is not None:
                path.write_bytes(bad[item_id])
        elif not path.exists():
            os.link(clip, path)
        rows.append({"id": item_id, "split": "train", "status": "ok", "reason": "", "error": "",
                     "clip_path": str(path), "audio_path": "", "duration_s": 2.0, "n_frames": 24, "fps": 12,
                     "source_sha256": changed.get(item_id, "sha0"), "params_hash": "p", "tempo_bpm": 120.0,
                     "beat_times": json.dumps([0.25, 0.75, 1.25, 1.75])})
    rows.append({"id": "gone", "split": "train", "status": "failed", "reason": "corrupt", "error": "x",
                 "clip_path": "", "audio_path": "", "source_sha256": "", "params_hash": "p"})
    write_manifest(tmp / "ingest.parquet", rows)
    return tmp / "ingest.parquet"


class Calls:
    """Counts the compute calls FeatureStore makes, per stream, by id."""

    def __init__(self, monkeypatch):
        self.ids: dict[str, list[str]] = {"clip": [], "flow": []}
        for stream in ("clip", "flow"):
            real = getattr(Encoders, stream)

            def counted(encoders, item, _real=real, _stream=stream):
                self.ids[_stream].append(item.id)
                return _real(encoders, item)

            monkeypatch.setattr(Encoders, stream, counted)

    def take(self) -> dict[str, list[str]]:
        out = {k: sorted(v) for k, v in self.ids.items()}
        for v in self.ids.values():
            v.clear()
        return out


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name in ("clip", "flow") and p.name != "store.json"}


def test_adding_one_video_to_40_computes_that_video_only(tmp_path, clip, encoders_dir, monkeypatch):
    calls, params, out = Calls(monkeypatch), make_params(encoders_dir), tmp_path / "features"
    result = embed.run(params, fake_ingest(tmp_path, clip, 40), out)
    ids = [f"v{i:03d}" for i in range(40)]
    assert calls.take() == {"clip": ids, "flow": ids}
    manifest = result["manifest"].set_index("id")
    assert (manifest.loc[ids, "status"] == "ok").all() and manifest.loc["gone", "reason"] == "upstream_failed"
    assert set(manifest.loc[ids, "clip_n_frames"]) == {4} and set(manifest.loc[ids, "flow_n_frames"]) == {16}
    assert manifest.loc["v000", "beat_times"] == json.dumps([0.25, 0.75, 1.25, 1.75])  # labels pass through
    before = files(out)

    embed.run(params, fake_ingest(tmp_path, clip, 40), out)  # nothing changed: no call, no shard rewritten
    assert calls.take() == {"clip": [], "flow": []}
    assert {k: v for k, v in files(out).items() if k != "manifest.parquet"} == \
        {k: v for k, v in before.items() if k != "manifest.parquet"}

    embed.run(params, fake_ingest(tmp_path, clip, 41), out)  # one new video: one call per stream, one shard each
    assert calls.take() == {"clip": ["v040"], "flow": ["v040"]}
    after = files(out)
    rewritten = {k.split(".")[0] for k in after if after[k] != before.get(k) and k[-4:] in (".npy", "json", "quet")}
    shard = f"{shard_of('v040', 4):05d}"
    assert rewritten - {"manifest", "report"} == {f"clip/{shard}", f"flow/{shard}", f"scene/{shard}"}

    embed.run(params, fake_ingest(tmp_path, clip, 41, changed={"v007": "sha1"}), out)  # a changed source
    assert calls.take() == {"clip": ["v007"], "flow": ["v007"]}


def test_changing_flow_fps_recomputes_the_flow_stream_only(tmp_path, clip, encoders_dir, monkeypatch):
    calls, out = Calls(monkeypatch), tmp_path / "features"
    manifest = fake_ingest(tmp_path, clip, 6)
    embed.run(make_params(encoders_dir), manifest, out)
    calls.take()
    clip_files = files(out / "clip")
    result = embed.run(make_params(encoders_dir, flow_fps=4.0), manifest, out)
    assert calls.take() == {"clip": [], "flow": [f"v{i:03d}" for i in range(6)]}
    assert files(out / "clip") == clip_files  # the CLIP shards were not even rewritten
    assert set(result["manifest"]["flow_n_frames"].dropna()) == {8} and set(result["manifest"]["flow_fps"].dropna()) \
        == {4.0}
    embed.run(make_params(encoders_dir, flow_fps=4.0, clip={"batch_size": 3}), manifest, out)  # not in the hash
    assert calls.take() == {"clip": [], "flow": []}


def test_bad_clips_are_failed_rows_and_the_rest_finish(tmp_path, clip, encoders_dir, monkeypatch):
    calls = Calls(monkeypatch)
    manifest = fake_ingest(tmp_path, clip, 8, bad={"v002": os.urandom(30_000), "v005": None})
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(deep_merge(to_dict(make_params(encoders_dir)), {"embed": {"max_fail_ratio": 0.5}})))
    out = tmp_path / "features"
    assert embed.main(["--params", str(params), "--ingest", str(manifest), "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "manifest.parquet").set_index("id")
    assert (frame.loc["v002", "status"], frame.loc["v002", "reason"]) == ("failed", "corrupt")
    assert (frame.loc["v005", "status"], frame.loc["v005", "reason"]) == ("failed", "missing")
    assert "v002.mp4" in frame.loc["v002", "error"] and frame.loc["v002", "error"].startswith("clip: ")
    assert (frame.drop(["v002", "v005", "gone"])["status"] == "ok").all()
    calls.take()  # an unchanged bad clip is not retried; a fixed one is
    embed.run(make_params(encoders_dir), fake_ingest(tmp_path, clip, 8, bad={"v005": None}), out)
    assert calls.take() == {"clip": [], "flow": []}
    (tmp_path / "clips" / "v002.mp4").unlink()
    embed.run(make_params(encoders_dir), fake_ingest(tmp_path, clip, 8, changed={"v002": "fixed"}, bad={"v005": None}),
              out)
    assert calls.take() == {"clip": ["v002"], "flow": ["v002"]}
    strict = tmp_path / "strict.yaml"
    strict.write_text(json.dumps(to_dict(make_params(encoders_dir))))  # 1 of 9 failed > 10 %: exit status 1
    assert embed.main(["--params", str(strict), "--ingest", str(manifest), "--out", str(out)]) == 1


def test_two_ranks_write_exactly_the_shards_one_process_writes(tmp_path, clip, encoders_dir):
    params, manifest = make_params(encoders_dir), fake_ingest(tmp_path, clip, 11)
    embed.run(params, manifest, tmp_path / "one")
    assert embed.run(params, manifest, tmp_path / "two", rank=1, world=2)["manifest"] is None  # rank 1: no manifest
    result = embed.run(params, manifest, tmp_path / "two", rank=0, world=2)  # rank 0 finds rank 1's marker, goes on
    assert set(result["computed"]["clip"]) == {f"v{i:03d}" for i in range(11) if shard_of(f"v{i:03d}", 4) % 2 == 0}
    assert digests(tmp_path / "one") == digests(tmp_path / "two") and len(digests(tmp_path / "one")) >= 12
    assert sha256_file(tmp_path / "one" / "manifest.parquet") == sha256_file(tmp_path / "two" / "manifest.parquet")


def run_embed_cli(params: Path, manifest: Path, out: Path, *launcher: str) -> subprocess.Popen:
    cmd = [sys.executable, *launcher, "-m", "pipeline.embed", "--params", str(params), "--ingest", str(manifest),
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_shards(tmp_path, clip, encoders_dir):
    params, manifest = tmp_path / "params.yaml", fake_ingest(tmp_path, clip, 9)
    params.write_text(json.dumps(to_dict(make_params(encoders_dir))))
    embed.run(make_params(encoders_dir), manifest, tmp_path / "one")
    proc = run_embed_cli(params, manifest, tmp_path / "two", "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29517")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "rank 1/2" in output and "rank 0/2" in output
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert sha256_file(tmp_path / "one" / "manifest.parquet") == sha256_file(tmp_path / "two" / "manifest.parquet")


def test_sigkill_mid_stage_then_rerun_gives_identical_shards(tmp_path, clip, encoders_dir):
    manifest = fake_ingest(tmp_path, clip, 30)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(to_dict(make_params(encoders_dir, num_shards=8))))
    embed.run(make_params(encoders_dir, num_shards=8), manifest, tmp_path / "reference")
    out = tmp_path / "killed"
    for _attempt in range(3):  # kill while some flow shards are done and others are not
        shutil.rmtree(out, ignore_errors=True)
        proc = run_embed_cli(params, manifest, out)
        while proc.poll() is None and len(list((out / "flow").glob("*.done.json"))) < 2:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "manifest.parquet").exists() and len(list((out / "flow").glob("*.done.json"))) < 8:
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    rerun = run_embed_cli(params, manifest, out)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert digests(out) == digests(tmp_path / "reference")
    frame = pd.read_parquet(out / "manifest.parquet")
    assert (frame["status"] == "ok").sum() == 30  # nothing lost
    assert not [p for p in out.rglob(".*.tmp*")]  # no temporary file left behind


def test_reader_api_returns_memory_mapped_arrays_by_id(tmp_path, clip, encoders_dir):
    params = make_params(encoders_dir)
    embed.run(params, fake_ingest(tmp_path, clip, 5), tmp_path / "f")
    feats = load_features(tmp_path / "f" / "flow", ["v001", "v003"])
    assert set(feats) == {"v001", "v003"} and feats["v001"].shape == (16, flow_enc.descriptor_dim(params.embed.flow))
    assert isinstance(feats["v001"], np.memmap) or isinstance(feats["v001"].base, np.memmap)
    clips = load_features(tmp_path / "f" / "clip")
    assert len(clips) == 5 and clips["v000"].shape == (4, 256) and clips["v000"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(clips["v000"], axis=1), 1.0, rtol=1e-5)
    assert np.ptp(clips["v000"], axis=0).max() > 0  # frames differ, so do their embeddings
    meta = pd.read_parquet(tmp_path / "f" / "flow" / f"{shard_of('v001', 4):05d}.index.parquet").set_index("id")
    assert meta.loc["v001", "fps"] == 8.0 and meta.loc["v001", "duration_s"] == 2.0
    assert {"offset", "n_frames", "source_hash", "encoder_hash"} <= set(meta.columns)


def test_seeded_encoder_is_identical_on_every_run(tmp_path, clip, encoders_dir):
    again = tmp_path / "again"
    embed.init_encoders(make_params(again))
    for name in ("clip/open_clip_model.safetensors", "clip/open_clip_config.json", "encoders.json"):
        assert sha256_file(again / "encoders" / name) == sha256_file(encoders_dir / "encoders" / name), name
    with pytest.raises(SystemExit, match="dvc repro encoders"):  # no seeded weights: say how to make them
        embed.run(make_params(tmp_path / "none"), fake_ingest(tmp_path, clip, 1), tmp_path / "f")


def test_flow_descriptor_keeps_where_and_how_fast():
    cfg = FlowEncoderConfig(grid=2, direction_bins=4)
    flow = np.zeros((40, 60, 2), np.float32)
    flow[20:, 30:, 0] = 3.0  # bottom-right quarter moves right by 3 px a frame
    desc = flow_enc.describe(flow, cfg.grid, cfg.direction_bins, scale=8.0 / 40)  # 8 fps, short side 40
    cells = desc.reshape(4, 4 + 2)
    assert np.allclose(cells[:3], 0) and cells[3, 0] == pytest.approx(0.6)  # bin 0: moving right, at 0.6 / s
    assert cells[3, 4] == pytest.approx(0.6) and cells[3, 5] == 0 and np.allclose(cells[3, 1:4], 0)  # (vx, vy)
    down = flow_enc.describe(flow[..., ::-1], cfg.grid, cfg.direction_bins, scale=8.0 / 40).reshape(4, 6)
    assert down[3, 1] == pytest.approx(0.6) and down[3, 5] == pytest.approx(0.6)  # bin B/4: moving down (y down)
    assert flow_enc.mean_speed(desc[None], cfg)[0] == pytest.approx(0.6 / 4)
    # real frames: a square moving right through DIS
    frames = np.zeros((3, 64, 64), np.uint8)
    for k in range(3):
        frames[k, 20:36, 10 + 4 * k: 26 + 4 * k] = 255
    rows = flow_enc.FlowEncoder(FlowEncoderConfig())(frames, fps=8.0)
    assert rows.shape == (3, 160) and np.allclose(rows[0], 0)
    mean_vx = rows[1].reshape(16, 10)[:, 8]
    assert mean_vx.max() > 0 and mean_vx.argmax() in (4, 5)  # the square's cells, moving right


def test_ptlflow_from_a_local_checkpoint(tmp_path, clip):
    import ptlflow
    import torch

    set_threads(1)
    torch.manual_seed(0)
    ckpt = tmp_path / "rapidflow-random.ckpt"
    torch.save({"state_dict": ptlflow.get_model("rapidflow").state_dict()}, ckpt)
    cfg = FlowEncoderConfig(method="ptlflow:rapidflow", checkpoint=str(ckpt), batch_size=4)
    encoder = flow_enc.FlowEncoder(cfg)
    frames, _, _ = sample_frames(clip, 4.0)  # RGB for ptlflow
    rows = encoder(frames, fps=4.0)
    assert rows.shape == (8, 160) and np.isfinite(rows).all() and np.allclose(rows[0], 0)
    np.testing.assert_array_equal(rows, flow_enc.FlowEncoder(cfg)(frames, fps=4.0))  # same weights, same features
    assert flow_enc.weights_identity(cfg) == sha256_file(ckpt)


def test_frame_sampling_follows_k_over_fps(clip):
    assert sample_indices(24, 12.0, 8.0) == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]
    assert sample_indices(192, 24.0, 2.0) == list(range(0, 192, 12))
    frames, native, n = sample_frames(clip, 2.0)
    assert frames.shape == (4, 64, 96, 3) and native == 12.0 and n == 24
    assert sample_frames(clip, 24.0, gray=True)[0].shape == (48, 64, 96)  # above the native rate: repeats


def test_streamed_encoders_give_the_rows_of_the_whole_clip(tmp_path, encoders_dir):
    """Generation streams a video's frames chunk by chunk (flat memory in the duration, issue 18): the rows must be
    the ones embed computes on the whole clip, at rates below and above the native one and across chunk seams."""
    video = make_video(tmp_path / "v.mp4", seconds=5.0, size="96x64", rate="10", audio=None)
    for clip_fps, flow_fps in ((2.0, 8.0), (3.0, 24.0)):
        params = make_params(encoders_dir, clip_fps=clip_fps, flow_fps=flow_fps,
                             clip={"model": "v2m-tiny-vit", "pretrained": "none", "batch_size": 4})
        encoders = Encoders(params.embed, "cpu")
        whole_clip, clip_meta = encoders.clip(Item("v", "", str(video)))
        whole_flow, flow_meta = encoders.flow(Item("v", "", str(video)))
        for chunk in (1, 2, 7, 1000):
            rows, meta = encoders.clip_streamed(video, batches_per_chunk=chunk)
            assert np.array_equal(rows, whole_clip) and meta == clip_meta
            rows, meta = encoders.flow_streamed(video, chunk_frames=chunk + 1)
            assert np.array_equal(rows, whole_flow) and meta == flow_meta


def test_report_on_synthv2m_flow_peaks_on_the_beats(tmp_path, encoders_dir):
    from pipeline import ingest, synth

    synth_params = tmp_path / "synth.yaml"
    synth_params.write_text("base: {clip_seconds: 3.0, fps: 24}\nsynth: {width: 128, height: 128, workers: 1}\n")
    assert synth.main(["--params", str(synth_params), "--out", str(tmp_path / "raw"), "--n", "2",
                       "--manifest", str(tmp_path / "synth.csv"), "--no-preview"]) == 0
    assert ingest.main(["--params", str(synth_params), "--manifest", str(tmp_path / "synth.csv"),
                        "--out", str(tmp_path / "ingest")]) == 0
    params = params_from_dict({"base": {"clip_seconds": 3.0, "fps": 24},
                               "embed": {"encoders_dir": str(encoders_dir / "encoders"), "num_shards": 2,
                                         "flow_fps": 8.0, "report_path": str(tmp_path / "flow_beats.png")}})
    result = embed.run(params, tmp_path / "ingest" / "manifest.parquet", tmp_path / "f")
    assert (tmp_path / "flow_beats.png").stat().st_size > 10_000
    for row in result["manifest"].to_dict("records"):
        speed = flow_enc.mean_speed(load_features(tmp_path / "f" / "flow", [row["id"]])[row["id"]], params.embed.flow)
        beats = json.loads(row["beat_times"])
        on_beat = sorted({int(np.ceil(b * 8.0)) for b in beats if np.ceil(b * 8.0) < len(speed)})  # rows with a beat
        off_beat = [k for k in range(1, len(speed)) if all(abs(k - b) > 1 for b in on_beat)]
        assert speed[on_beat].mean() > 3 * speed[off_beat].mean(), row["id"]
    stamp = (tmp_path / "flow_beats.png").stat().st_mtime_ns
    embed.run(params, tmp_path / "ingest" / "manifest.parquet", tmp_path / "f")
    assert (tmp_path / "flow_beats.png").stat().st_mtime_ns == stamp  # unchanged inputs: not redrawn


@pytest.mark.slow
def test_dvc_flow_fps_change_reruns_embed_only_and_recomputes_flow_only(tmp_path):
    from tests.test_dvc import TINY, mtimes, sh, write_params

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "proj"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    tiny = deep_merge(TINY, {"embed": {"num_shards": 2, "report_clips": 2}})
    write_params(repo / "params.yaml", tiny)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    mine = ("separate", "encoders", "embed")  # and what they depend on; later stages are not this test's business

    def changed() -> set[str]:
        return set(json.loads(sh(repo, "dvc", "status", *mine, "--json").stdout or "{}"))

    sh(repo, "dvc", "repro", *mine)
    features = pd.read_parquet(repo / "data/features/manifest.parquet")
    music = pd.read_parquet(repo / "data/music/manifest.parquet")
    assert list(features["status"]) == ["ok"] * 4 and list(music["status"]) == ["ok"] * 4
    assert (repo / "reports/flow_beats.png").stat().st_size > 0 and changed() == set()
    music_before, clip_before = mtimes(repo / "data/music"), mtimes(repo / "data/features/clip")

    write_params(repo / "params.yaml", deep_merge(tiny, {"embed": {"flow_fps": 4.0}}))
    assert changed() == {"embed"}  # not separate, not encoders
    sh(repo, "dvc", "repro", *mine)
    assert mtimes(repo / "data/music") == music_before and mtimes(repo / "data/features/clip") == clip_before
    assert set(pd.read_parquet(repo / "data/features/manifest.parquet")["flow_fps"]) == {4.0}
    assert changed() == set()


def test_embed_workers_start_local_ranks_that_write_the_single_process_shards(tmp_path, clip, encoders_dir):
    """embed.workers: 2 (the demo's): `v2m embed` starts rank 1 itself; the shards and the manifest are byte for byte
    those of one process, and no rank marker is left in the output (DVC hashes the folder)."""
    params, manifest = tmp_path / "params.yaml", fake_ingest(tmp_path, clip, 9)
    one = make_params(encoders_dir)
    assert one.embed.workers == 2  # the default
    params.write_text(json.dumps(to_dict(one)))
    embed.run(one, manifest, tmp_path / "one")
    proc = run_embed_cli(params, manifest, tmp_path / "two")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "rank 0/2" in output
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert sha256_file(tmp_path / "one" / "manifest.parquet") == sha256_file(tmp_path / "two" / "manifest.parquet")
    assert not (tmp_path / "two" / ".ranks").exists()


def test_patch_stream_has_unit_cells_on_the_flow_grid_at_the_clip_rows_times(tmp_path, encoders_dir):
    """`v2m embed --streams patch --out D` (the spatial-fusion ablation's stage): one manifest row per input, patch
    rows at the CLIP stream's times, grid^2 unit cells of the CLIP width; the cells where the picture changes change
    most."""
    def still(name: str, box: str) -> Path:
        path = tmp_path / name
        ffmpeg("-f", "lavfi", "-i", f"color=c=red:s=96x96:r=12:d=2{box}", "-c:v", "libx264", "-preset", "ultrafast",
               "-pix_fmt", "yuv420p", str(path))
        return path

    left = still("plain.mp4", "")
    right = still("box.mp4", ",drawbox=x=0:y=0:w=48:h=96:color=blue:t=fill")  # the left half turns blue
    manifest = fake_ingest(tmp_path, left, 2)
    os.unlink(tmp_path / "clips" / "v001.mp4")
    os.link(right, tmp_path / "clips" / "v001.mp4")
    params = make_params(encoders_dir)
    grid, width = params.embed.flow.grid, 256
    result = embed.run(params, manifest, tmp_path / "spatial", streams=("patch",))
    frame = result["manifest"].set_index("id")
    assert list(frame.index) == ["v000", "v001", "gone"] and frame.loc["gone", "status"] == "skipped"
    assert "patch_n_frames" in frame.columns and "clip_n_frames" not in frame.columns
    assert not (tmp_path / "flow_beats.png").exists()  # the flow report belongs to the flow stream
    rows = load_features(tmp_path / "spatial" / "patch")
    assert rows["v000"].shape == (4, grid * grid * width)  # 2 s at clip_fps 2, like the clip stream's rows
    cells = np.asarray(rows["v000"]).reshape(4, grid * grid, width)
    np.testing.assert_allclose(np.linalg.norm(cells, axis=-1), 1.0, atol=1e-5)
    other = np.asarray(rows["v001"]).reshape(4, grid * grid, width)
    change = 1 - (cells * other).sum(-1).mean(0).reshape(grid, grid)  # cosine distance per cell
    assert change[:, 0].min() > 2 * change[:, -1].max()  # the left column changed, the right one much less
    frames = sample_frames(left, params.embed.clip_fps)[0]
    from pipeline.encoders.clip import ClipEncoder

    again = ClipEncoder(params.embed.clip, params.embed.encoders_dir).patches(frames, grid)
    np.testing.assert_array_equal(again, np.asarray(rows["v000"]))  # what the stage stored is the encoder's output


def test_patch_stream_refuses_the_default_feature_folder(tmp_path, encoders_dir):
    params = tmp_path / "params.yaml"
    out = tmp_path / "features"
    params.write_text(json.dumps(deep_merge(to_dict(make_params(encoders_dir)), {"embed": {"out_dir": str(out)}})))
    proc = subprocess.run([sys.executable, "-m", "pipeline.embed", "--params", str(params), "--streams", "patch",
                           "--ingest", str(tmp_path / "none.parquet")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "--out of its own" in proc.stderr
    assert not out.exists()
