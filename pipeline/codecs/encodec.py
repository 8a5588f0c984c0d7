"""encodec_32khz, the production codec: EnCodec 32 kHz (Defossez et al. 2022), the one MusicGen generates for.

4 codebooks x 2048 entries at 50 Hz (hop 640 samples) at its 2.2 kbps bandwidth, through transformers'
`EncodecModel`. The weights are never downloaded here: `tokenize.encodec.weights` is a local folder holding
`config.json` + `model.safetensors` (what `save_pretrained` writes, e.g. `huggingface-cli download
facebook/encodec_32khz --local-dir DIR`), or a hub id already in the Hugging Face cache ($HF_HOME/hub). When neither
is there, `EncodecWeightsMissing` names what is missing and how to get it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.codecs import Codec, CodecError, to_mono
from pipeline.config import EncodecCodecConfig, TokenizeConfig

log = logging.getLogger(__name__)

HUB_ID = "facebook/encodec_32khz"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class EncodecWeightsMissing(CodecError, FileNotFoundError):
    """The EnCodec weights are neither in the given folder nor in the Hugging Face cache."""


def from_config(cfg: TokenizeConfig, seed: int = 0) -> EncodecCodec:  # nothing random: seed unused
    return EncodecCodec(cfg.encodec, threads=cfg.threads)


def architecture():
    """transformers' EncodecConfig of facebook/encodec_32khz: for stand-ins with random weights where the real ones
    are absent (tests, benchmarks timing the same compute)."""
    from transformers import EncodecConfig

    return EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                         codebook_size=2048, target_bandwidths=[2.2], use_causal_conv=False, use_conv_shortcut=False,
                         normalize=False)


def resolve_weights(weights: str) -> Path:
    """The local folder of `weights`: the folder itself, or the cached snapshot of a hub id. Raises
    `EncodecWeightsMissing` naming the folder or file that is missing."""
    path = Path(weights).expanduser()
    how = (f"get them where there is network (`huggingface-cli download {HUB_ID} --local-dir DIR`, or "
           f"`EncodecModel.from_pretrained('{HUB_ID}').save_pretrained(DIR)`) and set tokenize.encodec.weights: DIR")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EncodecWeightsMissing(f"{path}: no config.json (not a saved EncodecModel folder); {how}")
        if not any((path / name).exists() for name in WEIGHT_FILES):
            raise EncodecWeightsMissing(f"{path}: no {' or '.join(WEIGHT_FILES)} beside config.json; {how}")
        return path
    if path.exists() or weights.count("/") != 1 or weights.startswith((".", "/", "~")):
        raise EncodecWeightsMissing(f"EnCodec weights {weights!r}: no such folder; {how}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(weights, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: report what is missing, where
        raise EncodecWeightsMissing(f"EnCodec weights {weights!r}: not a local folder, and not in the Hugging Face "
                                    f"cache ({HF_HUB_CACHE}); {how}") from None


class EncodecCodec(Codec):
    name = "encodec_32khz"

    def __init__(self, cfg: EncodecCodecConfig | None = None, threads: int = 0):
        import torch
        from transformers import EncodecModel

        cfg = cfg or EncodecCodecConfig()
        if threads > 0:
            torch.set_num_threads(threads)  # 2 cores: oversubscription makes the convolutions several times slower
        self.cfg, self.folder = cfg, resolve_weights(cfg.weights)
        try:
            self.model = EncodecModel.from_pretrained(self.folder).eval().to(cfg.device)
        except Exception as exc:  # noqa: BLE001 - truncated safetensors, another model's folder: name the folder
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise CodecError(f"{self.folder}: the EnCodec weights do not load ({type(exc).__name__}: {first}); the "
                             f"file is truncated or not {HUB_ID}'s architecture: download it again") from None
        config = self.model.config
        if config.sampling_rate != 32000:
            raise CodecError(f"{self.folder}: a {config.sampling_rate} Hz EnCodec, not the 32 kHz one ({HUB_ID})")
        if cfg.bandwidth not in config.target_bandwidths:
            raise CodecError(f"tokenize.encodec.bandwidth: {cfg.bandwidth} is not one of {self.folder}'s "
                             f"target_bandwidths {config.target_bandwidths}")
        self.sample_rate, self.frame_rate = int(config.sampling_rate), float(config.frame_rate)
        self.num_codebooks = int(self.model.quantizer.get_num_quantizers_for_bandwidth(cfg.bandwidth))
        self.codebook_size = int(config.codebook_size)
        self._hash: str | None = None

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.model.config.upsampling_ratios))

    def encode(self, wav: np.ndarray) -> np.ndarray:
        import torch

        y = torch.from_numpy(to_mono(wav)).to(self.cfg.device)[None, None]  # (B=1, C=1, N)
        if y.shape[-1] == 0:
            return np.zeros((self.num_codebooks, 0), np.int64)
        with torch.inference_mode():
            out = self.model.encode(y, bandwidth=self.cfg.bandwidth, return_dict=True)
        return out.audio_codes[0, 0].cpu().numpy().astype(np.int64)  # (chunks=1, B, K, T) -> (K, T)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        codes = self.check_codes(codes)
        if codes.shape[1] == 0:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            audio = self.model.decode(torch.from_numpy(codes).to(self.cfg.device)[None, None], [None],
                                      return_dict=True).audio_values  # (B, C, N)
        return audio[0, 0, : codes.shape[1] * self.hop_length].float().cpu().numpy()

    def state_hash(self) -> str:
        """Hash of the model config, the bandwidth and the weight file's bytes."""
        if self._hash is None:
            config = {k: v for k, v in self.model.config.to_dict().items()
                      if not k.startswith("_") and k != "transformers_version"}  # not where or by what it was saved
            digest = hashlib.sha256(json.dumps({"config": config, "bandwidth": self.cfg.bandwidth}, sort_keys=True,
                                               default=str).encode())
            for name in WEIGHT_FILES:
                if (self.folder / name).exists():
                    with open(self.folder / name, "rb") as fh:
                        while block := fh.read(1 << 22):
                            digest.update(block)
            self._hash = digest.hexdigest()[:16]
        return self._hash
