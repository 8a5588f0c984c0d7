"""Remote sources through yt-dlp's Python API, with the etiquette a dataset of 20k+ videos needs.

- A download folder and yt-dlp download archive per hash of the parameters that change what is fetched (format cap,
  section start and length), so changing `base.clip_seconds` fetches a new section while reruns reuse what exists.
- Our own retries with exponential backoff, for transient errors only (network, rate limiting); yt-dlp's request
  and inter-download sleeps; a height cap on the format; live and upcoming streams rejected.
- Errors classified into manifest reasons: unavailable, private, geo_blocked, age_restricted, live (skipped: retrying
  cannot help) and rate_limited, network, truncated, download_error (failed). Any other exception yt-dlp raises is a
  download_error with a one-line message, not retried. A cached file is `{id}.{ext}` exactly.
- Account and network settings from the environment, never from params.yaml (which is committed, and they change
  no output): `V2M_YTDLP_COOKIES` (a Netscape cookies.txt of your own account, yt-dlp's `cookiefile`),
  `V2M_YTDLP_PROXY` (yt-dlp's `proxy`, e.g. `socks5://127.0.0.1:1080`) and `V2M_YTDLP_LIMIT_RATE` (bytes per
  second, `2M`, `500K`: yt-dlp's `ratelimit`). A cookies file that does not exist is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DownloadConfig
from pipeline.media import ffmpeg_dir
from pipeline.shards import params_hash

log = logging.getLogger(__name__)

URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)

# (reason, patterns) in priority order; matched case-insensitively against yt-dlp's error message.
_CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("rate_limited", ("http error 429", "too many requests", "rate-limit", "rate limit",
                      "confirm you're not a bot", "confirm you’re not a bot")),
    ("private", ("private video", "granted access", "members-only", "join this channel", "video is private")),
    ("geo_blocked", ("not available in your country", "geo restrict", "geo-restrict", "blocked it in your country",
                     "not made this video available in your country")),
    ("age_restricted", ("confirm your age", "age-restricted", "age restricted", "inappropriate for some users")),
    ("live", ("live stream", "live event", "is_live", "is live", "premieres in", "upcoming")),
    ("unavailable", ("video unavailable", "is unavailable", "no longer available", "has been removed",
                     "http error 404", "http error 410", "account associated with this video has been terminated",
                     "does not exist", "unsupported url", "copyright claim")),
    # a download cut off: yt-dlp's HTTP downloader ("19989 bytes read, 51734 more expected"), or ffmpeg (section
    # downloads) exiting with AVERROR_INVALIDDATA & 0xff = 183 on data that ends or breaks mid-stream
    ("truncated", ("more expected", "content too short", "ffmpeg exited with code 183")),
    ("network", ("failed to resolve", "name or service not known", "temporary failure in name resolution",
                 "timed out", "connection refused", "connection reset", "network is unreachable",
                 "remote end closed", "urlopen error", "transporterror", "http error 500", "http error 502",
                 "http error 503", "http error 504", "incompleteread", "ssl")),
]
SKIP_REASONS = {"unavailable", "private", "geo_blocked", "age_restricted", "live"}
TRANSIENT_REASONS = {"network", "rate_limited", "truncated"}


def is_url(source: str) -> bool:
    return bool(URL_RE.match(source.strip()))


def classify(message: str) -> str:
    """Manifest reason for a yt-dlp error message."""
    text = message.lower()
    for reason, patterns in _CLASSES:
        if any(p in text for p in patterns):
            return reason
    return "download_error"


class DownloadFailed(RuntimeError):
    def __init__(self, url: str, reason: str, message: str, attempts: int):
        super().__init__(f"{url}: {reason}: {message}")
        self.url, self.reason, self.message, self.attempts = url, reason, message, attempts


@dataclass(frozen=True)
class Downloaded:
    path: Path
    attempts: int  # 0 when the file was already in the download folder
    section_start_s: float  # where the downloaded file starts in the source video (0 unless section_only)


def download_dir(cfg: DownloadConfig, start_s: float, clip_seconds: float) -> Path:
    """The folder for one set of fetch-relevant params: `{cfg.dir}/{hash}`."""
    key = {"max_height": cfg.max_height, "section_only": cfg.section_only}
    if cfg.section_only:
        key.update(start_s=round(start_s, 3), clip_seconds=clip_seconds)
    return Path(cfg.dir) / params_hash(key)


def _existing(dest: Path, item_id: str) -> Path | None:
    """The finished download of exactly `item_id` (`{id}.{ext}`): not `{id}.part`, nor another id's `{id}.x.mp4`."""
    for path in sorted(dest.glob(f"{item_id}.*")):
        if path.stem == item_id and path.suffix not in (".part", ".ytdl", ".json", ".temp", ".txt"):
            return path
    return None


def _reject_live(info: dict, *, incomplete: bool = False) -> str | None:
    if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming", "post_live"):
        return "live stream or upcoming premiere: not downloaded"
    return None


class _Logger:
    """Route yt-dlp's messages to our logger (debug level; errors are raised and classified by us)."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = debug

    def warning(self, msg: str) -> None:
        log.debug("yt-dlp warning: %s", msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp error: %s", msg)


def _ffmpeg_on_path() -> None:
    """yt-dlp's ffmpeg downloader (used for sections) looks on PATH only, ignoring ffmpeg_location."""
    folder = ffmpeg_dir()
    if folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def ydl_options(cfg: DownloadConfig, dest: Path, item_id: str, start_s: float, clip_seconds: float) -> dict:
    import yt_dlp.utils

    _ffmpeg_on_path()
    cap = cfg.max_height
    opts = {
        "format": f"bv*[height<={cap}]+ba/b[height<={cap}]/wv*+ba/w",
        "outtmpl": str(dest / f"{item_id}.%(ext)s"),
        "download_archive": str(dest / "archive.txt"),
        "merge_output_format": "mkv",
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _Logger(),
        "retries": 1,
        "fragment_retries": 1,
        "extractor_retries": 0,
        "socket_timeout": cfg.socket_timeout_s,
        "sleep_interval_requests": cfg.sleep_requests_s,
        "sleep_interval": cfg.sleep_between_s,
        "match_filter": _reject_live,
        "ffmpeg_location": ffmpeg_dir(),
    }
    opts.update(environment_options())
    if cfg.section_only:
        opts["download_ranges"] = yt_dlp.utils.download_range_func(None, [(start_s, start_s + clip_seconds)])
        opts["force_keyframes_at_cuts"] = True  # re-encode at the cut: the file starts exactly at start_s
    return opts


COOKIES_ENV, PROXY_ENV, LIMIT_RATE_ENV = "V2M_YTDLP_COOKIES", "V2M_YTDLP_PROXY", "V2M_YTDLP_LIMIT_RATE"


def environment_options() -> dict:
    """yt-dlp options from V2M_YTDLP_COOKIES / _PROXY / _LIMIT_RATE (unset or empty: not passed)."""
    import yt_dlp.utils

    opts = {}
    if cookies := os.environ.get(COOKIES_ENV, "").strip():
        path = Path(cookies).expanduser()
        if not path.is_file():
            raise ValueError(f"${COOKIES_ENV}: {path}: no such cookies file (a Netscape cookies.txt)")
        opts["cookiefile"] = str(path)
    if proxy := os.environ.get(PROXY_ENV, "").strip():
        opts["proxy"] = proxy
    if rate := os.environ.get(LIMIT_RATE_ENV, "").strip():
        parsed = yt_dlp.utils.parse_bytes(rate)
        if not parsed:
            raise ValueError(f"${LIMIT_RATE_ENV}: {rate!r} is not a rate in bytes per second (e.g. 2M, 500K)")
        opts["ratelimit"] = parsed
    return opts


SECTION_SLACK_S = 0.5  # a section this much shorter than the source allows is a download cut off


class _Retry(Exception):
    """The attempt failed in a way the loop's (reason, message) already say."""


def _short_section(path: Path, url: str, info: dict | None, start_s: float, clip_seconds: float,
                   cfg: DownloadConfig) -> str | None:
    """Why the section in `path` is shorter than the source allows, or None when it is whole.

    ffmpeg (yt-dlp's section downloader) ends a stream that stops mid-way (a connection cut) without an error, so a
    cut-off section looks like a short video. The source's length is yt-dlp's `duration`, or, for a direct media URL,
    PyAV's reading of its header; when neither is known, the file is taken as it is (ingest checks it further)."""
    import av

    from pipeline.media import MediaError, probe

    try:
        got = probe(path).duration_s
    except MediaError as exc:
        return f"the downloaded section does not read ({exc})"
    if got >= clip_seconds - SECTION_SLACK_S:
        return None
    total = (info or {}).get("duration")
    if total is None and (info or {}).get("direct"):
        try:
            with av.open(url, timeout=cfg.socket_timeout_s) as container:
                total = container.duration / 1e6 if container.duration else None
        except Exception:  # noqa: BLE001 - unknown length: nothing to compare with
            total = None
    if total is None or got >= min(clip_seconds, total - start_s) - SECTION_SLACK_S:
        return None
    return (f"the section downloaded is {got:.2f} s, the source has {min(clip_seconds, total - start_s):.2f} s from "
            f"{start_s:g} s: the download was cut off")


def _forget(dest: Path, path: Path, info: dict | None) -> None:
    """Remove a bad download and its line in yt-dlp's archive."""
    path.unlink(missing_ok=True)
    archive = dest / "archive.txt"
    if info and archive.exists():
        key = f"{str(info.get('extractor_key', '')).lower()} {info.get('id')}"
        lines = [line for line in archive.read_text().splitlines() if line.strip() != key]
        tmp = archive.with_name(f".archive.txt.tmp{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, archive)


def download(url: str, item_id: str, start_s: float, clip_seconds: float, cfg: DownloadConfig) -> Downloaded:
    """Fetch `url` (or only its section) into the download folder; reuse a file already there.

    Raises:
        DownloadFailed: with `reason` from `classify` and the number of attempts made.
    """
    import yt_dlp

    dest = download_dir(cfg, start_s, clip_seconds)
    dest.mkdir(parents=True, exist_ok=True)
    section_start = start_s if cfg.section_only else 0.0
    if (found := _existing(dest, item_id)) is not None:
        return Downloaded(found, 0, section_start)
    opts = ydl_options(cfg, dest, item_id, start_s, clip_seconds)
    attempts, reason, message = 0, "download_error", ""
    for attempt in range(cfg.retries + 1):
        attempts = attempt + 1
        try:
            with yt_dlp.YoutubeDL(opts) as ydl:
                info = ydl.extract_info(url, download=True)
            if info is not None and (rejected := _reject_live(info)):
                raise DownloadFailed(url, "live", rejected, attempts)
            if (found := _existing(dest, item_id)) is not None:
                short = _short_section(found, url, info, start_s, clip_seconds, cfg) if cfg.section_only else None
                if short is None:
                    return Downloaded(found, attempts, section_start)
                _forget(dest, found, info)  # so that the retry (now or on the next run) downloads it again
                reason, message = "truncated", f"{url}: {short}"
                raise _Retry
            reason, message = "download_error", "yt-dlp reported success but wrote no file"
            if info is None:  # filtered out by match_filter (live) or already in the archive without a file
                reason, message = "live", "rejected by the live/upcoming filter or archived without a file"
            break
        except yt_dlp.utils.DownloadError as exc:
            message = re.sub(r"^ERROR:\s*", "", str(exc)).strip()
            reason = classify(message)
        except _Retry:
            pass
        except DownloadFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - yt-dlp's other errors (and its bugs): one line, not retried
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            reason = "download_error"
        if reason not in TRANSIENT_REASONS or attempt == cfg.retries:
            break
        delay = cfg.backoff_s * (2**attempt)
        log.info("%s: %s (attempt %d), retrying in %.1f s", item_id, reason, attempts, delay)
        time.sleep(delay)
    raise DownloadFailed(url, reason, message, attempts)
