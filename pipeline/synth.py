"""synth: params -> data/raw/synth/{id}.mp4 (+ {id}.json) and data/manifests/synth.csv. Params: base, synth.

SynthV2M, the embedded dataset: procedural clips whose music follows from what is seen. Every clip is drawn from
one score, so the labels are exact:

- beats: on every beat the objects hop (fastest at the beat), pulse and the frame flashes; they rest in between.
  The music has a kick on every beat, a snare on 2 and 4 and the bass on the chord root of each bar.
- key: background hue = tonic pitch class around the colour wheel (C red, C# orange, ... B pink).
- mode: major = bright pastel background with dark objects; minor = dark background with light objects.
- chords: object hue = root pitch class of the bar's chord, on the same colour wheel (the objects change colour on
  each downbeat; on a tonic bar they take the background's hue).
- instrument: object shape (star piano, square organ, triangle pluck, circle bell) = timbre of chords and melody.
- note density: hop distance (visible speed) = melody notes per beat (1, 2 or 4).

Made to be learnable from optical flow at a few fps: large objects, a static textured background (flow estimators
see that it stays put), motion concentrated within +-50 ms of each beat. Made so that a chroma key estimate finds the
key: the drums are tuned to the tonic and the progressions use only the primary chords, tonic every other bar.

Clip i depends only on (seed, i), never on how many clips are made. A clip whose mp4 exists and whose sidecar
`{id}.json` (written after the mp4) carries the same spec hash is not rendered again, so a killed run resumes. The
manifest and `reports/synth_preview.png` are rewritten on every run. Params that cannot be rendered (odd frame size,
an empty tempo range) fail at the start with a ConfigError naming the key.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.signal import lfilter
from tqdm import tqdm

from pipeline.config import BaseConfig, ConfigError, SynthConfig, load_params
from pipeline.media import encode_video
from pipeline.shards import atomic_write_json, clean_stale_temps, params_hash, write_manifest

log = logging.getLogger(__name__)

RENDER_VERSION = 2  # bump when the drawing or synthesis changes, so existing clips are rendered again
PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "mint", "cyan", "azure", "blue", "violet", "magenta", "pink")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Chord roots as scale degrees, one chord per bar. Only the primary chords (I IV V, i iv v), with the tonic on every
# other bar: a clip has 2-5 bars, and a vi or VII in one of them is enough to tip a chroma key estimate to the
# relative key.
PROGRESSIONS = {mode: ((0, 3, 0, 4), (0, 4, 0, 3), (0, 3, 4, 0)) for mode in ("major", "minor")}
INSTRUMENT_SHAPES = {"piano": "star", "organ": "square", "pluck": "triangle", "bell": "circle"}
DENSITY_HOP = {1: 0.06, 2: 0.12, 4: 0.20}  # notes per beat -> hop distance / short side; DIS flow tracks them
DENSITY_SPIN = {1: 0.15, 2: 0.3, 4: 0.5}  # and the turn of each hop, in radians
DENSITY_WORDS = {1: "slow", 2: "lively", 4: "fast"}
HOP_WIDTH_S = 0.025  # logistic time constant of a hop: 80 % of it happens within +-55 ms of the beat
FLASH, FLASH_TAU_S = 0.3, 0.045  # brightening towards white on the beat, and its decay
TEXTURE = 0.08  # amplitude of the static background mottle
LICENSE = "CC0-1.0 (procedurally generated)"
COLUMNS = ["id", "source", "start_s", "split", "caption", "license", "tempo_bpm", "beat_times", "key", "mode",
           "instrument", "note_density", "shape", "colour", "chords", "spec_hash"]


@dataclass(frozen=True)
class ClipSpec:
    """Everything one clip is rendered from; geometry in fractions of the frame so it is resolution-free."""

    id: str
    seed: int
    index: int
    duration_s: float
    tempo_bpm: float
    beat_times: tuple[float, ...]  # seconds, rounded to 1e-4; the renderers use exactly these
    key: str  # tonic pitch class name
    mode: str  # major | minor
    instrument: str
    shape: str
    note_density: int  # melody notes per beat
    progression: tuple[int, ...]  # chord root scale degree of each bar, cycled
    melody: tuple[tuple[float, float, int], ...]  # (onset_s, duration_s, midi)
    centres: tuple[tuple[float, float], ...]  # object rest positions (x, y) in [0, 1]
    radius: float  # object radius / short side
    hop_angle: float  # radians; hops go back and forth along this direction
    spin: float  # radians of rotation per hop
    tilt: float  # initial rotation

    @property
    def key_pc(self) -> int:
        return PITCH_NAMES.index(self.key)

    @property
    def period_s(self) -> float:
        return 60.0 / self.tempo_bpm

    @property
    def colour(self) -> str:
        return HUE_NAMES[self.key_pc]

    def caption(self) -> str:
        mood = "upbeat" if self.mode == "major" else "moody"
        bg = ("light " if self.mode == "major" else "dark ") + self.colour
        notes = f"{self.note_density} note{'s' if self.note_density > 1 else ''} per beat"
        return (f"{mood} {self.key} {self.mode} {self.instrument} at {round(self.tempo_bpm)} BPM, {notes}; "
                f"{self.shape}s hopping {DENSITY_WORDS[self.note_density]} on a {bg} background")


def make_spec(seed: int, index: int, cfg: SynthConfig, base: BaseConfig) -> ClipSpec:
    """The labels and score of clip `index`: a pure function of (seed, index) and the params."""
    rng = np.random.default_rng([seed, index])
    tempo = round(float(rng.uniform(cfg.tempo_min_bpm, cfg.tempo_max_bpm)), 1)
    period = 60.0 / tempo
    first = float(rng.uniform(0.05, 0.05 + cfg.max_first_beat_frac * period))
    n_beats = int(math.floor((base.clip_seconds - 1e-3 - first) / period)) + 1
    beats = tuple(round(first + n * period, 4) for n in range(n_beats))
    key_pc, mode = int(rng.integers(12)), ("major", "minor")[int(rng.integers(2))]
    instrument = tuple(INSTRUMENT_SHAPES)[int(rng.integers(len(INSTRUMENT_SHAPES)))]
    density = (1, 2, 4)[int(rng.integers(3))]
    progression = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
    melody = _compose_melody(rng, beats, period, base.clip_seconds, key_pc, mode, progression, density)
    # Objects in a row across the hop direction, so they never collide.
    n_objects, radius = int(rng.integers(2, 4)), float(rng.uniform(0.10, 0.13))
    angle = float(rng.uniform(0, 2 * np.pi))
    across = np.array([-np.sin(angle), np.cos(angle)])
    spacing = 2.6 * radius
    centres = tuple(
        tuple(round(float(c), 4) for c in np.clip(0.5 + (i - (n_objects - 1) / 2) * spacing * across
                                                   + rng.normal(0, 0.015, 2), 0.15, 0.85))
        for i in range(n_objects)
    )
    return ClipSpec(
        id=f"synth_{index:05d}", seed=seed, index=index, duration_s=float(base.clip_seconds), tempo_bpm=tempo,
        beat_times=beats, key=PITCH_NAMES[key_pc], mode=mode, instrument=instrument,
        shape=INSTRUMENT_SHAPES[instrument], note_density=density, progression=progression, melody=melody,
        centres=centres, radius=round(radius, 4), hop_angle=round(angle, 4),
        spin=round(float(rng.choice([-1, 1])) * DENSITY_SPIN[density], 4), tilt=round(float(rng.uniform(0, 6.3)), 4),
    )


def _chord_pcs(key_pc: int, mode: str, degree: int) -> list[int]:
    scale = SCALES[mode]
    return [(key_pc + scale[(degree + k) % 7]) % 12 for k in (0, 2, 4)]


def _beat_chord(key_pc: int, mode: str, progression: tuple[int, ...], n: int) -> list[int]:
    """Pitch classes (root, third, fifth) of the chord at beat n: one chord per bar of 4 beats, the progression
    cycled."""
    return _chord_pcs(key_pc, mode, progression[(n // 4) % len(progression)])


def _compose_melody(rng, beats, period, duration, key_pc, mode, progression, density) -> tuple:
    """A random walk in the scale: a chord tone on each beat, scale steps on the subdivisions."""
    pitches = [m for m in range(64, 82) if (m - key_pc) % 12 in set(SCALES[mode])]  # E4 .. A5
    notes, index = [], len(pitches) // 2
    step = period / density
    for n, beat in enumerate(beats):
        chord = _beat_chord(key_pc, mode, progression, n)
        for j in range(density):
            onset = beat + j * step
            if onset >= duration - 0.05:
                break
            if j == 0:  # a chord tone near where the melody is, seldom the same note again
                options = np.array([i for i, m in enumerate(pitches) if m % 12 in chord])
                weights = np.exp(-np.abs(options - index) / 3.0) * np.where(options == index, 0.3, 1.0)
                index = int(rng.choice(options, p=weights / weights.sum()))
            else:
                index = int(np.clip(index + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(pitches) - 1))
            notes.append((round(onset, 4), round(step * 0.9, 4), pitches[index]))
    return tuple(notes)


# ---------------------------------------------------------------------------------------------------------- video
def _motion(spec: ClipSpec, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hop progress k(t) (one smooth step per beat, fastest at the beat) and the flash/pulse envelope. [T] each."""
    beats = np.asarray(spec.beat_times)[None, :]  # (1, B)
    dt = times[:, None] - beats  # (T, B)
    width = min(HOP_WIDTH_S, spec.period_s / 12)
    progress = (1.0 / (1.0 + np.exp(-np.clip(dt / width, -50, 50)))).sum(axis=1)
    envelope = np.where(dt >= 0, np.exp(-np.clip(dt, 0, None) / FLASH_TAU_S), 0.0).max(axis=1)
    return progress, envelope


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of radius r centred at 0 in rotated coordinates."""
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        a, rounding = 0.8 * r, 0.12 * r
        qx, qy = np.abs(u) - (a - rounding), np.abs(v) - (a - rounding)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - rounding
    if shape == "triangle":
        normals = [(math.cos(a), math.sin(a)) for a in np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3]
        return np.max([u * c + v * s for c, s in normals], axis=0) - 0.55 * r
    if shape == "star":  # five points: fold the angle into one half-wedge, then distance to its straight edge
        wedge = np.pi / 5
        phi = np.abs(np.mod(np.arctan2(u, v), 2 * wedge) - wedge)  # 0 at a tip (pointing up), wedge at a notch
        rho = np.hypot(u, v)
        tip, notch = np.array([1.1 * r, 0.0]), 0.5 * r * np.array([np.cos(wedge), np.sin(wedge)])
        edge = notch - tip
        normal = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
        nx, ny = (float(c) for c in (normal if np.dot(-tip, normal) < 0 else -normal))
        return (rho * np.cos(phi) - float(tip[0])) * nx + (rho * np.sin(phi)) * ny
    raise ValueError(f"unknown shape {shape!r}")


def beat_chords(spec: ClipSpec, progression: tuple[int, ...] | None = None) -> list[list[int]]:
    """Pitch classes (root, third, fifth) of the chord sounding at each beat (one chord per bar of 4 beats, the
    progression cycled): of the clip's progression, or of `progression` (scale degrees) in the clip's key."""
    degrees = spec.progression if progression is None else progression
    return [_beat_chord(spec.key_pc, spec.mode, degrees, n) for n in range(len(spec.beat_times))]


def chord_roots(spec: ClipSpec, progression: tuple[int, ...] | None = None) -> list[int]:
    """Root pitch class of the chord sounding at each beat (`beat_chords`' first pitch class)."""
    return [chord[0] for chord in beat_chords(spec, progression)]


def beat_at(spec: ClipSpec, times: np.ndarray) -> np.ndarray:
    """Index of the last beat at or before each of `times` (s); 0 before the first beat (it belongs to bar 1)."""
    return np.maximum(np.searchsorted(np.asarray(spec.beat_times), np.asarray(times), side="right") - 1, 0)


def palette(spec: ClipSpec, root_pc: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(background, object) RGB in [0, 1]: background hue = key, object hue = chord root (default: the tonic's),
    brightness = mode."""
    hue = spec.key_pc / 12
    obj_hue = (spec.key_pc if root_pc is None else root_pc) / 12
    if spec.mode == "major":
        bg, obj = colorsys.hsv_to_rgb(hue, 0.55, 0.95), colorsys.hsv_to_rgb(obj_hue, 0.9, 0.42)
    else:
        bg, obj = colorsys.hsv_to_rgb(hue, 0.85, 0.40), colorsys.hsv_to_rgb(obj_hue, 0.45, 1.0)
    return np.array(bg, np.float32), np.array(obj, np.float32)


def render_frames(spec: ClipSpec, fps: float, width: int, height: int) -> Iterator[np.ndarray]:
    """Yield round(duration * fps) RGB frames [H, W, 3] uint8 (frame k shows time k / fps)."""
    times = np.arange(int(round(spec.duration_s * fps))) / fps
    progress, envelope = _motion(spec, times)
    short = min(width, height)
    hop_px = DENSITY_HOP[spec.note_density] * short
    along = np.array([np.cos(spec.hop_angle), np.sin(spec.hop_angle)])
    across = np.array([-along[1], along[0]])
    bg_rgb = palette(spec)[0]
    # the chord of frame k: that of the last beat at or before it (the first bar's before the first beat)
    roots, beat_of = chord_roots(spec), beat_at(spec, times)
    obj_colours = {pc: palette(spec, pc)[1] for pc in set(roots)}
    # A gentle vertical gradient and a static mottle: texture lets flow estimators see that the background stays put.
    coarse = np.random.default_rng([spec.seed, spec.index, 2]).uniform(-1, 1, (12, 12)).astype(np.float32)
    mottle = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    shade = (1.06 - 0.12 * np.linspace(0, 1, height, dtype=np.float32))[:, None] + TEXTURE * mottle
    shade = shade[..., None]
    background = np.clip(np.broadcast_to(bg_rgb, (height, width, 3)) * shade, 0, 1).astype(np.float32)
    for k in range(len(times)):
        frame = background.copy()  # float32 throughout: Python floats below keep it from promoting to float64
        step = float(progress[k])
        offset = (abs(step % 2.0 - 1.0) - 0.5) * hop_px  # back and forth: +hop/2, -hop/2, +hop/2, ...
        arc = -0.35 * hop_px * math.sin(math.pi * (step % 1.0))  # the hop leaves the ground mid-way
        angle = spec.tilt + spec.spin * step
        cos, sin = math.cos(angle), math.sin(angle)
        r = spec.radius * short * (1.0 + 0.18 * float(envelope[k]))
        obj_rgb = obj_colours[roots[int(beat_of[k])]]
        for cx, cy in spec.centres:
            x, y = (float(c) for c in np.array([cx * width, cy * height]) + offset * along + arc * across)
            x0, x1 = max(int(x - 1.3 * r), 0), min(int(x + 1.3 * r) + 2, width)
            y0, y1 = max(int(y - 1.3 * r), 0), min(int(y + 1.3 * r) + 2, height)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] + (0.5 - x)  # (1, w)
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] + (0.5 - y)  # (h, 1)
            u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # (h, w) each
            alpha = np.clip(0.5 - _sdf(spec.shape, u, -v, r), 0.0, 1.0)[..., None]
            patch = frame[y0:y1, x0:x1]
            patch += alpha * (obj_rgb - patch)
        flash = FLASH * float(envelope[k])
        if flash > 1e-3:
            frame += flash * (1.0 - frame)
        frame *= 255.0
        frame += 0.5
        yield frame.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------- audio
def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _tone(instrument: str, midi: int, dur: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One note of `instrument`, peak 1, [N]; it rings a little past `dur` except for the organ."""
    f = _hz(midi)
    n = int((dur + (0.04 if instrument == "organ" else 0.25)) * sr)
    t = np.arange(n) / sr
    if instrument == "piano":  # slightly stretched harmonics, the higher ones dying faster
        h = np.arange(1, 9)[:, None]
        fh = f * h * np.sqrt(1 + 4e-4 * h**2)
        y = (np.sin(2 * np.pi * fh * t) * h**-1.3 * np.exp(-t * (2.0 + 1.5 * h) / 1.5)).sum(0)
        y *= np.minimum(t / 0.003, 1)
    elif instrument == "organ":  # drawbars, flat sustain, a slow tremolo
        h = np.array([1, 2, 3, 4, 6, 8])[:, None]
        amp = np.array([1.0, 0.7, 0.5, 0.35, 0.2, 0.15])[:, None]
        y = (amp * np.sin(2 * np.pi * f * h * t)).sum(0) * (1 + 0.12 * np.sin(2 * np.pi * 5.5 * t))
        y *= np.minimum(t / 0.015, 1) * np.clip((n / sr - t) / 0.04, 0, 1)
    elif instrument == "pluck":  # Karplus-Strong: a noise burst through a damped delay loop
        # Loop = z^-N, the two-point average (half a sample) and an all-pass for the fractional rest, so the pitch is
        # exact: 1 / (1 - g/2 (1 + z^-1) z^-N (c + z^-1) / (1 + c z^-1)), written out as one IIR filter.
        period = sr / f - 0.5
        delay = max(int(period - 0.1), 2)
        frac = period - delay
        c, g = (1 - frac) / (1 + frac), 0.996
        burst = np.zeros(n)
        burst[:delay] = lfilter([0.25, 0.5, 0.25], [1.0], rng.uniform(-1, 1, delay))  # a soft, round pluck
        notch = int(round((period + 0.5) / 5))  # plucked a fifth of the way along: no 5th harmonic (a major third)
        burst[notch:delay + notch] -= burst[:delay].copy()
        a = np.zeros(delay + 3)
        a[0], a[1] = 1.0, c
        a[delay] -= g / 2 * c
        a[delay + 1] -= g / 2 * (1 + c)
        a[delay + 2] -= g / 2
        y = lfilter([1.0, c], a, burst)
    elif instrument == "bell":  # FM with an inharmonic modulator whose index decays
        index = 1.5 * np.exp(-t / 0.12)
        y = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * 3.5 * f * t)) * np.exp(-t / 0.6)
        y *= np.minimum(t / 0.002, 1)
    else:
        raise ValueError(f"unknown instrument {instrument!r}")
    y *= np.clip((n / sr - t) / 0.02, 0, 1)  # no click at the end
    return y / (np.abs(y).max() + 1e-9)


def _kick(sr: int, rng: np.random.Generator, tonic_hz: float) -> np.ndarray:
    """A pitch-swept sine tuned to the tonic (like a tuned 808), plus a click for a sharp onset."""
    t = np.arange(int(0.35 * sr)) / sr
    freq = tonic_hz * (1 + 1.5 * np.exp(-t / 0.03))  # a short sweep: little energy away from the tonic
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.12)
    return body + 0.3 * rng.uniform(-1, 1, t.size) * np.exp(-t / 0.004)


def _snare(sr: int, rng: np.random.Generator, tonic_hz: float) -> np.ndarray:
    t = np.arange(int(0.22 * sr)) / sr
    noise = np.diff(rng.uniform(-1, 1, t.size + 1)) * np.exp(-t / 0.06)
    return 0.6 * noise + 0.4 * np.sin(2 * np.pi * tonic_hz * t) * np.exp(-t / 0.05)


def render_audio(spec: ClipSpec, sample_rate: int) -> np.ndarray:
    """Render the score to mono float32 [round(duration * sample_rate)], peak 0.9."""
    sr = sample_rate
    rng = np.random.default_rng([spec.seed, spec.index, 1])
    total = int(round(spec.duration_s * sr))
    out = np.zeros(total + 2 * sr)

    def add(start_s: float, y: np.ndarray, gain: float) -> None:
        i = int(round(start_s * sr))
        out[i:i + y.size] += gain * y[: out.size - i]

    low_tonic = 28 + (spec.key_pc - 4) % 12  # E1 .. D#2, 41-78 Hz
    kick, period = _kick(sr, rng, _hz(low_tonic)), spec.period_s
    chords = beat_chords(spec)
    for n, beat in enumerate(spec.beat_times):
        add(beat, kick, 0.9)
        if n % 4 in (1, 3):
            add(beat, _snare(sr, rng, _hz(low_tonic + 24)), 0.45)
        root = 36 + chords[n][0]
        bass_t = np.arange(int(0.9 * period * sr)) / sr
        f = _hz(root)
        bass = (np.sin(2 * np.pi * f * bass_t) + 0.4 * np.sin(4 * np.pi * f * bass_t)) * np.exp(-bass_t / 0.5)
        add(beat, bass * np.minimum(bass_t / 0.005, 1) * np.clip((bass_t[-1] - bass_t) / 0.02, 0, 1), 0.4)
        if n % 4 == 0:  # a chord on each bar, in the clip's instrument
            bar = 4 * period * 0.95
            for pc in chords[n]:
                add(beat, _tone(spec.instrument, 60 + pc, bar, sr, rng), 0.16)
    for onset, dur, midi in spec.melody:
        accent = 1.0 if any(abs(onset - b) < 1e-3 for b in spec.beat_times) else 0.75
        add(onset, _tone(spec.instrument, midi, dur, sr, rng), 0.28 * accent)
    audio = out[:total]
    audio *= np.clip((total - np.arange(total)) / (0.02 * sr), 0, 1)  # fade the last 20 ms
    return (0.9 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- files
def split_sizes(cfg: SynthConfig, n: int | None = None) -> dict[str, int]:
    """Clips per split: the params' sizes, or `n` in their proportions (at least one val and test clip when n >= 3)."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    if n is None:
        return sizes
    total = max(sum(sizes.values()), 1)
    test = round(n * sizes["test"] / total)
    val = round(n * sizes["val"] / total)
    if n >= 3:
        test, val = max(test, 1), max(val, 1)
    test = min(test, n)
    val = min(val, n - test)
    return {"train": n - val - test, "val": val, "test": test}


def spec_hash(spec: ClipSpec, fps: float, width: int, height: int, sample_rate: int, cfg: SynthConfig) -> str:
    """Hash of everything that determines a clip's bytes."""
    return params_hash({"spec": asdict(spec), "fps": fps, "size": [width, height], "sample_rate": sample_rate,
                        "crf": cfg.video_crf, "preset": cfg.video_preset, "version": RENDER_VERSION})


def labels(spec: ClipSpec) -> dict:
    """The manifest's label columns of a clip."""
    return {"caption": spec.caption(), "license": LICENSE, "tempo_bpm": spec.tempo_bpm,
            "beat_times": json.dumps(list(spec.beat_times)), "key": spec.key, "mode": spec.mode,
            "instrument": spec.instrument, "note_density": spec.note_density, "shape": spec.shape,
            "colour": spec.colour, "chords": " ".join(PITCH_NAMES[pc] for pc in chord_roots(spec)[::4])}


def _is_done(out_dir: Path, spec_id: str, digest: str) -> bool:
    sidecar, video = out_dir / f"{spec_id}.json", out_dir / f"{spec_id}.mp4"
    if not (video.exists() and sidecar.exists()):
        return False
    try:
        return json.loads(sidecar.read_text()).get("spec_hash") == digest
    except (OSError, ValueError):
        return False


def render_clip(job: tuple) -> str:
    """Render one clip to {out}/{id}.mp4, then its sidecar {id}.json. Runs in a worker process."""
    spec, out_dir, digest, fps, width, height, sample_rate, crf, preset = job
    video = Path(out_dir) / f"{spec.id}.mp4"
    encode_video(video, render_frames(spec, fps, width, height), fps, render_audio(spec, sample_rate), sample_rate,
                 crf=crf, preset=preset)
    atomic_write_json(Path(out_dir) / f"{spec.id}.json", {"spec_hash": digest, **labels(spec), "spec": asdict(spec)})
    return spec.id


# ---------------------------------------------------------------------------------------------------------- preview
def motion_energy(frames: np.ndarray) -> np.ndarray:
    """Mean absolute grey-level change from frame k-1 to frame k, [T] (0 for k = 0); frames [T, H, W(, 3)]."""
    grey = frames.mean(axis=-1) if frames.ndim == 4 else frames.astype(np.float32)
    energy = np.zeros(len(grey), np.float32)
    energy[1:] = np.abs(np.diff(grey.astype(np.float32), axis=0)).mean(axis=(1, 2))
    return energy


def write_preview(path: str | Path, specs: list[ClipSpec], out_dir: Path, fps: float, sample_rate: int) -> None:
    """Per clip: its caption, 8 frames around two beats, then waveform + motion energy with the beats; atomic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from pipeline.media import iter_frames, load_audio
    from pipeline.shards import atomic_path

    n_strip, beat_colour, flow_colour = 8, "#d62728", "#1f77b4"
    fig = plt.figure(figsize=(13, 3.5 * len(specs) + 0.5), dpi=110)
    grid = fig.add_gridspec(3 * len(specs), n_strip, height_ratios=[0.22, 1.45, 0.95] * len(specs), hspace=0.3,
                            wspace=0.04, left=0.03, right=0.97, top=1 - 0.45 / fig.get_figheight(), bottom=0.03)
    fig.legend(handles=[Line2D([], [], color="0.4", lw=1, label="audio waveform"),
                        Line2D([], [], color=flow_colour, lw=2, label="motion energy (mean |frame difference|)"),
                        Line2D([], [], color=beat_colour, lw=1.5, label="labelled beat times"),
                        Line2D([], [], color="0.2", marker="^", lw=0, label="frames shown above")],
               loc="upper center", ncol=4, frameon=False, fontsize=9)
    for row, spec in enumerate(specs):
        video = out_dir / f"{spec.id}.mp4"
        frames = np.stack(list(iter_frames(video)))  # (T, H, W, 3)
        audio, _ = load_audio(video, sample_rate)  # (1, N)
        energy = motion_energy(frames)
        title = fig.add_subplot(grid[3 * row, :])
        title.axis("off")
        title.text(0, 0, f"{spec.id}", fontsize=10, fontweight="bold", va="bottom")
        title.text(0.085, 0, spec.caption(), fontsize=10, va="bottom")
        # Two beats, four frames each: half a beat before, one frame before, the first frame at the beat, one after.
        beat_ix = min(2, len(spec.beat_times) - 2)
        picks = []
        for b in spec.beat_times[beat_ix:beat_ix + 2]:
            at = int(math.ceil(b * fps - 1e-6))
            picks += [at - round(spec.period_s * fps / 2), at - 1, at, at + 1]
        picks = [int(np.clip(p, 0, len(frames) - 1)) for p in picks]
        for j, k in enumerate(picks):
            ax = fig.add_subplot(grid[3 * row + 1, j])
            ax.imshow(frames[k])
            ax.set_xticks([]), ax.set_yticks([])
            on_beat = j % 4 == 2
            ax.set_title(f"{k / fps:.2f} s  {('-1/2 beat', '-1 frame', 'BEAT', '+1 frame')[j % 4]}", fontsize=8,
                         color=beat_colour if on_beat else "0.35", fontweight="bold" if on_beat else "normal", pad=3)
            for side in ax.spines.values():
                side.set_color(beat_colour if on_beat else "0.8")
                side.set_linewidth(2.5 if on_beat else 0.8)
        ax = fig.add_subplot(grid[3 * row + 2, :])
        ax.plot(np.arange(audio.shape[1]) / sample_rate, audio[0], color="0.4", linewidth=0.35)
        for b in spec.beat_times:
            ax.axvline(b, color=beat_colour, linewidth=1.0, alpha=0.8)
        ax.plot(np.array(picks) / fps, np.full(len(picks), -0.93), "^", color="0.2", markersize=4)
        ax.set_xlim(0, spec.duration_s), ax.set_ylim(-1, 1), ax.set_yticks([])
        ax.tick_params(labelsize=7, pad=1)
        ax.text(1.002, 0.0, "s", fontsize=7, transform=ax.transAxes, va="top")
        twin = ax.twinx()
        times, level = np.arange(len(energy)) / fps, energy / (energy.max() + 1e-9)
        twin.fill_between(times, 0, level, color=flow_colour, alpha=0.15, linewidth=0)
        twin.plot(times, level, color=flow_colour, linewidth=1.3)
        twin.set_ylim(0, 1.25), twin.set_yticks([])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _preview_specs(specs: list[ClipSpec], count: int) -> list[ClipSpec]:
    """Up to `count` clips with different instruments, alternating mode and varying density where the clips allow."""
    chosen: list[ClipSpec] = []
    for slot in range(min(count, len(specs))):
        used = {s.instrument for s in chosen}
        mode, density = ("major", "minor")[slot % 2], (1, 4, 2)[slot % 3]
        rest = [s for s in specs if s not in chosen]
        chosen.append(max(rest, key=lambda s: (s.instrument not in used, s.mode == mode, s.note_density == density)))
    return chosen


# ---------------------------------------------------------------------------------------------------------- main
def check(cfg: SynthConfig, base: BaseConfig, source: str = "params") -> None:
    """Reject params the renderer cannot honour, naming the key."""
    if cfg.width % 2 or cfg.height % 2 or min(cfg.width, cfg.height) < 32:
        raise ConfigError(f"{source}: synth.width/height: H.264 needs even sizes >= 32, got {cfg.width}x{cfg.height}")
    if not 0 < cfg.tempo_min_bpm <= cfg.tempo_max_bpm:
        raise ConfigError(f"{source}: synth.tempo_min_bpm: need 0 < min <= max, got {cfg.tempo_min_bpm}, "
                          f"{cfg.tempo_max_bpm}")
    if base.clip_seconds <= 0.05 + (1 + cfg.max_first_beat_frac) * 60 / cfg.tempo_min_bpm:
        raise ConfigError(f"{source}: base.clip_seconds: {base.clip_seconds} s may hold fewer than two beats")
    if min(cfg.n_train, cfg.n_val, cfg.n_test, cfg.workers) < 0 or not 0 <= cfg.max_first_beat_frac <= 1:
        raise ConfigError(f"{source}: synth: split sizes and workers must be >= 0, max_first_beat_frac in [0, 1]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="v2m synth", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (defaults when missing)")
    parser.add_argument("--out", help="folder of the mp4s (default: synth.out_dir)")
    parser.add_argument("--manifest", help="manifest CSV to write (default: synth.manifest)")
    parser.add_argument("--n", type=int, help="total clips, split in the proportions of synth.n_train/n_val/n_test")
    parser.add_argument("--seed", type=int, help="default: base.seed")
    parser.add_argument("--preview", help="preview PNG (default: synth.preview_path)")
    parser.add_argument("--no-preview", action="store_true", help="do not write the preview")
    args = parser.parse_args(argv)
    params = load_params(args.params, missing_ok=True)
    base, cfg = params.base, params.synth
    check(cfg, base, args.params)
    out_dir = Path(args.out or cfg.out_dir)
    seed = base.seed if args.seed is None else args.seed
    sizes = split_sizes(cfg, args.n)
    splits = [name for name, size in sizes.items() for _ in range(size)]
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)

    specs = [make_spec(seed, i, cfg, base) for i in range(len(splits))]
    digests = [spec_hash(s, base.fps, cfg.width, cfg.height, base.sample_rate, cfg) for s in specs]
    jobs = [(s, str(out_dir), d, base.fps, cfg.width, cfg.height, base.sample_rate, cfg.video_crf, cfg.video_preset)
            for s, d in zip(specs, digests, strict=True) if not _is_done(out_dir, s.id, d)]
    log.info("synth: %d clips (%s) in %s; %d to render, %d already done", len(specs),
             ", ".join(f"{k} {v}" for k, v in sizes.items()), out_dir, len(jobs), len(specs) - len(jobs))
    if jobs:
        bar = tqdm(total=len(jobs), desc="synth", unit="clip")
        if cfg.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs))) as pool:
                for _ in pool.map(render_clip, jobs):
                    bar.update()
        else:
            for job in jobs:
                render_clip(job)
                bar.update()
        bar.close()

    rows = [{"id": s.id, "source": str(out_dir / f"{s.id}.mp4"), "start_s": 0, "split": split, **labels(s),
             "spec_hash": d} for s, split, d in zip(specs, splits, digests, strict=True)]
    manifest = Path(args.manifest or cfg.manifest)
    write_manifest(manifest, rows, COLUMNS)
    log.info("synth: wrote %s (%d rows)", manifest, len(rows))
    if not args.no_preview and specs:
        preview = Path(args.preview or cfg.preview_path)
        write_preview(preview, _preview_specs(specs, cfg.preview_clips), out_dir, base.fps, base.sample_rate)
        log.info("synth: wrote %s", preview)
    return 0
