"""melvq, the embedded codec: compressed HTK-mel frames, quantised by a residual VQ fitted on the train split's music,
decoded back to a waveform without any downloaded weights (numpy + librosa only).

Encode: audio [N] at `sample_rate` -> codes [K, T], T = ceil(N / hop), hop = sample_rate / frame_rate.
  1. STFT (periodic Hann, `n_fft`, hop / `subframes`, centred) -> power |X|^2 [F, T'].
  2. HTK mel filterbank (`n_mels` triangles of peak 1 up to `fmax`), relative to a full-scale sine's power.
  3. max(mel, floor) ** compression; `subframes` consecutive STFT frames are averaged into one token frame [D].
  4. Residual VQ: K codebooks of `codebook_size` entries, each picks the entry nearest to what the previous left.
Decode: codes [K, T] -> audio [T * hop].
  1. The sum of the K entries -> compressed mel; a band within `gate_sigmas` residual standard deviations of the floor
     is silence (VQ noise in silent bands otherwise reads as onsets: onset precision 0.66 -> 0.9 on SynthV2M).
  2. Compression undone; mel -> linear power by non-negative least squares with multiplicative updates.
  3. Phase: single-pass spectrogram inversion (SPSI; Beauregard, Harish & Wyse, 2015: each spectral peak's phase
     advances at its quadratically interpolated frequency, the bins around it are locked to it) as the start of fast
     Griffin-Lim (Perraudin, Balazs & Sondergaard, 2013; momentum 0.99).
Fit: per residual stage, k-means (Lloyd; seeded random distinct frames as the start; a fixed number of iterations)
on up to `fit_frames` frames sampled from the train split; the same seed and music give the same bytes.

Why (measured, see README "Tokenize"): HTK mel with 128 bands keeps the pitch that chroma needs (80 bands lose it
below ~400 Hz); quantising power^0.3 beats dB by far (dB spends the codebooks on inaudible detail); the SPSI start
beats a random one at the same number of iterations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.codecs import Codec, CodecError, to_mono
from pipeline.config import ConfigError, MelVQConfig, TokenizeConfig
from pipeline.shards import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FGLA_MOMENTUM = 0.99
MAX_FRAME_RATE, MAX_CODEBOOKS, MAX_CODEBOOK_SIZE = 50.0, 4, 1024


def from_config(cfg: TokenizeConfig, seed: int = 0) -> MelVQ:
    return MelVQ(cfg.melvq, seed=seed)


class MelVQ(Codec):
    name = "melvq"
    needs_fit = True

    def __init__(self, cfg: MelVQConfig | None = None, seed: int = 0):
        cfg = cfg or MelVQConfig()
        _check(cfg)
        import librosa

        self.cfg, self.seed = cfg, seed
        self.sample_rate, self.frame_rate = cfg.sample_rate, float(cfg.frame_rate)
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.stft_hop = self.hop_length // cfg.subframes
        with warnings.catch_warnings():  # the lowest HTK bands are narrower than an FFT bin; they stay (near) empty
            warnings.simplefilter("ignore", UserWarning)
            self.mel_basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=0.0,
                                                 fmax=cfg.fmax, htk=True, norm=None).astype(np.float32)  # (D, F)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)).astype(np.float32)
        self.ref_power = float(self.window.sum() / 2) ** 2  # |X|^2 of a full-scale sine at a bin centre
        self.floor = float((10 ** (cfg.floor_db / 10)) ** cfg.compression)  # in compressed units
        self.codebooks: np.ndarray | None = None  # (K, codebook_size, D) float32
        self.gate: np.ndarray | None = None  # (D,) compressed units: at or below it a band is silence
        self.fit_info: dict = {}

    # ---------------------------------------------------------------------------------------------- representation
    def _stft(self, y: np.ndarray) -> np.ndarray:
        import librosa

        return librosa.stft(y, n_fft=self.cfg.n_fft, hop_length=self.stft_hop, window=self.window, center=True)

    def _istft(self, spec: np.ndarray, length: int) -> np.ndarray:
        import librosa

        return librosa.istft(spec, hop_length=self.stft_hop, n_fft=self.cfg.n_fft, window=self.window, center=True,
                             length=length)

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Audio [N] or [C, N] -> compressed mel token frames [T, D] float32, T = ceil(N / hop)."""
        y = to_mono(wav)
        n_tokens, s = self.num_frames(len(y)), self.cfg.subframes
        if n_tokens == 0:
            return np.zeros((0, self.cfg.n_mels), np.float32)
        power = np.abs(self._stft(y)) ** 2  # (F, 1 + N // stft_hop)
        mel = np.maximum(self.mel_basis @ power / self.ref_power, 10 ** (self.cfg.floor_db / 10))
        comp = (mel ** self.cfg.compression).astype(np.float32)  # (D, T')
        need = n_tokens * s
        if comp.shape[1] < need:
            comp = np.pad(comp, ((0, 0), (0, need - comp.shape[1])), mode="edge")
        return comp[:, :need].reshape(self.cfg.n_mels, n_tokens, s).mean(axis=2).T  # (T, D)

    def synthesize(self, frames: np.ndarray) -> np.ndarray:
        """Compressed mel token frames [T, D] -> audio [T * hop] float32."""
        n_tokens, s = len(frames), self.cfg.subframes
        length = n_tokens * self.hop_length
        if n_tokens == 0:
            return np.zeros(0, np.float32)
        comp = np.asarray(frames, np.float32).T  # (D, T)
        # STFT frames j = 0 .. T*s (centred at j * stft_hop); token t is the mean of frames t*s .. t*s + s - 1.
        fine = np.arange(n_tokens * s + 1, dtype=np.float64)
        centres = np.arange(n_tokens) * s + (s - 1) / 2
        pos = np.clip(np.interp(fine, centres, np.arange(n_tokens)), 0, n_tokens - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_tokens - 1)
        frac = (pos - lo).astype(np.float32)
        comp = comp[:, lo] * (1 - frac) + comp[:, hi] * frac  # (D, T*s + 1)
        gate = self.gate[:, None] if self.gate is not None else self.floor
        mel = np.where(comp <= gate, 0.0, np.maximum(comp, 0) ** (1 / self.cfg.compression)) * self.ref_power
        magnitude = np.sqrt(nnls_mel_to_linear(self.mel_basis, mel.astype(np.float32), self.cfg.nnls_iters))
        phase = spsi_phase(magnitude, self.stft_hop, self.cfg.n_fft)
        return self._griffin_lim(magnitude, phase, length)

    def _griffin_lim(self, magnitude: np.ndarray, phase: np.ndarray, length: int) -> np.ndarray:
        """Fast Griffin-Lim from an initial phase: [F, T'] -> audio [length]."""
        spec = magnitude * np.exp(1j * phase)
        previous = None
        for _ in range(self.cfg.griffin_lim_iters):
            rebuilt = self._stft(self._istft(spec, length))[:, : magnitude.shape[1]]
            accelerated = rebuilt if previous is None else rebuilt + FGLA_MOMENTUM * (rebuilt - previous)
            previous = rebuilt
            spec = magnitude * np.exp(1j * np.angle(accelerated))
        return self._istft(spec, length).astype(np.float32)

    # ------------------------------------------------------------------------------------------------------- codec
    def encode(self, wav: np.ndarray) -> np.ndarray:
        self._require_fit()
        return rvq_encode(self.features(wav), self.codebooks)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._require_fit()
        codes = self.check_codes(codes)
        return self.synthesize(rvq_decode(codes, self.codebooks))

    def _require_fit(self) -> None:
        if self.codebooks is None:
            raise CodecError("melvq is not fitted: fit() it on music or load() a saved state (v2m tokenize does)")

    def fit(self, wavs: Iterable[np.ndarray]) -> dict:
        """Fit the K codebooks on the token frames of `wavs` (the train split's music). Returns fit statistics."""
        cfg = self.cfg
        frames, n_items = [], 0
        for wav in wavs:
            frames.append(self.features(wav))
            n_items += 1
        data = np.concatenate(frames) if frames else np.zeros((0, cfg.n_mels), np.float32)
        if len(data) == 0:
            raise CodecError("melvq: no audio to fit the codebooks on")
        rng = np.random.default_rng([self.seed, 1])
        if len(data) > cfg.fit_frames:
            data = data[np.sort(rng.choice(len(data), cfg.fit_frames, replace=False))]
        if len(data) < cfg.codebook_size:
            log.warning("melvq: only %d frames to fit %d-entry codebooks; entries will repeat", len(data),
                        cfg.codebook_size)
        residual = data.copy()
        books, distortion = [], []
        for _ in range(cfg.num_codebooks):
            book = kmeans(residual, cfg.codebook_size, cfg.kmeans_iters, rng)
            residual -= book[nearest(residual, book)]
            books.append(book)
            distortion.append(float(np.mean(residual.astype(np.float64) ** 2)))
        self.codebooks = np.stack(books).astype(np.float32)
        self.gate = (self.floor + cfg.gate_sigmas * residual.std(axis=0)).astype(np.float32)
        self.fit_info = {"items": n_items, "frames": int(len(data)), "seed": self.seed,
                         "mse_per_stage": [round(d, 8) for d in distortion]}
        return dict(self.fit_info)

    # ------------------------------------------------------------------------------------------------------- state
    def state_hash(self) -> str:
        self._require_fit()
        digest = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        digest.update(self.codebooks.tobytes())
        digest.update(self.gate.tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """{directory}/codebooks.npy (K, size, D), gate.npy (D,) and melvq.json (settings, fit info), written last."""
        self._require_fit()
        directory = Path(directory)
        for name, array in (("codebooks.npy", self.codebooks), ("gate.npy", self.gate)):
            with atomic_path(directory / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
        atomic_write_json(directory / "melvq.json", {"codec": self.name, "config": asdict(self.cfg),
                                                     "seed": self.seed, "fit": self.fit_info,
                                                     "state_hash": self.state_hash(), **(extra or {})})

    def load(self, directory: str | Path) -> dict:
        """Restore a saved state (its settings included) from `directory`; returns melvq.json."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "melvq.json").read_text())
            codebooks, gate = np.load(directory / "codebooks.npy"), np.load(directory / "gate.npy")
        except FileNotFoundError as exc:
            raise CodecError(f"{directory}: no saved melvq state ({Path(exc.filename).name} is missing); "
                             "run `v2m tokenize` to fit it") from None
        self.__init__(MelVQConfig(**meta["config"]), seed=meta.get("seed", 0))
        if codebooks.shape != (self.num_codebooks, self.codebook_size, self.cfg.n_mels):
            raise CodecError(f"{directory}/codebooks.npy: shape {codebooks.shape} does not match melvq.json")
        self.codebooks, self.gate, self.fit_info = codebooks, gate, meta.get("fit", {})
        if self.state_hash() != meta.get("state_hash"):
            raise CodecError(f"{directory}: codebooks do not match the state_hash in melvq.json (a partial write?)")
        return meta


def _check(cfg: MelVQConfig) -> None:
    """Reject settings the codec cannot honour, naming the params key."""
    key = "tokenize.melvq"
    hop = cfg.sample_rate / cfg.frame_rate if cfg.frame_rate > 0 else 0
    problems = []
    if not 0 < cfg.frame_rate <= MAX_FRAME_RATE:
        problems.append(f"{key}.frame_rate: must be in (0, {MAX_FRAME_RATE:g}] Hz, got {cfg.frame_rate}")
    elif abs(hop - round(hop)) > 1e-9 or round(hop) % max(cfg.subframes, 1):
        problems.append(f"{key}.frame_rate: sample_rate / frame_rate = {hop:g} must be a whole number of samples "
                        f"divisible by subframes ({cfg.subframes})")
    if not 1 <= cfg.num_codebooks <= MAX_CODEBOOKS:
        problems.append(f"{key}.num_codebooks: must be 1..{MAX_CODEBOOKS}, got {cfg.num_codebooks}")
    if not 2 <= cfg.codebook_size <= MAX_CODEBOOK_SIZE:
        problems.append(f"{key}.codebook_size: must be 2..{MAX_CODEBOOK_SIZE}, got {cfg.codebook_size}")
    if cfg.subframes < 1 or (hop and cfg.n_fft < hop / max(cfg.subframes, 1)):
        problems.append(f"{key}.subframes / n_fft: need subframes >= 1 and n_fft >= the STFT hop")
    if not 0 < cfg.compression <= 1 or not 0 < cfg.fmax <= cfg.sample_rate / 2:
        problems.append(f"{key}.compression / fmax: need 0 < compression <= 1 and 0 < fmax <= sample_rate / 2")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------- vector quantiser
def nearest(x: np.ndarray, book: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest codebook entry (squared Euclidean) for each row of x [N, D] -> [N] int64."""
    out = np.empty(len(x), np.int64)
    norms = np.einsum("kd,kd->k", book, book)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmin(norms[None, :] - 2.0 * (x[start : start + chunk] @ book.T), axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on x [N, D] float32 -> centroids [k, D]; an emptied cluster takes the worst-fitted point."""
    from scipy import sparse

    n = len(x)
    centroids = x[rng.choice(n, size=k, replace=n < k)].copy()
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = np.bincount(assign, minlength=k)
        onehot = sparse.csr_matrix((np.ones(n, np.float32), (assign, np.arange(n))), shape=(k, n))
        sums = np.asarray(onehot @ x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if not filled.all():
            error = np.einsum("nd,nd->n", x - centroids[assign], x - centroids[assign])
            worst = np.argsort(-error, kind="stable")
            centroids[~filled] = x[np.resize(worst, int((~filled).sum()))]  # cycles when there are fewer points
    return centroids.astype(np.float32)


def rvq_encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Residual VQ: frames [T, D] -> codes [K, T] int64."""
    residual = np.array(x, dtype=np.float32, copy=True)
    codes = np.empty((len(codebooks), len(x)), np.int64)
    for k, book in enumerate(codebooks):
        codes[k] = nearest(residual, book)
        residual -= book[codes[k]]
    return codes


def rvq_decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Codes [K, T] -> frames [T, D]: the sum of the chosen entries."""
    frames = np.zeros((codes.shape[1], codebooks.shape[2]), np.float32)
    for k in range(codes.shape[0]):
        frames += codebooks[k][codes[k]]
    return frames


# ---------------------------------------------------------------------------------------------------- inversion
def nnls_mel_to_linear(basis: np.ndarray, mel: np.ndarray, iters: int) -> np.ndarray:
    """Non-negative S [F, T] with basis [D, F] @ S ~ mel [D, T], by multiplicative updates (Lee & Seung, Euclidean).

    Started from basis.T @ mel; the factored form (basis.T @ (basis @ S)) costs 2 D F T per step instead of F^2 T.
    """
    numerator = basis.T @ mel
    linear = numerator.copy()
    for _ in range(iters):
        linear *= numerator / (basis.T @ (basis @ linear) + 1e-12)
    return linear


def spsi_phase(magnitude: np.ndarray, hop: int, n_fft: int) -> np.ndarray:
    """Single-pass spectrogram inversion (Beauregard et al. 2015): phase [F, T] for a magnitude [F, T].

    Each local maximum is a sinusoid at the quadratically interpolated bin b0 = p + delta; its phase advances by
    2 pi hop b0 / n_fft per frame, and every bin k between the neighbouring midpoints takes the phase of a Hann-windowed
    sinusoid there, phi - pi (k - b0) (adjacent bins of a main lobe differ by pi).
    """
    n_bins, n_frames = magnitude.shape
    phase = np.zeros((n_bins, n_frames), np.float32)
    accum = np.zeros(n_bins)
    bins = np.arange(n_bins)
    for t in range(n_frames):
        m = magnitude[:, t]
        peaks = np.flatnonzero((m[1:-1] > m[:-2]) & (m[1:-1] >= m[2:])) + 1
        if len(peaks) == 0:
            phase[:, t] = accum
            continue
        alpha, beta, gamma = m[peaks - 1], m[peaks], m[peaks + 1]
        denom = alpha - 2 * beta + gamma
        safe = np.where(np.abs(denom) > 1e-20, denom, 1.0)
        delta = np.where(np.abs(denom) > 1e-20, 0.5 * (alpha - gamma) / safe, 0.0)
        centre = peaks + delta
        accum[peaks] = np.mod(accum[peaks] + 2 * np.pi * hop * centre / n_fft, 2 * np.pi)
        edges = np.concatenate([[0], (peaks[1:] + peaks[:-1]) // 2 + 1, [n_bins]])
        owner = np.repeat(np.arange(len(peaks)), np.diff(edges))
        phase[:, t] = accum[peaks][owner] - np.pi * (bins - centre[owner])
    return phase

