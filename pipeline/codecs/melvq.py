"""melvq, the embedded codec: compressed HTK-mel frames, quantised by a residual VQ fitted on the train split's music,
decoded back to a waveform without any downloaded weights (numpy + librosa only).

Encode: audio [N] at `sample_rate` -> codes [K, T], T = ceil(N / hop), hop = sample_rate / frame_rate.
  1. STFT at the token rate (periodic Hann, `n_fft`, hop, centred: frame t is centred at sample t * hop) -> |X|^2.
  2. HTK mel filterbank (`n_mels` triangles of peak 1 up to `fmax`), relative to a full-scale sine's power.
  3. max(mel, floor) ** compression -> one token frame [D = n_mels].
  4. Residual VQ: K codebooks of `codebook_size` entries, each picks the entry nearest to what the previous left,
     on the frame times the band weights (`band_weight` in the pitch band `band_low_hz`..`band_high_hz`, 1 elsewhere:
     the squared distance counts the bands that carry chords and melody band_weight^2 times). The codebooks hold
     weighted entries.
Decode: codes [K, T] -> audio [T * hop].
  1. The sum of the K entries, divided by the band weights -> compressed mel; a band within `gate_sigmas` residual
     standard deviations (measured on the fit frames) of the floor is silence: VQ noise in silent bands otherwise
     reads as onsets (onset precision 0.66 -> 0.9 on SynthV2M). Then linear interpolation to `subframes` synthesis
     frames per token.
  2. Compression undone; mel -> linear power by non-negative least squares with multiplicative updates.
  3. Phase: single-pass spectrogram inversion (SPSI; Beauregard, Harish & Wyse, 2015: each spectral peak's phase
     advances at its quadratically interpolated frequency, the bins around it are locked to it) as the start of fast
     Griffin-Lim (Perraudin, Balazs & Sondergaard, 2013; momentum 0.99).
Fit: per residual stage, k-means (Lloyd; seeded random distinct frames as the start; a fixed number of iterations)
on up to `fit_frames` frames sampled from the train split; the same seed and music give the same bytes.

Same bytes on any machine (docs/reproducibility.md). Token frames are computed in float64 (deterministic STFT and
a sparse mel product, no BLAS) and rounded to a grid of GRID = 2^-14; every vector-quantiser step then works on
whole multiples of GRID held in float64: squared distances, centroid sums and residuals are integers below 2^53, so
they are exact whatever the BLAS kernel, thread count or summation order, and argmin (first index on a tie) cannot
flip between machines. The float64 rounding noise left before the grid (1e-16 relative, e.g. SIMD vs libm `pow`)
moves a grid point with a probability of about 1e-12 per value.

Why (measured on SynthV2M and real music, docs/studies/codec.md has the table): HTK mel with 128 bands keeps the pitch
that chroma needs (80 bands lose it below ~400 Hz); quantising power^0.3 beats dB (dB spends the codebooks on inaudible
detail) and beats power^0.2; the gate lifts onset F1 by ~0.03-0.08; analysing at the token rate and interpolating keeps
attacks sharper than averaging the synthesis frames (beat F1 on real music without VQ 0.72 -> 0.91); SPSI beats a
random phase start at the same iterations. The held-out chroma is limited by the codebooks' generalisation (what they
have not seen, e.g. a key missing from a small train split, they cannot reproduce), not by the inversion (0.92-0.96
without VQ).
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
# Settings that only change how tokens are decoded: not part of the fit, nor of the state hash that names the tokens,
# and a loaded state takes them from the current params rather than from the saved file.
DECODE_ONLY = ("subframes", "gate_sigmas", "nnls_iters", "griffin_lim_iters")
MAX_FRAME_RATE, MAX_CODEBOOKS, MAX_CODEBOOK_SIZE = 50.0, 4, 1024
BAND_KEYS = ("band_weight", "band_low_hz", "band_high_hz")
GRID = 2.0**-14  # token frames are whole multiples of this (compressed mel units): see "Same bytes on any machine"
MAX_FEATURE = 32.0  # token frames are clipped here (a full-scale sine's band is ~1): keeps every VQ sum exact
EXACT = 2.0**53  # integers below this are exact in float64


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
        from scipy import sparse

        with warnings.catch_warnings():  # the lowest HTK bands are narrower than an FFT bin; they stay (near) empty
            warnings.simplefilter("ignore", UserWarning)
            basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=0.0,
                                        fmax=cfg.fmax, htk=True, norm=None, dtype=np.float64)  # (D, F)
        self.mel_basis = basis  # decoding (NNLS), in float64 like the analysis
        self.mel_sparse = sparse.csr_matrix(basis)  # analysis: a fixed-order sum, the same bits on any CPU
        self.window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # float64
        self.ref_power = float(self.window.sum() / 2) ** 2  # |X|^2 of a full-scale sine at a bin centre
        self.floor = float((10 ** (cfg.floor_db / 10)) ** cfg.compression)  # in compressed units
        centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=0.0, fmax=cfg.fmax, htk=True)[1:-1]
        pitch_band = (centres >= cfg.band_low_hz) & (centres <= cfg.band_high_hz)
        self.band_weights = np.where(pitch_band, float(cfg.band_weight), 1.0)  # (D,) whole numbers, float64
        self.codebooks: np.ndarray | None = None  # (K, codebook_size, D) float32
        self.residual_std: np.ndarray | None = None  # (D,) of the fit frames after the last stage
        self.fit_info: dict = {}

    @property
    def gate(self) -> np.ndarray | None:
        """(D,) in compressed units: a decoded band at or below it is silence (None before the fit)."""
        if self.residual_std is None:
            return None
        return (self.floor + self.cfg.gate_sigmas * self.residual_std).astype(np.float32)

    # ---------------------------------------------------------------------------------------------- representation
    def _stft(self, y: np.ndarray, hop: int | None = None) -> np.ndarray:
        import librosa

        return librosa.stft(y, n_fft=self.cfg.n_fft, hop_length=hop or self.stft_hop, window=self.window, center=True)

    def _istft(self, spec: np.ndarray, length: int) -> np.ndarray:
        import librosa

        return librosa.istft(spec, hop_length=self.stft_hop, n_fft=self.cfg.n_fft, window=self.window, center=True,
                             length=length)

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Audio [N] or [C, N] -> compressed mel token frames [T, D] float32, T = ceil(N / hop); frame t is centred
        at sample t * hop (an analysis STFT at the token rate: sampling keeps attacks sharper than averaging the
        `subframes` synthesis frames). Whole multiples of GRID, computed in float64 without BLAS (module docstring)."""
        y = to_mono(wav).astype(np.float64)
        n_tokens = self.num_frames(len(y))
        if n_tokens == 0:
            return np.zeros((0, self.cfg.n_mels), np.float32)
        spec = self._stft(y, self.hop_length)[:, :n_tokens]  # (F, T) complex128; 1 + N // hop >= T
        power = spec.real**2 + spec.imag**2  # not np.abs: its SIMD and libm paths differ in the last bit
        mel = np.maximum(np.asarray(self.mel_sparse @ power) / self.ref_power, 10 ** (self.cfg.floor_db / 10))
        return to_grid(mel**self.cfg.compression).T.astype(np.float32)  # (T, D)

    def synthesize(self, frames: np.ndarray) -> np.ndarray:
        """Compressed mel token frames [T, D] -> audio [T * hop] float32."""
        n_tokens, s = len(frames), self.cfg.subframes
        length = n_tokens * self.hop_length
        if n_tokens == 0:
            return np.zeros(0, np.float32)
        comp = np.asarray(frames, np.float64).T  # (D, T); float64 throughout, so the audio is the same on any CPU
        # The gate acts on token frames, before the interpolation: gating interpolated frames would switch bands on
        # and off between tokens, which the onset detector reads as onsets.
        gate = self.gate
        comp = np.where(comp <= (gate[:, None] if gate is not None else self.floor), self.floor, comp)
        # Synthesis STFT frames j = 0 .. T*s, centred at j * stft_hop; token t sits at frame t*s, linear in between.
        pos = np.minimum(np.arange(n_tokens * s + 1) / s, n_tokens - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_tokens - 1)
        frac = pos - lo
        comp = comp[:, lo] * (1 - frac) + comp[:, hi] * frac  # (D, T*s + 1)
        mel = np.where(comp <= self.floor, 0.0, np.maximum(comp, 0) ** (1 / self.cfg.compression)) * self.ref_power
        magnitude = np.sqrt(nnls_mel_to_linear(self.mel_basis, mel, self.cfg.nnls_iters))
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
        return rvq_encode(self.features(wav), self.codebooks, self.band_weights)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self._require_fit()
        codes = self.check_codes(codes)
        return self.synthesize(rvq_decode(codes, self.codebooks, self.band_weights))

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
        residual = data.astype(np.float64) / GRID * self.band_weights  # whole numbers: every step below is exact
        books, distortion = [], []
        for _ in range(cfg.num_codebooks):
            book = kmeans(residual, cfg.codebook_size, cfg.kmeans_iters, rng)
            residual -= book[nearest(residual, book)]
            books.append(book * GRID)
            distortion.append(float(np.mean((residual * GRID) ** 2)))
        self.codebooks = np.stack(books).astype(np.float32)  # whole multiples of GRID below 2^24 GRID: exact
        self.residual_std = (residual / self.band_weights * GRID).std(axis=0).astype(np.float32)
        self.fit_info = {"items": n_items, "frames": int(len(data)), "seed": self.seed,
                         "mse_per_stage": [round(d, 8) for d in distortion]}
        return dict(self.fit_info)

    # ------------------------------------------------------------------------------------------------------- state
    def fit_settings(self) -> dict:
        """The settings a fit depends on (all but the decode-only ones; without the band keys when band_weight is 1,
        so a state saved before they existed keeps its hash)."""
        out = {k: v for k, v in asdict(self.cfg).items() if k not in DECODE_ONLY}
        if self.cfg.band_weight == 1:
            for key in BAND_KEYS:
                out.pop(key)
        return out

    def state_hash(self) -> str:
        """Hash of what determines the tokens: the analysis settings and the codebooks (not the decode-only ones)."""
        self._require_fit()
        digest = hashlib.sha256(json.dumps(self.fit_settings(), sort_keys=True).encode())
        digest.update(self.codebooks.tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """{directory}/codebooks.npy (K, size, D), residual_std.npy (D,), then melvq.json (settings, fit info)."""
        self._require_fit()
        directory = Path(directory)
        for name, array in (("codebooks.npy", self.codebooks), ("residual_std.npy", self.residual_std)):
            with atomic_path(directory / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
        atomic_write_json(directory / "melvq.json", {"codec": self.name, "config": self.fit_settings(),
                                                     "seed": self.seed, "fit": self.fit_info,
                                                     "state_hash": self.state_hash(), **(extra or {})})

    def load(self, directory: str | Path) -> dict:
        """Restore a saved state from `directory`: its fitted settings, this codec's decode-only ones. Returns
        melvq.json."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "melvq.json").read_text())
            codebooks, std = np.load(directory / "codebooks.npy"), np.load(directory / "residual_std.npy")
        except FileNotFoundError as exc:
            raise CodecError(f"{directory}: no saved melvq state ({Path(exc.filename).name} is missing); "
                             "run `v2m tokenize` to fit it") from None
        decode = {k: getattr(self.cfg, k) for k in DECODE_ONLY}
        fitted = {"band_weight": 1, **meta["config"]}  # a state saved before the band weights: the plain distance
        self.__init__(MelVQConfig(**{**fitted, **decode}), seed=meta.get("seed", 0))
        if codebooks.shape != (self.num_codebooks, self.codebook_size, self.cfg.n_mels):
            raise CodecError(f"{directory}/codebooks.npy: shape {codebooks.shape} does not match melvq.json")
        self.codebooks, self.residual_std, self.fit_info = codebooks, std, meta.get("fit", {})
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
    if not 1 <= cfg.band_weight <= 8 or int(cfg.band_weight) != cfg.band_weight \
            or not 0 <= cfg.band_low_hz < cfg.band_high_hz:
        problems.append(f"{key}.band_weight / band_low_hz / band_high_hz: need a whole band_weight in 1..8 (it "
                        f"keeps the VQ exact) and 0 <= band_low_hz < band_high_hz, got {cfg.band_weight}, "
                        f"{cfg.band_low_hz}, {cfg.band_high_hz}")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------- vector quantiser
def to_grid(x: np.ndarray) -> np.ndarray:
    """Round float64 values to the nearest whole multiple of GRID in [0, MAX_FEATURE] (float64)."""
    return np.rint(np.clip(x, 0.0, MAX_FEATURE) / GRID) * GRID


def nearest(x: np.ndarray, book: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest codebook entry (squared Euclidean; the first on a tie) for each row of x [N, D] -> [N].

    x and book hold whole numbers (float64): ||c||^2 - 2 x.c is then an exact integer, so the choice is the same on
    any machine whatever BLAS does; values too large for that raise rather than give machine-dependent codes.
    """
    x, book = np.asarray(x, np.float64), np.asarray(book, np.float64)
    bound = x.shape[1] * (np.abs(x).max(initial=0) + np.abs(book).max(initial=0)) ** 2
    if bound >= EXACT or not (np.array_equal(x, np.rint(x)) and np.array_equal(book, np.rint(book))):
        raise ValueError("melvq.nearest needs whole-number frames and entries whose squared distances stay < 2^53")
    out = np.empty(len(x), np.int64)
    norms = np.einsum("kd,kd->k", book, book)  # exact: whole numbers below 2^53
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmin(norms[None, :] - 2.0 * (x[start : start + chunk] @ book.T), axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on whole-number frames x [N, D] (float64) -> whole-number centroids [k, D] (float64); a
    centroid is its cluster's mean rounded to a whole number, so sums, distances and choices are exact; an emptied
    cluster takes the worst-fitted point."""
    from scipy import sparse

    n = len(x)
    centroids = x[rng.choice(n, size=k, replace=n < k)].copy()
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = np.bincount(assign, minlength=k)
        onehot = sparse.csr_matrix((np.ones(n), (assign, np.arange(n))), shape=(k, n))
        sums = np.asarray(onehot @ x)  # exact: whole numbers below 2^53
        filled = counts > 0
        centroids[filled] = np.rint(sums[filled] / counts[filled, None])
        if not filled.all():
            error = np.einsum("nd,nd->n", x - centroids[assign], x - centroids[assign])
            worst = np.argsort(-error, kind="stable")
            centroids[~filled] = x[np.resize(worst, int((~filled).sum()))]  # cycles when there are fewer points
    return centroids


def rvq_encode(x: np.ndarray, codebooks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Residual VQ: frames [T, D] -> codes [K, T] int64 (frames and entries on the GRID; exact, see nearest). The
    frames are multiplied by the whole-number band `weights` [D] (the codebooks hold weighted entries)."""
    residual = to_grid(np.asarray(x, np.float64)) / GRID
    if weights is not None:
        residual = residual * np.asarray(weights, np.float64)
    books = np.rint(np.asarray(codebooks, np.float64) / GRID)
    codes = np.empty((len(books), len(x)), np.int64)
    for k, book in enumerate(books):
        codes[k] = nearest(residual, book)
        residual -= book[codes[k]]
    return codes


def rvq_decode(codes: np.ndarray, codebooks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Codes [K, T] -> frames [T, D]: the sum of the chosen entries, divided by the band `weights` [D]."""
    frames = np.zeros((codes.shape[1], codebooks.shape[2]), np.float32)
    for k in range(codes.shape[0]):
        frames += codebooks[k][codes[k]]
    return frames if weights is None else (frames / np.asarray(weights, np.float32)).astype(np.float32)


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
    phase = np.zeros((n_bins, n_frames))
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

