"""Media layer: probe, decode, encode and mux, with PyAV and the ffmpeg binary that imageio-ffmpeg ships.

No system ffmpeg is needed: PyAV bundles FFmpeg's libraries for probing and decoding, and imageio-ffmpeg brings a
static ffmpeg executable for encoding, trimming and muxing (set `V2M_FFMPEG` to use another binary). Every error is a
`MediaError` whose message starts with the file's path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from pipeline.shards import atomic_path

log = logging.getLogger(__name__)


class MediaError(RuntimeError):
    """A media file that cannot be read or written; `reason` is a manifest reason such as ``corrupt``."""

    def __init__(self, path: str | Path, message: str, reason: str = "corrupt"):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class MediaInfo:
    path: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0  # as stored; see `display_width` for the rotated size
    height: int = 0
    fps: float = 0.0  # average frame rate
    rotation: int = 0  # display rotation in degrees (0, 90, 180, 270)
    video_codec: str = ""
    audio_codec: str = ""
    sample_rate: int = 0
    channels: int = 0
    channel_layout: str = ""

    @property
    def display_width(self) -> int:
        return self.height if self.rotation % 180 else self.width

    @property
    def display_height(self) -> int:
        return self.width if self.rotation % 180 else self.height

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg executable: `$V2M_FFMPEG`, else the one imageio-ffmpeg ships."""
    if os.environ.get("V2M_FFMPEG"):
        return os.environ["V2M_FFMPEG"]
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


_LINK_LOCK = threading.Lock()
# One x264 thread: its default follows the machine's cores and its bitstream depends on the thread count; and with 2
# frame threads this build's output varied from run to run (1 encode in 10 of the same 8 s clip decoded to other
# frames), so the same clip could get other features. Single-threaded, every encode of it is the same bytes on any
# machine (docs/reproducibility.md); the stages encode two items at a time instead.
X264_ARGS = ("-c:v", "libx264", "-threads:v", "1")


@lru_cache(maxsize=1)
def ffmpeg_dir() -> str:
    """A folder holding `ffmpeg` (a link to `ffmpeg_exe()`), for tools such as yt-dlp that look for that name."""
    exe = Path(ffmpeg_exe())
    if exe.name == "ffmpeg":
        return str(exe.parent)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "v2m" / "bin"
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / "ffmpeg"
    with _LINK_LOCK:
        if not (link.is_symlink() and os.readlink(link) == str(exe)):
            tmp = cache / f".ffmpeg.{os.getpid()}.{threading.get_ident()}"  # unique per process and thread
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(exe)
            os.replace(tmp, link)
    return str(cache)


@lru_cache(maxsize=1)
def tool_versions() -> dict:
    """Versions of the media tools, recorded in manifests so results can be traced."""
    import imageio_ffmpeg

    return {
        "ffmpeg": imageio_ffmpeg.get_ffmpeg_version() if not os.environ.get("V2M_FFMPEG") else "custom",
        "pyav": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
    }


def run_ffmpeg(args: list[str], path: str | Path, reason: str = "corrupt") -> None:
    """Run ffmpeg quietly; raise `MediaError(path, ...)` with the tail of its log on failure."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        raise MediaError(path, f"ffmpeg failed: {tail}", reason)


def probe(path: str | Path) -> MediaInfo:
    """Read stream information with PyAV. Raises `MediaError` (reason ``corrupt``/``missing``) when unreadable."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "no such file", "missing")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            duration = _duration_s(container, video, audio)
            info = dict(path=str(path), duration_s=duration, has_video=video is not None, has_audio=audio is not None)
            if video is not None:
                rate = video.average_rate or video.guessed_rate or 0
                info.update(
                    width=video.codec_context.width,
                    height=video.codec_context.height,
                    fps=float(rate),
                    rotation=_rotation(container, video),
                    video_codec=video.codec_context.name,
                )
            if audio is not None:
                layout = audio.codec_context.layout
                info.update(
                    audio_codec=audio.codec_context.name,
                    sample_rate=audio.codec_context.sample_rate,
                    channels=len(layout.channels),
                    channel_layout=layout.name,
                )
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"cannot be read as media ({exc.strerror or exc})") from None
    if not info["has_video"] and not info["has_audio"]:
        raise MediaError(path, "no audio or video stream")
    return MediaInfo(**info)


def _duration_s(container, video, audio) -> float:
    if container.duration:
        return container.duration / av.time_base
    for stream in (video, audio):
        if stream is not None and stream.duration:
            return float(stream.duration * stream.time_base)
    return 0.0


def _rotation(container, video) -> int:
    """Display rotation from the first decoded frame (PyAV exposes the display matrix there)."""
    try:
        container.seek(0)
        frame = next(container.decode(video=video.index))
        return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except (StopIteration, av.error.FFmpegError):
        return 0


def load_audio(
    path: str | Path,
    sample_rate: int | None = None,
    mono: bool = True,
    duration_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream to float32.

    Args:
        path: any file FFmpeg reads (wav, mp3, ogg, mp4, webm, ...).
        sample_rate: resample to this rate (None keeps the native rate).
        mono: downmix with FFmpeg's standard matrix (a 5.1 centre channel is kept).
        duration_s: stop after this many seconds.

    Returns:
        (audio, sample_rate) with audio shaped [C, N] (C = 1 when mono).
    """
    path = Path(path)
    if path.suffix.lower() == ".wav" and sample_rate is None and not mono:
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise MediaError(path, f"audio cannot be decoded ({exc})") from None
        audio = data.T
        return (audio[:, : int(duration_s * sr)] if duration_s else audio), sr
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(path, "no audio stream", "no_audio")
            stream = container.streams.audio[0]
            rate = sample_rate or stream.codec_context.sample_rate
            layout = "mono" if mono else stream.codec_context.layout.name
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"audio cannot be decoded ({exc.strerror or exc})") from None
    channels = 1 if mono else len(av.AudioLayout(layout).channels)
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    if duration_s is not None:
        audio = audio[:, : int(round(duration_s * rate))]
    return audio.astype(np.float32, copy=False), rate


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write [C, N] or [N] float audio in [-1, 1] atomically."""
    audio = np.asarray(audio, dtype=np.float32)
    data = audio.T if audio.ndim == 2 else audio
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(data, -1.0, 1.0), sample_rate, subtype=subtype, format="WAV")


def rms_db(audio: np.ndarray) -> float:
    """RMS level in dBFS (-inf-safe: digital silence gives -200)."""
    if audio.size == 0:
        return -200.0
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20.0 * np.log10(max(rms, 1e-10))


def decode_video(path: str | Path) -> Iterator[tuple[av.VideoFrame, float]]:
    """Every frame of the first video stream, one at a time, with the stream's nominal frame rate (25 when it has
    none). Raises `MediaError` naming `path`: reason ``no_video`` without a video stream, else ``corrupt``."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "no video stream", "no_video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            native = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            for frame in container.decode(stream):
                yield frame, native
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"video cannot be decoded ({exc.strerror or exc})") from None


def iter_frames(path: str | Path, gray: bool = False) -> Iterator[np.ndarray]:
    """Decode every video frame at the native rate, rotated for display: [H, W, 3] RGB or [H, W] gray uint8."""
    for frame, _ in decode_video(path):
        image = frame.to_ndarray(format="gray" if gray else "rgb24")
        rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
        if rotation:
            image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
        yield image


SEEK_MIN_S = 1.0  # normalise_video: starts before this are cut by the filters, not by an input seek


def normalise_video(src: str | Path, clip: str | Path, n_frames: int, fps: float, short_side: int, crf: int,
                    preset: str, start_s: float = 0.0, wav: str | Path | None = None, sample_rate: int = 0,
                    channels: int = 0) -> None:
    """Cut and normalise a video as ingest does, in one ffmpeg run: `n_frames` frames from `start_s` (re-encoded, so
    exact, not keyframe-snapped) at constant `fps`, scaled (bicubic) so the short side is `short_side`, rotation
    applied, square pixels, yuv420p, H.264 (X264_ARGS, `preset`, `crf`) in `clip`.

    With `wav`, the first audio stream too, resampled (soxr) to `sample_rate`, downmixed by FFmpeg's standard matrix to
    `channels` and padded with silence to n_frames / fps seconds: AAC in `clip` and 16-bit PCM in `wav`. Without it
    the clip has no audio. Raises `MediaError` (reason ``corrupt``) naming `src` when ffmpeg fails.
    """
    # A start within the first second is cut by the filters, not by an input seek: `-ss` to a time inside the first
    # AAC frame of a source without B-frames (x264 baseline / ultrafast) dropped that whole frame on top of the
    # encoder's priming, so the audio came out 1024 samples (32 ms at 32 kHz) ahead of the picture.
    seek, head = (start_s, 0.0) if start_s >= SEEK_MIN_S else (0.0, start_s)
    vhead = f"trim=start={head:.6f},setpts=PTS-STARTPTS," if head else ""
    ahead = f"atrim=start={head:.6f},asetpts=PTS-STARTPTS," if head else ""
    scale = (f"{vhead}scale=w='if(lte(iw,ih),{short_side},-2)':h='if(lte(iw,ih),-2,{short_side})':flags=bicubic,"
             f"fps={fps}:start_time=0,trim=end_frame={n_frames},setsar=1,format=yuv420p")
    # Both streams end in their filters (n_frames frames; the audio padded, then trimmed to n_frames / fps s), not by
    # output limits (`-frames:v`, `-t`): with those, whether the clip's last AAC frame was written varied from run to
    # run (ffmpeg's threads), so the same source gave other bytes.
    samples = int(round(n_frames / fps * sample_rate))
    audio_filter = (f"{ahead}aresample={sample_rate}:resampler=soxr,apad=whole_len={samples},"
                    f"atrim=end_sample={samples}")
    args = [*(["-ss", f"{seek:.6f}"] if seek else []), "-i", str(src), "-map", "0:v:0", "-vf", scale,
            *X264_ARGS, "-preset", preset, "-crf", str(crf), "-movflags", "+faststart"]
    if wav is not None:
        args += ["-map", "0:a:0", "-af", audio_filter, "-ac", str(channels), "-c:a", "aac", "-b:a", "128k", str(clip),
                 "-map", "0:a:0", "-af", audio_filter, "-ac", str(channels),
                 "-ar", str(sample_rate), "-c:a", "pcm_s16le", str(wav)]
    else:
        args += ["-an", str(clip)]
    run_ffmpeg(args, src)


def stored_frame_count(path: str | Path) -> int:
    """Video frames of the first video stream as stored: the container's count, else the packets holding data (no
    decoding; `count_frames` decodes)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.demux(stream) if _.size)


def video_duration(path: str | Path) -> tuple[float, float]:
    """(duration, fps) of the first video stream, from its packets' timestamps (no decoding). Raises `MediaError` when
    the stream has no packets or stops well before the duration its header promises."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        first, end = None, 0.0
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            t0 = float(packet.pts * packet.time_base)
            first = t0 if first is None else min(first, t0)
            end = max(end, t0 + float((packet.duration or 0) * packet.time_base or 1 / fps))
        promised = float(stream.duration * stream.time_base) if stream.duration else 0.0
    if first is None:
        raise MediaError(path, "no video packets (empty or damaged video stream)")
    if promised and end - first < promised - 2 / fps:
        raise MediaError(path, f"its video stream stops at {end - first:.2f} s of the {promised:.2f} s its header "
                         "promises (truncated or damaged file)")
    return end - first, fps


def count_frames(path: str | Path) -> int:
    """Number of decodable video frames (decodes the stream; exact, unlike container metadata)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def encode_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    crf: int = 20,
    preset: str = "veryfast",
    audio_bitrate: str = "160k",
) -> None:
    """Encode RGB frames [H, W, 3] uint8 (+ optional [C, N] audio) into an H.264 + AAC mp4, atomically."""
    path = Path(path)
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=".v2m-", dir=path.parent) as scratch:
        args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0"]
        if audio is not None:
            wav = Path(scratch) / "audio.wav"
            write_wav(wav, audio, sample_rate)
            args += ["-i", str(wav), "-c:a", "aac", "-b:a", audio_bitrate]
        args += [*X264_ARGS, "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
        args += ["-movflags", "+faststart", "-shortest" if audio is not None else "-an", str(tmp)]
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.stdin.write(np.ascontiguousarray(first, dtype=np.uint8).tobytes())
            for frame in frames:
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        stderr = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise MediaError(path, f"ffmpeg encode failed: {stderr.strip()[-300:]}", "encode")
