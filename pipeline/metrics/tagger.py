"""The project's audio tagger: a small CNN on log-mel trained on SynthV2M music to predict its labels.

It stands in for the pretrained models of the published metrics where their weights are not at hand (the embedded
profile): its softmax replaces PaSST's in KLD, its penultimate layer replaces VGGish in FAD. Scores computed with it
are reported as `kld_pq_tagger`, `kld_qp_tagger` and `fad_tagger`: they are comparable between our systems, not
with published figures. It also gives `instrument_acc` (its instrument head on generated music).

- Input: mono 16 kHz audio -> log-mel (`TaggerConfig`, params `evaluate.tagger`: 2048-point STFT, 40 ms hop, 96
  Slaney mel bands from 40 Hz to 6 kHz, log(1e-5 + power)), normalised by the training set's mean and std per band.
- Network (`TaggerNet`): 4 conv blocks (3x3 conv, batch norm, ReLU; max-pooling that halves frequency every block and
  time every other block), mean over frequency -> frames [B, C, T/4]; mean + max over time, a tempo descriptor
  (autocorrelation of the log-mel's positive spectral flux over lags 0.25-1.5 s) and a chroma folded from the
  300-1500 Hz mel bands -> linear + ReLU: the `embedding_dim` penultimate vector -> linear heads for instrument, mode
  and tempo class. The key head correlates the chroma, rotated to each tonic, with two learned key profiles
  initialised to Krumhansl-Kessler's (a learned Krumhansl-Schmuckler); those scores also feed the mode head.
- Labels (`label_vocab`): instrument (4), key tonic (12), mode (2) and tempo class (`tempo_edges`: < 100, 100-120,
  >= 120 BPM by default). `LabelClassifier.__call__` returns the log-probabilities of the joint label: the sum of the
  heads' log-softmaxes over all 4 x 12 x 2 x 3 = 288 combinations, so the softmax that `kld.label_distributions`
  applies gives the product of the heads' distributions and the KLD is the sum of the per-head KLDs.
- Embeddings for FAD: the penultimate vector of each `crop_s` window, hop `embed_hop_s` (5 frames for an 8 s clip).
- Training (`fit`): random `crop_s` crops of the train split's music, AdamW, cross-entropy summed over heads, seeded
  (same seed and music -> same weights on one machine). The checkpoint keeps the config, label vocabulary,
  normalisation and held-out accuracy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.config import TaggerConfig

log = logging.getLogger(__name__)

INSTRUMENTS = ("piano", "organ", "pluck", "bell")
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")


def tempo_classes(edges: tuple[float, ...]) -> tuple[str, ...]:
    bounds = [f"{e:g}" for e in edges]
    return tuple([f"<{bounds[0]}"] + [f"{a}-{b}" for a, b in zip(bounds, bounds[1:], strict=False)]
                 + [f">={bounds[-1]}"])


def label_vocab(settings: TaggerConfig) -> dict[str, tuple[str, ...]]:
    return {"instrument": INSTRUMENTS, "key": PITCH_CLASSES, "mode": MODES,
            "tempo": tempo_classes(tuple(settings.tempo_edges))}


def encode_labels(row: dict, settings: TaggerConfig) -> dict[str, int]:
    """Class indices of one labelled clip (a manifest row with instrument, key, mode, tempo_bpm)."""
    from pipeline.metrics.rhythm import parse_key

    key = parse_key(str(row["key"]), str(row["mode"]))
    tempo = float(row["tempo_bpm"])
    return {"instrument": INSTRUMENTS.index(str(row["instrument"])), "key": PITCH_CLASSES.index(key.tonic),
            "mode": MODES.index(key.mode), "tempo": int(np.searchsorted(settings.tempo_edges, tempo, side="right"))}


def _torch():
    import torch

    return torch


def _chroma_fold(settings: TaggerConfig) -> np.ndarray:
    """[12, n_mels]: mean over the mel bands of each pitch class (C first), bands centred in 300-1500 Hz only: below,
    a mel band spans several semitones; above, harmonics blur the pitch classes (measured on SynthV2M train music:
    Krumhansl-Schmuckler on this fold finds 62 % of tonics before any training, 45-55 % with other ranges)."""
    import librosa

    centres = librosa.mel_frequencies(settings.n_mels + 2, fmin=settings.fmin, fmax=settings.fmax)[1:-1]
    fold = np.zeros((12, settings.n_mels), dtype=np.float32)
    for band, f in enumerate(centres):
        if 300.0 <= f <= 1500.0:
            fold[int(round(12 * np.log2(f / 440.0))) % 12 - 3, band] = 1.0  # A = 9: shift so C is row 0
    return fold / np.maximum(fold.sum(axis=1, keepdims=True), 1.0)


def _build_net(settings: TaggerConfig, head_sizes: dict[str, int]):
    torch = _torch()
    nn = torch.nn
    from pipeline.metrics.rhythm import KK_MAJOR, KK_MINOR

    class TaggerNet(nn.Module):
        """normalised log-mel [B, M, T] -> (embedding [B, D], {head: logits [B, n]})."""

        def __init__(self):
            super().__init__()
            layers, c_in = [], 1
            for i, c in enumerate(settings.channels):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                           nn.MaxPool2d((2, 2) if i % 2 else (2, 1))]
                c_in = c
            self.convs = nn.Sequential(*layers)
            frame_s = settings.hop / settings.sample_rate
            self.lags = list(range(max(1, round(0.25 / frame_s)), round(1.5 / frame_s) + 1))
            self.tempo_proj = nn.Linear(len(self.lags), 32)
            self.register_buffer("fold", torch.from_numpy(_chroma_fold(settings)))
            self.register_buffer("rolls", torch.tensor([[(k + j) % 12 for j in range(12)] for k in range(12)]))
            # key profiles, initialised to Krumhansl-Kessler's (standardised): the key head starts as
            # Krumhansl-Schmuckler on the folded chroma and is refined by training
            profiles = np.stack([KK_MAJOR, KK_MINOR])
            profiles = (profiles - profiles.mean(1, keepdims=True)) / profiles.std(1, keepdims=True)
            self.profiles = nn.Parameter(torch.tensor(profiles, dtype=torch.float32))
            self.key_scale = nn.Parameter(torch.tensor(5.0))
            self.register_buffer("mel_mean", torch.zeros(settings.n_mels))
            self.register_buffer("mel_std", torch.ones(settings.n_mels))
            self.embed = nn.Sequential(nn.Linear(2 * c_in + 32 + 12, settings.embedding_dim), nn.ReLU())
            self.heads = nn.ModuleDict({name: nn.Linear(settings.embedding_dim, head_sizes[name])
                                        for name in ("instrument", "mode", "tempo")})

        def tempo_descriptor(self, mel):  # [B, M, T] -> [B, L]: normalised autocorrelation of the spectral flux
            flux = torch.relu(mel[:, :, 1:] - mel[:, :, :-1]).mean(dim=1)  # [B, T-1]
            flux = flux - flux.mean(dim=1, keepdim=True)
            energy = (flux * flux).sum(dim=1, keepdim=True) + 1e-6
            n = flux.shape[1]
            ac = [(flux[:, : n - lag] * flux[:, lag:]).sum(dim=1, keepdim=True) if lag < n
                  else torch.zeros_like(energy) for lag in self.lags]
            return torch.cat(ac, dim=1) / energy

        def forward(self, mel):
            power = torch.exp(mel * self.mel_std[:, None] + self.mel_mean[:, None]).mean(dim=2)  # undo normalisation
            chroma = power @ self.fold.T  # [B, 12]
            chroma = (chroma - chroma.mean(1, keepdim=True)) / (chroma.std(1, keepdim=True) + 1e-4)
            # score[b, m, k]: correlation of the chroma rotated to tonic k with the profile of mode m
            scores = torch.einsum("bkj,mj->bmk", chroma[:, self.rolls], self.profiles) * self.key_scale / 12
            x = self.convs(mel[:, None]).mean(dim=2)  # [B, C, T']
            pooled = torch.cat([x.mean(dim=2), x.amax(dim=2),
                                torch.relu(self.tempo_proj(self.tempo_descriptor(mel))), chroma], dim=1)
            emb = self.embed(pooled)  # [B, D]
            logits = {name: head(emb) for name, head in self.heads.items()}
            logits["key"] = torch.logsumexp(scores, dim=1)
            logits["mode"] = logits["mode"] + torch.logsumexp(scores, dim=2)
            return emb, logits

    return TaggerNet()


def log_mel(wav: np.ndarray, settings: TaggerConfig) -> np.ndarray:
    """Log-mel [n_mels, T] of mono audio [N] at settings.sample_rate (centred STFT, Hann, power 2)."""
    import librosa

    spec = np.abs(librosa.stft(np.asarray(wav, dtype=np.float32), n_fft=settings.n_fft, hop_length=settings.hop,
                               center=True)) ** 2
    fb = librosa.filters.mel(sr=settings.sample_rate, n_fft=settings.n_fft, n_mels=settings.n_mels,
                             fmin=settings.fmin, fmax=settings.fmax)
    return np.log(1e-5 + fb @ spec).astype(np.float32)


def resample(wav: np.ndarray, sample_rate: int, target: int) -> np.ndarray:
    """Audio [N] (or any shape, flattened) at sample_rate -> float32 [M] at target (soxr_hq; unchanged when equal)."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if sample_rate == target:
        return wav
    import librosa

    return librosa.resample(wav, orig_sr=sample_rate, target_sr=target, res_type="soxr_hq")


class Tagger:
    """A trained tagger. `sample_rate` + `__call__(segment) -> logits [288]` (a kld.LabelClassifier) and
    `embedder` (a fad.Embedder: clip [N] -> [T, D]); `predict(wav, sr)` -> {head: class name}."""

    def __init__(self, net, settings: TaggerConfig, mean: np.ndarray, std: np.ndarray, accuracy: dict | None = None):
        self.net, self.settings = net.eval(), settings
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.vocab = label_vocab(settings)
        self.accuracy = accuracy or {}
        self.sample_rate = settings.sample_rate
        self.embedder = _Embedder(self)

    def _forward(self, mels: list[np.ndarray]):
        torch = _torch()
        x = torch.from_numpy(np.stack([(m - self.mean[:, None]) / self.std[:, None] for m in mels]))
        with torch.no_grad():
            return self.net(x)

    def head_log_probs(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """{head: log-probabilities [n]} of one mono segment [N] at `sample_rate`."""
        torch = _torch()
        _, logits = self._forward([log_mel(wav, self.settings)])
        return {k: torch.log_softmax(v[0].double(), dim=0).numpy() for k, v in logits.items()}

    def __call__(self, segment: np.ndarray) -> np.ndarray:
        """Joint log-probabilities [4 * 12 * 2 * n_tempo] (instrument, key, mode, tempo; C order)."""
        heads = self.head_log_probs(segment)
        joint = np.zeros(())
        for name in ("instrument", "key", "mode", "tempo"):
            joint = joint[..., None] + heads[name]
        return joint.reshape(-1)

    def predict(self, wav: np.ndarray, sample_rate: int) -> dict[str, str]:
        """The most likely class of each head for mono audio [N]."""
        heads = self.head_log_probs(resample(wav, sample_rate, self.sample_rate))
        return {k: self.vocab[k][int(np.argmax(v))] for k, v in heads.items()}

    def embed(self, wav: np.ndarray) -> np.ndarray:
        """Penultimate-layer vectors [T, D] of `crop_s` windows every `embed_hop_s` of mono audio [N]."""
        s = self.settings
        size, hop = int(s.crop_s * s.sample_rate), int(s.embed_hop_s * s.sample_rate)
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if len(wav) < size:
            wav = np.pad(wav, (0, size - len(wav)))
        starts = range(0, len(wav) - size + 1, hop)
        emb, _ = self._forward([log_mel(wav[i : i + size], s) for i in starts])
        return emb.double().numpy()

    def save(self, path: str | Path) -> None:
        from pipeline.shards import atomic_torch_save

        torch = _torch()
        atomic_torch_save(Path(path), {"settings": asdict(self.settings), "state_dict": self.net.state_dict(),
                                       "mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std),
                                       "accuracy": self.accuracy,
                                       "vocab": self.vocab})


class _Embedder:
    """The tagger as a fad.Embedder."""

    def __init__(self, tagger: Tagger):
        self.tagger, self.sample_rate = tagger, tagger.sample_rate

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        return self.tagger.embed(wav)


def load_tagger(path: str | Path) -> Tagger:
    """A tagger saved by `Tagger.save` (e.g. models/tagger/tagger.pt)."""
    from pipeline.metrics.models import MissingModelError

    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise MissingModelError(f"{path}: no fitted tagger; run `v2m evaluate --fit-tagger` (DVC stage `tagger`) first")
    try:  # weights_only: plain types and tensors; a file that needs code to load is refused
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line naming the file, not a traceback
        raise MissingModelError(f"{path}: not a tagger checkpoint that loads as data ({type(exc).__name__}); "
                                "refit it with `v2m evaluate --fit-tagger`") from None
    data = dict(ckpt["settings"])
    settings = TaggerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    net = _build_net(settings, {k: len(v) for k, v in label_vocab(settings).items()})
    net.load_state_dict(ckpt["state_dict"])
    return Tagger(net, settings, np.asarray(ckpt["mean"]), np.asarray(ckpt["std"]), ckpt.get("accuracy"))


def fit(train: list[tuple[np.ndarray, dict]], sample_rate: int, settings: TaggerConfig, seed: int,
        val: list[tuple[np.ndarray, dict]] | None = None) -> Tagger:
    """Train a tagger on (mono audio [N], manifest row) pairs at `sample_rate`; `val` pairs give its accuracy.

    Returns:
        the trained `Tagger`; `tagger.accuracy` holds per-head accuracy on `val` (whole clips), when given.
    """
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, settings.threads))
    try:
        mels = [log_mel(resample(w, sample_rate, settings.sample_rate), settings) for w, _ in train]
        encoded = [encode_labels(row, settings) for _, row in train]
        targets = {k: torch.tensor([e[k] for e in encoded]) for k in label_vocab(settings)}
        allframes = np.concatenate(mels, axis=1)
        mean, std = allframes.mean(axis=1), allframes.std(axis=1) + 1e-3
        mels = [(m - mean[:, None]) / std[:, None] for m in mels]
        crop = int(round(settings.crop_s * settings.sample_rate / settings.hop))
        mels = [np.pad(m, ((0, 0), (0, max(0, crop - m.shape[1]))), mode="edge") for m in mels]
        net = _build_net(settings, {k: len(v) for k, v in label_vocab(settings).items()})
        net.mel_mean.copy_(torch.from_numpy(mean))
        net.mel_std.copy_(torch.from_numpy(std))
        decay = [p for p in net.parameters() if p.ndim > 1]
        rest = [p for p in net.parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
        steps_per_epoch = max(1, math.ceil(len(mels) / settings.batch_size))
        total = settings.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total, pct_start=0.15)
        net.train()
        for epoch in range(settings.epochs):
            order = rng.permutation(len(mels))
            losses = []
            for b in range(steps_per_epoch):
                idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
                starts = [int(rng.integers(0, mels[i].shape[1] - crop + 1)) for i in idx]
                x = torch.from_numpy(np.stack([mels[i][:, s : s + crop] for i, s in zip(idx, starts, strict=True)]))
                x = x + 0.1 * float(rng.normal()) * torch.ones(1)  # a random gain (log domain) per batch
                _, logits = net(x)
                index = torch.from_numpy(idx)
                loss = sum(torch.nn.functional.cross_entropy(logits[k], targets[k][index]) for k in logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            if epoch % 10 == 9 or epoch == settings.epochs - 1:
                log.info("tagger epoch %d/%d: loss %.3f", epoch + 1, settings.epochs, float(np.mean(losses)))
        tagger = Tagger(net.eval(), settings, mean, std)
        if val:
            tagger.accuracy = accuracy(tagger, val, sample_rate)
        return tagger
    finally:
        torch.set_num_threads(old_threads)


def accuracy(tagger: Tagger, pairs: list[tuple[np.ndarray, dict]], sample_rate: int) -> dict[str, float]:
    """Per-head accuracy of whole clips, plus `key_mode` (tonic and mode both right)."""
    hits: dict[str, list[float]] = {k: [] for k in (*tagger.vocab, "key_mode")}
    for wav, row in pairs:
        pred = tagger.predict(wav, sample_rate)
        true = encode_labels(row, tagger.settings)
        for k in tagger.vocab:
            hits[k].append(float(tagger.vocab[k].index(pred[k]) == true[k]))
        hits["key_mode"].append(hits["key"][-1] * hits["mode"][-1])
    return {k: float(np.mean(v)) for k, v in hits.items()}
