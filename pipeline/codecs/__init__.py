"""Audio codecs: waveform <-> discrete tokens, one small interface and a registry by name.

    codec = create_codec("melvq", params.tokenize)      # or "encodec_32khz"
    codes = codec.encode(wav)                           # wav [N] (or [C, N], downmixed) at codec.sample_rate
    wav = codec.decode(codes)                           # codes [K, T] int64 -> mono float32 [T * hop]
    wav = round_trip(codec, "music.wav", seconds=8.0)   # a file's first 8 s, encoded and decoded

Every codec has `sample_rate` (Hz), `frame_rate` (token frames per second), `num_codebooks` (K) and `codebook_size`
(tokens are in [0, codebook_size)). A codec that learns from data (`needs_fit`, e.g. melvq) is fitted with `fit`
on the train split's music and saved/loaded with `save` / `load`; `state_hash()` names the exact fitted state, so a
refit changes the hash and the tokenize stage recomputes every token.

Registered codecs (`list_codecs()`):
- `encodec_32khz`: EnCodec 32 kHz as MusicGen uses it (4 codebooks x 2048 at 50 Hz), pretrained weights from a local
  folder or the Hugging Face cache (pipeline/codecs/encodec.py).
- `melvq`: the embedded codec, a residual vector quantiser over compressed HTK-mel frames, fitted on the train split;
  decodes without any downloaded weights (pipeline/codecs/melvq.py).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# name -> "module:factory"; imported lazily so that melvq never imports torch/transformers.
REGISTRY = {
    "encodec_32khz": "pipeline.codecs.encodec:from_config",
    "melvq": "pipeline.codecs.melvq:from_config",
}


class CodecError(RuntimeError):
    """A codec that cannot be built or used (missing weights, an unfitted codec, bad codes)."""


class Codec(ABC):
    """encode(wav [N]) -> codes [K, T]; decode(codes [K, T]) -> wav [T * sample_rate / frame_rate]."""

    name: str
    sample_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    needs_fit: bool = False

    @property
    def hop_length(self) -> int:
        """Audio samples per token frame."""
        return int(round(self.sample_rate / self.frame_rate))

    def num_frames(self, num_samples: int) -> int:
        """Token frames for `num_samples` samples of audio: ceil(N / hop)."""
        return -(-num_samples // self.hop_length)

    @abstractmethod
    def encode(self, wav: np.ndarray) -> np.ndarray:
        """Audio [N] or [C, N] (float, at `sample_rate`; channels are averaged) -> codes [K, T] int64."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [K, T] -> mono float32 audio [T * hop_length]."""

    @abstractmethod
    def state_hash(self) -> str:
        """Hash of everything that determines the tokens: the codec's settings and (fitted or loaded) weights."""

    def fit_settings(self) -> dict:
        """The settings a fit depends on (a fitted codec is refitted when they change)."""
        return {}

    def fit(self, wavs: Iterable[np.ndarray]) -> dict:  # pragma: no cover - only fitted codecs override it
        raise CodecError(f"codec {self.name!r} is not fitted to data")

    def save(self, directory: str | Path) -> None:  # pragma: no cover
        raise CodecError(f"codec {self.name!r} has no fitted state to save")

    def load(self, directory: str | Path) -> None:  # pragma: no cover
        raise CodecError(f"codec {self.name!r} has no fitted state to load")

    def describe(self) -> dict:
        return {"codec": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size}

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        """Validate codes [K, T] (any int dtype) and return them as int64."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise CodecError(f"{self.name}: codes must be [K={self.num_codebooks}, T], got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise CodecError(f"{self.name}: codes must be in [0, {self.codebook_size}), got "
                             f"[{codes.min()}, {codes.max()}]")
        return codes.astype(np.int64, copy=False)


def to_mono(wav: np.ndarray) -> np.ndarray:
    """[N] or [C, N] float -> float32 [N] (channel mean)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=0)
    if wav.ndim != 1:
        raise CodecError(f"audio must be [N] or [C, N], got shape {wav.shape}")
    return wav


def round_trip(codec: Codec, path: str | Path, seconds: float | None = None) -> np.ndarray:
    """The music at `path` (its first `seconds`; all of it for None) through `codec`, encoded and decoded: mono
    float32 at `codec.sample_rate`. What the reference row of the generate stage and the tagger's codec clips are."""
    from pipeline.media import load_audio

    return codec.decode(codec.encode(load_audio(path, codec.sample_rate, duration_s=seconds)[0]))


def list_codecs() -> list[str]:
    return sorted(REGISTRY)


def create_codec(name: str, cfg: Any = None, seed: int = 0) -> Codec:
    """Build a codec by name from the `tokenize` params section (None: the defaults); `seed` seeds a fit.

    A fitted codec (melvq) comes back unfitted: `fit` it, or `load` a saved state, before encoding.
    """
    if name not in REGISTRY:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(list_codecs())}")
    if cfg is None:
        from pipeline.config import TokenizeConfig

        cfg = TokenizeConfig()
    module_name, func = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), func)(cfg, seed=seed)


def load_codec(name: str, cfg: Any = None, params: str | Path = "params.yaml") -> Codec:
    """A codec ready to encode and decode, as the tokenize stage left it: a fitted codec is loaded from
    `{tokenize.model_dir}/{name}/` (its saved settings win over the params). `cfg` defaults to `params`' tokenize
    section (the defaults when that file is missing)."""
    if cfg is None:
        from pipeline.config import load_params

        cfg = load_params(params, missing_ok=True).tokenize
    codec = create_codec(name, cfg)
    if codec.needs_fit:
        codec.load(Path(cfg.model_dir) / name)
    return codec
