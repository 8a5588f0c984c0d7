"""Typed configuration: one frozen dataclass per top-level section of params.yaml.

The dataclass defaults *are* the embedded (SynthV2M) profile: `v2m profile use embedded` writes them out, and the
committed params.yaml equals that output (a test checks it). Other profiles (profiles/*.yaml) are partial overlays on
top of those defaults.

Loading is strict: an unknown key, a missing section-level mapping or a value of the wrong type fails with a
`ConfigError` that names the file and the dotted key, e.g. ``params.yaml: ingest.short_side: expected int, got 'big'``.
"Not set" is `null` (an Optional field, `x: str | None = None`; its comment says what null means), never a sentinel
such as '' or -1; null for any other field is an error. A key that was renamed or removed (RENAMED, REMOVED) and a
value that used to mean "not set" (OLD_VALUES) fail with what to write instead; `upgrade` reads params written before
those changes (a checkpoint's).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file that does not match the schema (unknown key, wrong type, bad YAML)."""


@dataclass(frozen=True)
class BaseConfig:
    seed: int = 0
    clip_seconds: float = 8.0  # clips are cut to the first clip_seconds from start_s
    fps: int = 24  # constant frame rate of every ingested clip
    sample_rate: int = 32000  # audio rate of every ingested and generated track


@dataclass(frozen=True)
class SynthConfig:
    out_dir: str = "data/raw/synth"
    manifest: str = "data/manifests/synth.csv"
    n_train: int = 320  # why 320 and not 160: docs/studies/harmony.md
    n_val: int = 20
    n_test: int = 20
    width: int = 256
    height: int = 256
    tempo_min_bpm: float = 80.0
    tempo_max_bpm: float = 140.0
    max_first_beat_frac: float = 0.6  # the first beat lands 0.05 s + up to this fraction of a beat into the clip
    preview_clips: int = 4
    preview_path: str = "reports/synth_preview.png"
    workers: int = 2  # clips rendered in parallel (processes)
    video_crf: int = 18
    video_preset: str = "ultrafast"  # x264: 0.11 s per clip against veryfast's 0.30, at 2.5x the file size


@dataclass(frozen=True)
class DownloadConfig:
    """yt-dlp etiquette and robustness for remote sources."""

    dir: str = "data/downloads"  # outside DVC's outputs: a cache of what was fetched, keyed by a params hash
    max_height: int = 480  # format cap
    section_only: bool = True  # fetch only [start_s, start_s + clip_seconds] instead of the whole video
    retries: int = 3  # our own attempts after the first, with exponential backoff, for transient errors only
    backoff_s: float = 5.0  # first backoff; doubles each attempt
    sleep_between_s: float = 2.0  # pause between two downloads (yt-dlp sleep_interval)
    sleep_requests_s: float = 0.5  # pause between HTTP requests of one extraction (yt-dlp sleep_interval_requests)
    socket_timeout_s: float = 30.0


@dataclass(frozen=True)
class IngestConfig:
    manifest: str = "data/manifests/synth.csv"  # the input manifest CSV (id,source,start_s,split[,caption][,license])
    out_dir: str = "data/ingest"  # clips/{id}.mp4, audio/{id}.wav, manifest.parquet
    short_side: int = 224  # every clip is scaled so its shorter side has this many pixels (even, aspect kept)
    audio_channels: int = 1  # 1 = mono downmix (centre channel of 5.1 kept), 2 = stereo
    require_audio: bool = True  # a source without an audio stream is skipped(no_audio)
    skip_silent: bool = True  # a clip whose audio RMS is below silence_db is skipped(silent_audio)
    silence_db: float = -60.0
    min_duration_s: float = 1.0  # shorter sources are skipped(too_short)
    max_fail_ratio: float = 0.1  # exit non-zero when more than this fraction of rows failed
    video_crf: int = 20
    video_preset: str = "ultrafast"  # x264: 0.11 s per 8 s clip against veryfast's 0.23; veryfast for storage
    workers: int = 2  # items downloaded and normalised in parallel (threads, each running ffmpeg)
    download: DownloadConfig = field(default_factory=DownloadConfig)


@dataclass(frozen=True)
class SeparateConfig:
    """Vocal removal with Demucs: data/ingest/audio -> data/music (the instrumental)."""

    model: str = "none"  # none = pass-through copy (SynthV2M has no vocals) | a Demucs model name, e.g. htdemucs
    # a local Demucs repo ({model}.yaml + {sig}.th), tried first; then the HF and torch hub caches; null = those only
    weights_dir: str | None = None
    out_dir: str = "data/music"  # {id}.wav at base.sample_rate + manifest.parquet
    segment_s: float = 0.0  # Demucs chunk length in seconds; 0 = the model's own (7.8 s for htdemucs)
    overlap: float = 0.25  # overlap of consecutive chunks
    shifts: int = 1  # random time-shift averaging passes (seeded per id); 0 = one plain pass
    device: str = "auto"  # auto = cuda when there is one, else cpu | cpu | cuda | cuda:N
    threads: int = 1  # torch intra-op threads per process; 0 = cores / processes on the node (docs/timings.md)
    max_fail_ratio: float = 0.1  # exit non-zero when more than this fraction of rows failed


@dataclass(frozen=True)
class ClipEncoderConfig:
    model: str = "v2m-tiny-vit"  # open_clip architecture: v2m-tiny-vit (ours, small) or any open_clip.list_models()
    pretrained: str = "none"  # none = seeded random init saved in embed.encoders_dir | a local file | an open_clip tag
    batch_size: int = 32  # images per forward pass


@dataclass(frozen=True)
class FlowEncoderConfig:
    method: str = "opencv_dis"  # opencv_dis | opencv_farneback | ptlflow:<model> (e.g. ptlflow:rapidflow)
    checkpoint: str | None = None  # ptlflow weights: a local file or a name in the torch hub cache; null = random
    dis_preset: str = "ultrafast"  # opencv_dis preset: ultrafast | fast | medium
    grid: int = 4  # descriptor: the frame is cut into grid x grid cells
    direction_bins: int = 8  # descriptor: magnitude-weighted direction histogram bins per cell
    batch_size: int = 8  # ptlflow: frame pairs per forward pass


@dataclass(frozen=True)
class EmbedConfig:
    """CLIP and optical-flow features of every clip: data/ingest/clips -> data/features/{clip,flow} shards."""

    out_dir: str = "data/features"  # clip/ and flow/ shards + manifest.parquet
    encoders_dir: str = "models/encoders"  # the seeded encoder weights (DVC stage `encoders`)
    num_shards: int = 16  # shards per stream; shard = stable hash of id mod num_shards
    clip_fps: float = 2.0  # CLIP embeddings per second of video
    flow_fps: float = 24.0  # flow descriptors per second of video (24 = every frame pair; docs/studies/motion.md)
    device: str = "auto"  # auto = cuda when there is one, else cpu | cpu | cuda | cuda:N
    threads: int = 1  # torch/OpenCV threads per process; 0 = cores / processes on the node
    # processes on this machine, each writing its own shards (runtime.local_ranks); ignored under torchrun / SLURM.
    # 2: the demo machine's 2 cores (one thread each is faster than one process with 2: docs/timings.md, "Threads")
    workers: int = 2
    max_fail_ratio: float = 0.1  # exit non-zero when more than this fraction of rows failed
    report_path: str = "reports/flow_beats.png"  # flow speed over time with the true beats of a few SynthV2M clips
    report_clips: int = 4
    clip: ClipEncoderConfig = field(default_factory=ClipEncoderConfig)
    flow: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)


@dataclass(frozen=True)
class MelVQConfig:
    """The embedded codec (pipeline/codecs/melvq.py): compressed HTK-mel frames, residual VQ fitted on train music."""

    sample_rate: int = 32000  # the codec's audio rate (music is resampled to it)
    frame_rate: float = 25.0  # token frames per second (<= 50); sample_rate / frame_rate must be whole samples
    num_codebooks: int = 2  # K residual codebooks (<= 4); why 2 x 256 at 25 Hz: docs/studies/codec.md
    codebook_size: int = 256  # entries per codebook (<= 1024)
    n_fft: int = 2048  # STFT window, for analysis (hop = one token) and synthesis (hop = one token / subframes)
    subframes: int = 2  # synthesis STFT frames per token (decode interpolates between tokens); 2 at 25 Hz = 50 Hz
    n_mels: int = 128  # HTK mel bands (80 is too coarse for pitch: pipeline/codecs/melvq.py)
    fmax: float = 16000.0
    compression: float = 0.3  # mel power ** compression is what is quantised
    floor_db: float = -60.0  # power floor relative to a full-scale sine
    gate_sigmas: float = 2.0  # decode: bands within this many residual std devs of the floor are silence
    fit_frames: int = 65536  # token frames sampled from the train split for the k-means fit
    fit_max_items: int = 2000  # at most this many train clips are read for the fit (a seeded subset)
    kmeans_iters: int = 20  # Lloyd iterations per codebook
    nnls_iters: int = 30  # multiplicative-update iterations of the mel -> linear inversion
    griffin_lim_iters: int = 16  # fast Griffin-Lim iterations after the SPSI start (docs/studies/codec.md)
    # band_weight > 1: the VQ distance counts the mel bands between band_low_hz and band_high_hz (where chords and
    # melody sound) band_weight times. With 3 the round trip keeps the key better (0.60 -> 0.75 on 40 held-out
    # SynthV2M clips) but the decoder trained on it did not (docs/studies/codec.md), so 1 (off) stays the default.
    # A whole number, so the VQ stays exact.
    band_weight: int = 1
    band_low_hz: float = 120.0
    band_high_hz: float = 2500.0


@dataclass(frozen=True)
class EncodecCodecConfig:
    """The production codec (pipeline/codecs/encodec.py): EnCodec 32 kHz, the one MusicGen uses."""

    weights: str = "facebook/encodec_32khz"  # a local folder (config.json + weights) or a hub id in the HF cache
    bandwidth: float = 2.2  # kbps: 2.2 = 4 codebooks x 2048 at 50 Hz
    device: str = "cpu"  # cpu | cuda | cuda:N


@dataclass(frozen=True)
class TokenizeConfig:
    """Music -> codec tokens: data/music -> data/tokens/{codec} shards (see pipeline/tokenize.py)."""

    codec: str = "melvq"  # melvq (embedded, fitted on the train split) | encodec_32khz (pretrained weights)
    music_dir: str = "data/music"  # the separate stage's {id}.wav + manifest.parquet
    out_dir: str = "data/tokens"  # {out_dir}/{codec}/{shard:05d}.npy + .index.parquet + .done.json, manifest.parquet
    model_dir: str = "models/codecs"  # fitted codecs: {model_dir}/{codec}/
    num_shards: int = 8  # shard = stable hash of id mod num_shards
    silence_db: float = -60.0  # music whose RMS is below this is skipped(silent_audio), not tokenized
    max_fail_ratio: float = 0.1  # exit non-zero when more than this fraction of rows failed
    threads: int = 2  # BLAS / torch threads per process; 0 = cores / processes on the node
    eval_split: str = "test"  # round trip measured on this split of the music (SynthV2M: labelled beats)
    eval_max_clips: int = 20  # at most this many clips of it (the first ids in sorted order)
    real_music_dir: str = "../shared/data/music"  # real recordings for the round trip; missing = "real": null
    real_max_seconds: float = 20.0  # the first seconds of each real track
    metrics_path: str = "metrics/codec.json"
    figure_path: str = "reports/codec_roundtrip.png"  # original vs reconstructed spectrogram of one clip
    melvq: MelVQConfig = field(default_factory=MelVQConfig)
    encodec: EncodecCodecConfig = field(default_factory=EncodecCodecConfig)

    @property
    def store_dir(self) -> str:
        """The token store of `codec`, {out_dir}/{codec}: what tokenize writes and train reads (dvc.yaml spells it
        ${tokenize.out_dir}/${tokenize.codec}). Derived, so that a profile that switches the codec cannot leave train
        reading another codec's tokens."""
        return f"{self.out_dir}/{self.codec}"


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from a trained model: `generate.sampling` (the generate stage and `v2m generate`, whose
    --cfg, --top-k, --temperature, --plausibility and --harmony-bias override it) and `train.sampling` (the
    generations of train's val_beat_f1).

    One dataclass, so both read the same settings with the same meaning and checks (`problem`); two sections, so that
    tuning generation does not rerun training (dvc.yaml: train depends on `train`, generate on `generate`) and a
    study can validate with other settings. The defaults are generate's; train's validation differs in harmony_bias
    only, 0: val_beat_f1 measures what the model learned, not the bias added at inference (and its history in
    docs/studies/ was measured without it).
    """

    guidance: float = 3.0  # classifier-free guidance
    temperature: float = 0.8  # 0 = greedy (why 0.8: docs/studies/motion.md)
    top_k: int = 0  # sample from the k most likely tokens; 0 = the full distribution
    # with guidance, sample only tokens whose conditional probability is >= plausibility x that of the conditional
    # model's most likely token (docs/studies/guidance.md); 0 = every token
    plausibility: float = 0.03
    # models with a token chroma table (harmony_track): + harmony_bias x (correlation of each token's chroma with the
    # retrieved harmony at that frame) on the final logits (docs/studies/harmony-bias.md); 0 = none. A model without
    # the table samples without it.
    harmony_bias: float = 8.0
    # the same models: + mode_guard x each token's mode penalty, how much more it sounds the parallel key of the
    # retrieved key (C minor <-> C major) than the key (`HarmonyBank.mode_penalty`, <= 0); 0 = none, the default: at
    # 16 it raised key accuracy over seven draws but not in the stages' own (docs/reproducibility.md, "The mode guard")
    mode_guard: float = 0.0

    def problem(self, section: str) -> str | None:
        """What is out of range, naming the key under `section` (e.g. "generate.sampling"); None when all is well."""
        if not 0.0 <= self.plausibility <= 1.0:
            return f"{section}.plausibility {self.plausibility:g} must be in [0, 1] (0 = every token)"
        if self.harmony_bias < 0:
            return f"{section}.harmony_bias {self.harmony_bias:g} must be >= 0 (0 = none)"
        if self.mode_guard < 0:
            return f"{section}.mode_guard {self.mode_guard:g} must be >= 0 (0 = none)"
        return None


@dataclass(frozen=True)
class TrainConfig:
    """The model and its training: data/features + the token store (`tokenize.store_dir`: {tokenize.out_dir}/{codec})
    -> models/{system}/v2m.pt (see pipeline/train.py)."""

    preset: str = "embedded"  # model preset: pipeline/model/presets/{debug,embedded,musicgen-small}.yaml
    pretrained_dir: str | None = None  # musicgen-small preset: a local copy of facebook/musicgen-small (its decoder)
    direction: str | None = None  # fusion cross-attention: flow_to_clip | clip_to_flow | both | none; null = preset's
    interpolate: bool | None = None  # add the video context at the token frame rate; null = preset's
    text: bool = False  # condition on caption sentence embeddings (all-MiniLM-L6-v2), with caption dropout
    # full and its variants read the scene stream (embed's, pipeline/encoders/scene.py) through a learned token prior:
    # the timbre the scene shows (docs/baselines.md, "Timbre"); no_clip, vidmuse and text never do
    scene: bool = True
    # with train.scene: the harmony bias's token chroma table is counted over the music of the k training clips whose
    # scenes are nearest (HarmonyBank.scene_table; the timbre those scenes sound in); 0 = over all training clips
    scene_knn: int = 16
    flow_time: str | None = None  # end | centre: where a flow row sits in its frame interval; null = preset's (end)
    flow_norm: str | None = None  # layer | log: how flow rows are scaled (pipeline/model/fusion.py); null = preset's
    flow_pool: bool = False  # average the flow descriptor over its embed.flow.grid cells (less to memorise)
    harmony_knn: int | None = None  # pitch-class profile from the k nearest training clips; null = preset's, 0 = off
    harmony_track: bool | None = None  # with harmony_knn, retrieve per CLIP row (what sounds when); null = preset's
    # else a learned head with this loss weight; null = preset's, 0 = off (docs/studies/harmony.md)
    harmony: float | None = None
    out_dir: str = "models"  # {out_dir}/{system}/v2m.pt (final) and last.pt (the resumable checkpoint)
    metrics_dir: str = "metrics/train"  # {system}.json, {system}_{loss,eval}.csv; merged into metrics/train.json
    max_steps: int = 600  # why 600: docs/studies/harmony.md; how long: docs/timings.md
    batch_size: int = 8  # global, split across DDP processes; 8 clips of 8 s at 50 Hz x 2 codebooks = 6,400 tokens
    lr: float = 3e-3  # peak AdamW learning rate, after linear warmup, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA; else the saved model is the EMA of the weights
    select: str = "last"  # last | val_beat_f1: v2m.pt = the checkpoint with the best val_beat_f1 (needs beat_clips)
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints (atomic) and validation
    beat_clips: int = 8  # validation clips generated and decoded for val_beat_f1 (0 = none)
    # val_beat_f1 at the first checkpoint this many steps after the last one that had it, and at the last step
    # (0 = every checkpoint); with select: val_beat_f1 only those are candidates. Each costs ~8 s on 2 cores
    beat_every: int = 200
    # how those clips are generated: generate's settings but no harmony bias (SamplingConfig says why)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(harmony_bias=0.0))
    # torch threads per process, at most cores / processes (more is slower); 0 = cores / processes.
    # 2: the 2 cores of the demo machine (docs/timings.md, "Threads")
    threads: int = 2
    device: str = "auto"  # auto = cuda when there is one, else cpu | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)


@dataclass(frozen=True)
class GenerateConfig:
    """Music for videos: the eval split -> data/generated/{system}/{id}.{wav,mp4} (the stage), and `v2m generate`."""

    out_dir: str = "data/generated"  # {system}/{id}.wav + .mp4 and manifest.csv (one row per system and id)
    split: str = "test"  # the eval split of the ingest manifest
    systems: tuple[str, ...] = ("full", "no_motion")  # trained systems: {train.out_dir}/{system}/v2m.pt
    max_clips: int = 0  # 0 = every clip of the split; else the first ids in sorted order
    model: str = "models/v2m.pt"  # `v2m generate`'s default checkpoint (models/full/v2m.pt when it is missing)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # draws per window, of which the one whose music (decoded, its CQT chroma) reads most surely as the key the model
    # retrieved from the video is kept (models with a harmony bank; others draw once). 1 = a single draw
    # (docs/generate.md, "Candidates")
    candidates: int = 8
    prompt_seconds: float = 4.0  # past the window, each window starts with this much of the music before it
    crossfade_seconds: float = 0.5  # window audio is crossfaded over this much of the shared (prompt) tokens
    use_cache: bool = True  # KV cache (False recomputes the prefix every step: for benchmarks and tests)
    mix_db: float = -12.0  # --keep-audio: level of the original soundtrack relative to the music
    max_duration_s: float = 3600.0  # `v2m generate` refuses longer videos (memory grows ~0.5 GB per hour of music)
    threads: int = 1  # torch/OpenCV threads; 0 = every core (more than the free cores is slower: docs/timings.md)
    # the stage's processes on this machine, each doing every N-th clip (runtime.local_ranks); ignored under
    # torchrun / SLURM and by `v2m generate VIDEO`. 2: the demo machine's 2 cores
    workers: int = 2
    device: str = "auto"  # auto = cuda when there is one, else cpu | cpu | cuda | cuda:N
    max_fail_ratio: float = 0.1  # the stage exits non-zero when more than this fraction of rows failed


@dataclass(frozen=True)
class TaggerConfig:
    """The audio tagger (pipeline/metrics/tagger.py) that stands in for PaSST (KLD) and VGGish (FAD) on SynthV2M."""

    out_dir: str = "models/tagger"  # tagger.pt (the DVC stage `tagger`)
    metrics_path: str = "metrics/tagger.json"  # its accuracy on the held-out split
    train_split: str = "train"
    val_split: str = "val"  # held-out music its accuracy is reported on
    sample_rate: int = 16000
    n_fft: int = 2048  # 128 ms: fine enough in frequency for the key head
    hop: int = 640  # 40 ms frames
    n_mels: int = 96
    fmin: float = 40.0
    fmax: float = 6000.0
    channels: tuple[int, ...] = (8, 16, 32, 64)  # conv blocks
    embedding_dim: int = 128  # the penultimate layer: FAD's embedding
    tempo_edges: tuple[float, ...] = (100.0, 120.0)  # BPM boundaries of the tempo classes
    crop_s: float = 4.0  # training crop, and the window of each FAD embedding frame
    embed_hop_s: float = 1.0  # FAD embedding frames every this many seconds
    epochs: int = 36  # 396 steps of 32 crops for 320 + 32 clips (400 before the round trips)
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-3
    threads: int = 2  # torch threads, at least 1 (why 2: docs/timings.md, "Threads")
    # the tagger also learns from this many train clips (a quarter per instrument; their first crop_s seconds)
    # passed through the tokenize stage's codec (encode + decode), the sound every generated clip has; 0 = clean
    # music only (docs/evaluate.md)
    round_trip_clips: int = 32
    # processes that run the codec for those clips; 1 = this one, whose BLAS threads use the cores already (on the
    # 2-core machine 15 s for 32 + 20 clips, 20 s in 2 processes)
    round_trip_workers: int = 1


@dataclass(frozen=True)
class EvaluateConfig:
    """Table 1 for our systems: data/generated + data/music + data/ingest -> metrics/eval.json, reports/eval.md."""

    generated_dir: str = "data/generated"  # {system}/{id}.wav and .mp4 + manifest.csv (the generate stage)
    systems: tuple[str, ...] = ("reference", "full", "no_motion", "retrieval", "random")
    music_dir: str = "data/music"  # the ground-truth music, {id}.wav
    ingest_dir: str = "data/ingest"  # clips/{id}.mp4 (AV-Align's video) and manifest.parquet (labels, splits)
    models_dir: str = "models"  # {system}/v2m.pt: parameter counts for the table
    split: str = "test"  # the clips scored
    max_clips: int = 0  # 0 = every clip of the split that all systems have
    embedding: str = "tagger"  # tagger (kld_*_tagger, fad_tagger) | vggish (published: PaSST KLD, VGGish FAD)
    passt_checkpoint: str | None = None  # embedding vggish: PaSST 20 s checkpoint; null = $V2M_PASST_CHECKPOINT
    vggish_weights: str | None = None  # embedding vggish: vggish-10086976.pth; null = $V2M_VGGISH_WEIGHTS
    key_method: str = "ks"  # key_acc from: ks (Krumhansl-Schmuckler on CQT chroma) | tagger (its key + mode heads)
    bootstrap: int = 1000  # resamples of the clips for the 95 % confidence intervals
    workers: int = 2  # clips scored in parallel (processes)
    # AV-Align flow cache; null = $V2M_CACHE_DIR/av_align_flow, else ~/.cache/v2m/av_align_flow (as `v2m metrics`)
    flow_cache: str | None = None
    metrics_path: str = "metrics/eval.json"
    report_path: str = "reports/eval.md"  # the plots are written beside it as eval_*.png
    example_clips: int = 3  # clips whose generated mp4s are linked from the report
    tagger: TaggerConfig = field(default_factory=TaggerConfig)


@dataclass(frozen=True)
class SeedStudyConfig:
    """The seed study (`make seeds`): both systems trained again under each seed; docs/reproducibility.md."""

    seeds: tuple[int, ...] = (1, 2)  # training seeds besides base.seed (the demo's models); a section of its own so
    # that adding a seed reruns only that seed's stages


@dataclass(frozen=True)
class VidMuseConfig:
    """The VidMuse-style baseline's conditioning (LongShortFusion in pipeline/model/fusion.py; docs/baselines.md)."""

    short_s: float = 2.0  # the short-term window: seconds of frames centred on each moment
    long_rows: int = 4  # the long-term summary: the whole video in this many segment means
    layers: int = 1  # cross-attention blocks in which the short-term rows query the long-term ones
    # VidMuse has no harmony retrieval, so neither has the baseline by default; true gives it full's harmony bank,
    # which isolates the fusion (long-short-term on CLIP against no_motion's temporal fusion on CLIP)
    harmony: bool = False


def fraction_size(n: int, percent: int) -> int:
    """Clips in `percent` per cent of a train split of n (rounded, at least one): `v2m train --fraction`'s share."""
    if not 0 < percent <= 100:
        raise ValueError(f"a fraction of the train split is a per cent in 1..100, got {percent}")
    return max(1, round(n * percent / 100))


@dataclass(frozen=True)
class AblationsConfig:
    """The ablation group (`make ablations`: `dvc repro evaluate_all`; docs/baselines.md): the paper's baseline and
    ablations, each trained like the full system (same data, decoder, steps) under the seed study's seeds."""

    seeds: tuple[int, ...] = (0, 1, 2)  # base.seed and seed_study.seeds: full and no_motion come from those runs
    systems: tuple[str, ...] = ("vidmuse", "no_clip")  # trained systems besides full and no_motion (train.SYSTEMS)
    fractions: tuple[int, ...] = (25, 50)  # the data-size curve: full trained on this per cent of the train split
    vidmuse: VidMuseConfig = field(default_factory=VidMuseConfig)
    # the spatial-fusion variant (fusion.mode spatial): full with patch-level CLIP and flow tokens, from the patch
    # stream of the DVC stage embed_spatial (data/features_spatial); its own stages, since only it reads that stream
    spatial: bool = True
    # text steering (train --system text): full with the caption as a condition and a learned token prior, trained
    # on the clips and on their timbre swaps (`v2m swaps`, DVC stage `swaps`); generated three ways: text (no
    # prompt), text_own (the caption names the clip's instrument) and text_other (another instrument)
    text: bool = True
    caption: str = "music played on the {instrument}"  # the captions in training and the prompts at generation
    swap_rate: float = 0.5  # fraction of each batch's clips replaced by one of their timbre swaps (with its caption)
    swaps_dir: str = "data/swaps"  # the swaps stage's output: {id}.npz + manifest.csv
    swap_workers: int = 2  # processes that render and encode the swaps

    @property
    def trained(self) -> tuple[str, ...]:
        """The group's model folders under models/ablations/{seed}/: the systems, spatial, text, then data{P} per
        fraction."""
        return (*self.systems, *(("spatial",) if self.spatial else ()), *(("text",) if self.text else ()),
                *(f"data{p}" for p in self.fractions))

    @property
    def generated(self) -> tuple[str, ...]:
        """The group's generated systems under data/generated_ablations/{seed}/: `trained`, with the text model's
        three prompts in its place."""
        return tuple(x for s in self.trained for x in (TEXT_PROMPTS if s == "text" else (s,)))

    def problem(self) -> str | None:
        """What is out of range in the text-steering settings, naming the key; None when all is well."""
        if "{instrument}" not in self.caption:
            return f"ablations.caption {self.caption!r} must name {{instrument}}"
        if not 0.0 <= self.swap_rate <= 1.0:
            return f"ablations.swap_rate {self.swap_rate:g} must be in [0, 1]"
        return None


TEXT_PROMPTS = ("text", "text_own", "text_other")  # the text model generated without a prompt, own, other instrument


@dataclass(frozen=True)
class StudyConfig:
    """The listening test (pipeline/human_eval.py): how an experiment is drawn from the evaluate stage's renders and how
    `v2m human-eval report` folds the answers."""

    generated_dir: str = "data/generated"  # {system}/{id}.mp4 of the generate stage: what raters compare
    systems: tuple[str, ...] = ("full", "no_motion", "retrieval", "reference")  # compared pairwise (>= 2)
    max_clips: int = 20  # test clips per rater (the first ids all systems have, in sorted order)
    # attention checks: the same render twice (expect tie), and check_good vs check_bad (expect check_good on alignment)
    check_good: str = "reference"
    check_bad: str = "random"
    bootstrap: int = 1000  # resamples of the raters for the 95 % confidence intervals
    report_path: str = "reports/human_eval.md"  # the plot is written beside it as human_eval.png


@dataclass(frozen=True)
class ServeConfig:
    """The web app (`v2m serve`, pipeline/serve/): the creator page and the listening test. Not a DVC stage."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect (--host 0.0.0.0 to share on a network)
    port: int = 8000
    data_dir: str = "data/serve"  # uploads/ and outputs/ (random names), and the database
    db_path: str = "data/serve/v2m.sqlite"  # SQLite (WAL): jobs, experiments, raters, answers
    models_dir: str = "models"  # checkpoints offered on the creator page: {models_dir}/*.pt and {models_dir}/*/v2m.pt
    max_upload_mb: float = 200.0  # larger requests are refused before their body is read (HTTP 413)
    max_video_seconds: float = 120.0  # longer videos are refused after probing
    workers: int = 1  # generation jobs run at once (each holds its own copy of the model)
    queue_size: int = 8  # jobs waiting beyond those running; a full queue refuses new uploads (HTTP 503)
    recent_jobs: int = 10  # jobs listed on the creator page
    study: StudyConfig = field(default_factory=StudyConfig)


@dataclass(frozen=True)
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    separate: SeparateConfig = field(default_factory=SeparateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    seed_study: SeedStudyConfig = field(default_factory=SeedStudyConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# Keys renamed since earlier params files: {old dotted key: new dotted key}. One name per idea in every section:
# `threads` = intra-op threads of one process (torch, BLAS, OpenCV), `workers` = items processed in parallel.
RENAMED: dict[str, str] = {
    **{f"{section}.torch_threads": f"{section}.threads" for section in ("separate", "embed", "train", "generate")},
    "evaluate.jobs": "evaluate.workers",
    # one sampling config for train's validation and generate
    **{f"train.{key}": f"train.sampling.{key}" for key in ("guidance", "top_k", "temperature", "plausibility")},
    **{f"generate.{key}": f"generate.sampling.{key}"
       for key in ("guidance", "top_k", "temperature", "plausibility", "harmony_bias")},
}
# Keys removed: {old dotted key: what replaces it}.
REMOVED: dict[str, str] = {
    "train.tokens_dir": "train reads {tokenize.out_dir}/{tokenize.codec}, the store of the codec tokenize uses "
                        "(`v2m train --tokens DIR` reads another)",
}
# Values that meant "not set" (or on/off) before these fields could be null: {dotted key: {old value: value now}}.
OLD_VALUES: dict[str, dict[Any, Any]] = {
    **{key: {"": None} for key in ("separate.weights_dir", "embed.flow.checkpoint", "train.pretrained_dir",
                                   "train.direction", "train.flow_time", "train.flow_norm", "evaluate.passt_checkpoint",
                                   "evaluate.vggish_weights", "evaluate.flow_cache")},
    "train.interpolate": {"": None, "on": True, "off": False},
    "train.harmony_track": {"": None, "on": True, "off": False},
    "train.harmony_knn": {-1: None},
    "train.harmony": {-1: None},
}


def _yaml_value(value: Any) -> str:
    """`value` as YAML spells it (null, true), for messages."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return repr(value)


def _old_value(key: str, value: Any) -> tuple[bool, Any]:
    """(True, today's value) when `value` is one that `key` no longer takes (OLD_VALUES), else (False, None)."""
    old = OLD_VALUES.get(key)
    if old is None or isinstance(value, bool) or not isinstance(value, (str, int, float)) or value not in old:
        return False, None
    return True, old[value]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; returns the value converted to its frozen form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        expected = " | ".join(_type_name(arg) for arg in args if arg is not type(None))
        expected += " or null" if type(None) in args else ""
        raise ConfigError(f"{source}: {key}: expected {expected}, got {_yaml_value(value)}")
    if value is None:
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got null (this key cannot be unset)")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    for name in unknown:
        key = f"{prefix}.{name}" if prefix else name
        if key in RENAMED:
            raise ConfigError(f"{source}: {key} is now {RENAMED[key]}")
        if key in REMOVED:
            raise ConfigError(f"{source}: {key} was removed: {REMOVED[key]}")
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key {where}{unknown[0]!s}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            is_old, now = _old_value(key, data[name])
            if is_old:
                raise ConfigError(f"{source}: {key}: {data[name]!r} is now written {_yaml_value(now)}")
            kwargs[name] = _coerce(data[name], hints[name], key, source)
    return cls(**kwargs)


def params_from_dict(data: dict | None, source: str = "<params>") -> Params:
    """Build `Params` from a (possibly partial) mapping; missing keys take the embedded defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    return _build(Params, data, "", source)


def upgrade(data: dict) -> dict:
    """A params mapping written before the renames and removals above (a checkpoint's), in today's keys and values."""
    data = copy.deepcopy(data)

    def parent(key: str, create: bool) -> tuple[dict | None, str]:
        *path, leaf = key.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                if not create:
                    return None, leaf
                node[part] = {}
            node = node[part]
        return node, leaf

    for old, new in RENAMED.items():
        node, leaf = parent(old, create=False)
        if node is not None and leaf in node:
            value = node.pop(leaf)
            target, new_leaf = parent(new, create=True)
            target[new_leaf] = value
    for old in REMOVED:
        node, leaf = parent(old, create=False)
        if node is not None:
            node.pop(leaf, None)
    for key in OLD_VALUES:
        node, leaf = parent(key, create=False)
        if node is not None and leaf in node:
            is_old, now = _old_value(key, node[leaf])
            if is_old:
                node[leaf] = now
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return data or {}


def load_params(path: str | Path = "params.yaml", missing_ok: bool = False) -> Params:
    """Load and validate a params file. With `missing_ok`, a missing file gives the defaults."""
    path = Path(path)
    if missing_ok and not path.exists():
        return Params()
    return params_from_dict(read_yaml(path), str(path))


def to_dict(obj: Any) -> Any:
    """Plain-YAML form of a config object (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def deep_merge(base: dict, overlay: dict) -> dict:
    """`overlay` wins; nested mappings are merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
