"""Pretrained classifiers and embedders for KLD and FAD, loaded from local files only; torch is imported lazily.

- PaSST (Koutini et al. 2022), the 20 s AudioSet model audiocraft uses for KLD: the `hear21passt` package and its
  checkpoint `passt-s-f128-20sec-p16-s10-ap.474-swa.pt` (kkoutini/PaSST release v0.0.5). Path from the argument or
  `$V2M_PASST_CHECKPOINT`. Nothing is downloaded: the network is built without weights and the file is loaded.
- VGGish (Hershey et al. 2017), the FAD embedder: the `torchvggish` package (harritaylor/torchvggish, the torch
  port that torch hub serves) and its weights `vggish-10086976.pth`. Path from the argument or
  `$V2M_VGGISH_WEIGHTS`. Embeddings are the network output without the PCA/quantisation postprocessing, which
  Google's FAD does not use either.

A missing package or file raises `MissingModelError` naming what is missing and how to provide it.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from pathlib import Path

import numpy as np

PASST_ENV = "V2M_PASST_CHECKPOINT"
PASST_FILE = "passt-s-f128-20sec-p16-s10-ap.474-swa.pt"
VGGISH_ENV = "V2M_VGGISH_WEIGHTS"
VGGISH_FILE = "vggish-10086976.pth"
VGGISH_INSTALL = "pip install torchvggish torch"


class MissingModelError(RuntimeError):
    """A pretrained model's package or weights are not available; the message says which and how to get them."""


def _weights_path(path: str | Path | None, env: str, filename: str, what: str, flag: str) -> Path:
    path = path or os.environ.get(env)
    if not path:
        raise MissingModelError(f"{what} needs its weights file {filename}: pass {flag} PATH or set ${env}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingModelError(f"{path}: {what} weights not found (expected the file {filename})")
    return path


def _import(what: str, package: str, install: str):
    try:
        return __import__(package, fromlist=["_"])
    except ModuleNotFoundError as exc:
        raise MissingModelError(f"{what} needs the Python package {exc.name!r}: {install}") from None


class PasstClassifier:
    """PaSST 20 s AudioSet tagger: mono 32 kHz segment [N] -> logits [527]."""

    sample_rate = 32_000

    def __init__(self, model, device: str = "cpu"):
        self.model, self.device = model, device

    def __call__(self, segment: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(segment, dtype=np.float32))[None].to(self.device)
        old_stft = torch.stft
        # hear21passt calls torch.stft without return_complex, which current torch rejects (audiocraft patches it too)
        torch.stft = partial(old_stft, return_complex=False)
        try:
            with torch.no_grad(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                logits = self.model(x)
        finally:
            torch.stft = old_stft
        return logits[0].float().cpu().numpy()


def load_passt(checkpoint: str | Path | None = None, device: str = "cpu") -> PasstClassifier:
    """Build hear21passt's 20 s PaSST (as `hear21passt.base20sec`) and load a local checkpoint into it."""
    path = _weights_path(checkpoint, PASST_ENV, PASST_FILE, "PaSST (KLD)", "--passt")
    install = "pip install hear21passt torch"
    torch = _import("PaSST (KLD)", "torch", install)
    passt = _import("PaSST (KLD)", "hear21passt.models.passt", install)
    preprocess = _import("PaSST (KLD)", "hear21passt.models.preprocess", install)
    wrapper = _import("PaSST (KLD)", "hear21passt.wrapper", install)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the package prints the whole model
        mel = preprocess.AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48,
                                        timem=192, htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10,
                                        fmax_aug_range=2000)
        net = passt.get_model(arch="passt_20sec", pretrained=False, input_tdim=2000)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as exc:  # noqa: BLE001 - truncated file, another network's state dict: name the file
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise MissingModelError(f"{path}: not a PaSST 20 s checkpoint ({PASST_FILE}) that loads into hear21passt's "
                                f"passt_20sec: {type(exc).__name__}: {first}") from None
    model = wrapper.PasstBasicWrapper(mel=mel, net=net, max_model_window=20000, mode="logits")
    return PasstClassifier(model.eval().to(device), device)


class VggishEmbedder:
    """VGGish: mono 16 kHz clip [N] -> embeddings [T, 128], one per 0.96 s example."""

    sample_rate = 16_000

    def __init__(self, model, examples_fn, device: str = "cpu"):
        self.model, self.examples_fn, self.device = model, examples_fn, device

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        import torch

        examples = self.examples_fn(np.asarray(wav, dtype=np.float64), self.sample_rate)
        examples = torch.as_tensor(np.asarray(examples.detach() if hasattr(examples, "detach") else examples))
        if examples.ndim == 3:  # [T, 96, 64] -> [T, 1, 96, 64]
            examples = examples[:, None]
        if len(examples) == 0:
            return np.zeros((0, 128))
        with torch.no_grad():
            return self.model(examples.float().to(self.device)).cpu().numpy()


def load_vggish(weights: str | Path | None = None, device: str = "cpu") -> VggishEmbedder:
    """Build torchvggish's VGG network and load local weights into it (no PCA postprocessing)."""
    path = _weights_path(weights, VGGISH_ENV, VGGISH_FILE, "VGGish (FAD)", "--vggish")
    torch = _import("VGGish (FAD)", "torch", VGGISH_INSTALL)
    vggish_input = _import("VGGish (FAD)", "torchvggish.vggish_input", VGGISH_INSTALL)
    model = vggish_network()
    try:
        model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - truncated file, another network's state dict: name the file
        raise MissingModelError(f"{path}: not VGGish weights ({VGGISH_FILE}) that load into torchvggish's VGG: "
                                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from None
    return VggishEmbedder(model.eval().to(device), vggish_input.waveform_to_examples, device)


def vggish_network():
    """torchvggish's VGG with random weights, no PCA postprocessing. The torch hub checkout names the module
    `torchvggish.vggish`, the PyPI package `torchvggish.torchvggish` (whose VGG also takes `postprocess`)."""
    try:
        vggish = __import__("torchvggish.vggish", fromlist=["_"])
    except ModuleNotFoundError:
        vggish = _import("VGGish (FAD)", "torchvggish.torchvggish", VGGISH_INSTALL)
    import inspect

    takes_postprocess = "postprocess" in inspect.signature(vggish.VGG).parameters
    return vggish.VGG(vggish.make_layers(), False) if takes_postprocess else vggish.VGG(vggish.make_layers())
