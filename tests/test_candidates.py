"""generate.candidates: a window's draws are sampled side by side, decoded, and the one whose music reads most surely as
the key the model retrieved from the video is kept (inference.generate_codes, inference.pick_draw,
harmony.key_agreement).

The music is real audio read by the key metric's own chroma (librosa CQT): a small codec renders each token as a
chord of sine tones, so a draw's key is known by construction. The model is the debug preset with a harmony bank
filled by hand, as in tests/test_model.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import inference
from pipeline.codecs import Codec
from pipeline.config import GenerateConfig, Params
from pipeline.inference import GenerateError, Model, generate_codes, pick_draw, window_batch
from pipeline.metrics.rhythm import KK_MAJOR, KK_MINOR
from pipeline.model import key_agreement
from tests.test_model import CARD, K, debug_model

torch.set_num_threads(1)
C_MINOR, C_MAJOR, C_AND_G, SILENT = 0, 1, 2, 3  # what the tone codec plays for a token of codebook 0
CHORDS = {C_MINOR: (60, 63, 67), C_MAJOR: (60, 64, 67), C_AND_G: (60, 67)}


class ToneCodec(Codec):
    """Codebook 0's token at each frame -> a chord of sine tones (C minor, C major, C and G; other tokens silence)."""

    name, sample_rate, frame_rate, num_codebooks, codebook_size = "tones", 32000, 6.0, K, CARD

    def encode(self, wav: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the tone codec only renders")

    decoded = 0  # how many times decode ran

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        self.decoded += 1
        t = np.arange(self.hop_length) / self.sample_rate
        frames = [sum((np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in CHORDS.get(int(c), ())),
                      np.zeros_like(t)) for c in codes[0]]
        return (0.2 * np.concatenate(frames)).astype(np.float32)

    def state_hash(self) -> str:
        return "tones"


def profile(kk) -> torch.Tensor:
    p = torch.tensor(kk, dtype=torch.float32)
    return p / p.sum()


def harmony_model(harmony: bool = True) -> Model:
    """The debug model; with `harmony`, a bank whose clip 0 is C minor and clip 1 C major (CLIP rows e0 and e2)."""
    if not harmony:
        net = debug_model()
    else:
        net = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True)
        minor, major = profile(KK_MINOR), profile(KK_MAJOR)
        net.harmony.fill(torch.eye(4, 8), torch.stack([minor, minor, major, major]), torch.tensor([0, 0, 1, 1]))
        chroma = torch.zeros(3, 12)  # what tokens 0, 1, 2 sound like: the harmony bias's table
        for token, notes in CHORDS.items():
            chroma[token, [m % 12 for m in notes]] = 1 / len(notes)
        net.harmony.fill_token_chroma([torch.tensor([0, 1, 2]).repeat(K, 1)], [chroma])
    params = dataclasses.replace(Params(), base=dataclasses.replace(Params().base, clip_seconds=2.0))
    return Model(Path("debug.pt"), net, "full", params, ToneCodec(), torch.device("cpu"))


def features(mode: str) -> dict:
    """A 2 s video's cached features whose CLIP rows retrieve the bank's C minor (`minor`) or C major clip."""
    clip = np.zeros((4, 8), np.float32)
    clip[:, 0 if mode == "minor" else 2] = 1.0
    rng = np.random.default_rng(0)
    return {"clip": clip, "clip_fps": 2.0, "flow": rng.standard_normal((16, 6)).astype(np.float32), "flow_fps": 8.0}


def draws_of(*tokens: int, n: int = 12) -> torch.Tensor:
    """(D, K, n) draws, draw d playing tokens[d] throughout."""
    return torch.stack([torch.full((K, n), t, dtype=torch.long) for t in tokens])


def config(candidates: int) -> GenerateConfig:
    return dataclasses.replace(GenerateConfig(), prompt_seconds=1.0, candidates=candidates)


def test_key_agreement_is_high_for_one_key_and_low_for_its_parallel_key():
    minor, major = profile(KK_MINOR)[None], profile(KK_MAJOR)[None]
    same, parallel = key_agreement(minor, minor), key_agreement(minor, major)
    assert same.shape == (1,) and float(same) > 0.5 and float(parallel) < 0.1
    assert torch.allclose(parallel, key_agreement(major, minor))
    g_minor = torch.roll(profile(KK_MINOR), 7)[None]  # another tonic: no agreement either
    assert float(key_agreement(minor, g_minor)) < 0.05


def test_pick_draw_keeps_the_draw_whose_music_reads_as_the_retrieved_key():
    """Among a draw of the parallel key, a silent one and one of the key itself, the key's is kept, whichever key the
    video retrieves; in minor it also beats the bare fifth (C and G, which Krumhansl-Schmuckler reads as C major
    0.78 to 0.19); of two equal draws the first; a window of silence alone keeps draw 0."""
    model = harmony_model()
    for mode, right, wrong in (("minor", C_MINOR, C_MAJOR), ("major", C_MAJOR, C_MINOR)):
        batch = window_batch(features(mode), 0.0, 2.0, None, model.device)
        batch = {k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in batch.items()}
        assert pick_draw(model, batch, draws_of(wrong, SILENT, right)) == 2
        if mode == "minor":
            assert pick_draw(model, batch, draws_of(C_AND_G, wrong, SILENT, right)) == 3
        assert pick_draw(model, batch, draws_of(SILENT, right, right, wrong)) == 1
        assert pick_draw(model, batch, draws_of(SILENT, SILENT)) == 0


def test_candidates_keep_the_picked_one_of_the_windows_draws_and_one_candidate_is_a_single_draw():
    """generate_codes with candidates D samples the window's D draws in one batch from the seeded generator and keeps
    the one pick_draw picks; with 1 it is the plain single draw of before (the same tokens)."""
    model = harmony_model()
    feats, n = features("minor"), 12
    cfg = config(1)
    s = cfg.sampling

    def sample(draws: int) -> torch.Tensor:
        batch = window_batch(feats, 0.0, n / model.frame_rate, None, model.device)
        batch = {k: v.repeat(draws, *[1] * (v.dim() - 1)) for k, v in batch.items()}
        with torch.no_grad():
            return model.net.generate(batch, n, s.guidance, s.temperature, s.top_k, torch.Generator().manual_seed(5),
                                      True, None, s.plausibility, s.harmony_bias, s.mode_guard), batch

    one = generate_codes(model, feats, n, cfg, 5, progress=False).codes
    assert np.array_equal(one, sample(1)[0][0].numpy())
    draws, batch = sample(6)
    picked = pick_draw(model, batch, draws)
    four = generate_codes(model, feats, n, dataclasses.replace(cfg, candidates=6), 5, progress=False)
    assert np.array_equal(four.codes, draws[picked].numpy()) and four.starts == [0]
    assert (four.given, four.overlap, four.tails, four.seams()) == (0, 0, (), [])  # one window: no seam
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # the draws differ: there was a choice


def test_bad_candidates_are_refused_and_a_model_without_a_bank_draws_once(caplog):
    model = harmony_model()
    with pytest.raises(GenerateError, match="generate.candidates 0 must be >= 1"):
        generate_codes(model, features("minor"), 12, config(0), 0, progress=False)
    plain = harmony_model(harmony=False)
    inference._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.inference"):
        many = generate_codes(plain, features("minor"), 12, config(4), 3, progress=False).codes
        generate_codes(plain, features("minor"), 12, config(4), 3, progress=False)
    once = generate_codes(plain, features("minor"), 12, config(1), 3, progress=False).codes
    assert np.array_equal(many, once)
    said = [r.getMessage() for r in caplog.records if "generate.candidates" in r.getMessage()]
    assert len(said) == 1 and "no harmony bank" in said[0]


def test_a_long_videos_windows_each_keep_a_draw_and_continue_the_music_before_them():
    """Past one window (2 s here) each window's candidates are drawn after the same prompt (the previous window's
    second to last half second: of the 1 s overlap, the last 0.5 s is written again, the crossfade) and one is kept:
    the tokens cover the video in the planned windows, the result is the same twice (the seed fixes every draw and
    every pick), and it is not the single draw's."""
    model = harmony_model()
    feats = features("minor")
    feats["clip"] = np.repeat(feats["clip"], 3, axis=0)  # 6 s
    feats["flow"] = np.repeat(feats["flow"], 3, axis=0)
    windows = generate_codes(model, feats, 36, config(3), 1, progress=False)
    assert windows.codes.shape == (K, 36) and windows.starts == [0, 6, 12, 18, 24]
    assert (windows.given, windows.overlap) == (3, 3) and windows.seams() == [(9, 12), (15, 18), (21, 24), (27, 30)]
    assert [t.shape for t in windows.tails] == [(K, 3)] * 4
    again = generate_codes(model, feats, 36, config(3), 1, progress=False)
    assert np.array_equal(windows.codes, again.codes)
    assert all(np.array_equal(a, b) for a, b in zip(windows.tails, again.tails, strict=True))
    assert not np.array_equal(windows.codes, generate_codes(model, feats, 36, config(1), 1, progress=False).codes)


def test_each_window_is_prompted_with_the_music_before_its_crossfade_and_writes_the_crossfade_again():
    """Window i's prompt is the kept tokens of window i-1 from its start to the crossfade (given frames); the
    crossfade's frames are window i's own in `codes` and window i-1's in its tail, each what that window wrote."""
    model = harmony_model()
    feats = features("minor")
    feats["clip"], feats["flow"] = np.repeat(feats["clip"], 2, axis=0), np.repeat(feats["flow"], 2, axis=0)  # 4 s
    seen, real = [], model.net.generate

    def recording(batch, n, *args):
        out = real(batch, n, *args)
        seen.append((args[5], out))  # the prompt it was given, and its draws
        return out

    model.net.generate = recording
    windows = generate_codes(model, feats, 24, config(1), 4, progress=False)
    assert windows.starts == [0, 6, 12] and [p is None for p, _ in seen] == [True, False, False]
    for i, (start, (a, b)) in enumerate(zip(windows.starts[1:], windows.seams(), strict=True)):
        prompt, out = seen[i + 1]
        assert prompt.shape[-1] == windows.given == a - start
        assert np.array_equal(prompt[0].numpy(), seen[i][1][0, :, start - windows.starts[i]:][:, : windows.given])
        assert np.array_equal(windows.tails[i], seen[i][1][0, :, a - windows.starts[i] : b - windows.starts[i]])
        assert np.array_equal(out[0, :, a - start : b - start].numpy(), windows.codes[:, a:b])


def test_decode_windows_crossfades_the_two_windows_renderings_over_the_frames_both_wrote():
    """Two windows (frames 0-12 and 6-18, crossfade 9-12): before it the first window's audio, after it the second's,
    between them the raised-cosine mix of both renderings; with equal tokens there the seam cannot be heard at all
    (the gains sum to one). Each window is decoded once."""
    model = harmony_model()
    hop = model.codec.hop_length
    codes = np.full((K, 18), C_MAJOR)
    codes[:, :9] = C_MINOR
    tail = np.full((K, 3), C_AND_G)
    windows = inference.WindowCodes(codes, [0, 6], given=3, overlap=3, tails=(tail,))
    assert windows.seams() == [(9, 12)]
    before = model.codec.decoded
    wav = inference.decode_windows(model.codec, windows, 18 * hop)
    assert model.codec.decoded - before == 2
    first = model.codec.decode(np.concatenate([codes[:, :9], tail], axis=1))
    second = model.codec.decode(codes)
    assert np.allclose(wav[: 9 * hop], first[: 9 * hop], atol=1e-6)
    assert np.allclose(wav[12 * hop :], second[12 * hop :], atol=1e-6)
    t = (np.arange(9 * hop, 12 * hop) + 0.5) / hop
    up = inference._ramp((t - 9) / 3)
    assert np.allclose(wav[9 * hop : 12 * hop], (1 - up) * first[9 * hop :] + up * second[9 * hop : 12 * hop],
                       atol=1e-6)
    assert up[0] < 0.01 and up[-1] > 0.99  # window 2 comes in from silence, window 1 goes out to it
    same = inference.WindowCodes(codes, [0, 6], given=3, overlap=3, tails=(codes[:, 9:12],))
    assert np.allclose(inference.decode_windows(model.codec, same, 18 * hop), second, atol=1e-6)


def test_the_window_plan_needs_a_crossfade_shorter_than_the_prompt():
    """(window, given, overlap) frames: at 6 frames a second a 2 s window, 1 s prompt, 0.5 s crossfade -> (12, 3, 3);
    a crossfade of the whole prompt is refused with both settings named; at least one frame; no prompt, no crossfade."""
    model = harmony_model()
    assert inference.window_plan(model, config(1)) == (12, 3, 3)
    with pytest.raises(GenerateError, match=r"crossfade_seconds 1 must be shorter than generate.prompt_seconds 1"):
        inference.window_plan(model, dataclasses.replace(config(1), crossfade_seconds=1.0))
    assert inference.window_plan(model, dataclasses.replace(config(1), crossfade_seconds=0.0)) == (12, 5, 1)
    assert inference.window_plan(model, dataclasses.replace(config(1), prompt_seconds=0.0)) == (12, 0, 0)
    with pytest.raises(GenerateError, match="must leave at least 1 s"):
        inference.window_plan(model, dataclasses.replace(config(1), prompt_seconds=1.5))


def test_a_one_window_video_decodes_each_draw_once_and_the_kept_one_is_not_decoded_again():
    """Choosing decodes every draw; decode_windows then takes the kept draw's audio instead of decoding it again (the
    same samples as a fresh decode). A single draw is decoded once, by decode_windows."""
    model = harmony_model()
    windows = generate_codes(model, features("minor"), 12, config(3), 2, progress=False)
    assert model.codec.decoded == 3
    wav = inference.decode_windows(model.codec, windows, 12 * model.codec.hop_length)
    assert model.codec.decoded == 3 and np.array_equal(wav, model.codec.decode(windows.codes))
    assert np.array_equal(inference.decode_windows(model.codec, windows, len(wav)), wav)
    assert model.codec.decoded == 5  # remembered once: the second call decodes
    single = generate_codes(model, features("minor"), 12, config(1), 2, progress=False)
    assert model.codec.decoded == 5
    inference.decode_windows(model.codec, single, len(wav))
    assert model.codec.decoded == 6


def test_a_prompt_that_names_an_instrument_draws_once():
    """With `timbre` (the instrument a text prompt names) the window is one draw, whatever generate.candidates says:
    the same tokens as candidates 1, and nothing is decoded to choose."""
    model = harmony_model()
    named = generate_codes(model, features("minor"), 12, config(4), 7, progress=False, timbre=0).codes
    assert model.codec.decoded == 0
    assert np.array_equal(named, generate_codes(model, features("minor"), 12, config(1), 7, progress=False,
                                                timbre=0).codes)
    assert not np.array_equal(named, generate_codes(model, features("minor"), 12, config(4), 7,
                                                    progress=False).codes)


def beat_draw(period: int, n: int = 24) -> torch.Tensor:
    """(K, n): the C minor chord on every `period`-th frame (6 frames a second), silence between."""
    codes = torch.full((K, n), SILENT, dtype=torch.long)
    codes[:, ::period] = C_MINOR
    return codes


def moving(bpm: float, seconds: float = 4.0, fps: float = 24.0) -> np.ndarray:
    """Flow rows (the embed stage's descriptor: 4 x 4 cells of 8 direction bins + the mean vector) whose speed jumps
    on every beat at `bpm`, as SynthV2M's objects hop on the beats."""
    rows = np.zeros((int(seconds * fps), 16, 10), np.float32)
    beats = np.round(np.arange(0, seconds, 60.0 / bpm) * fps).astype(int)
    rows[beats, :, 0] = 1.0
    rows[np.minimum(beats + 1, len(rows) - 1), :, 0] = 0.5
    return rows.reshape(len(rows), 160)


def test_of_draws_in_the_same_key_the_one_at_the_videos_tempo_is_kept_when_the_model_sees_motion():
    """video_tempo reads the tempo the flow rows show (librosa's beat tracker on their mean speed); pick_draw adds
    TEMPO_MATCH to a draw whose tracked tempo is within 4 % of it. Two C minor draws, at 90 and 120 BPM: a video moving
    at 120 BPM keeps the second, one at 90 BPM the first. A model without motion (no_motion) is not told the tempo:
    the two tie on the key and the first is kept."""
    model = harmony_model()
    model = dataclasses.replace(model, params=dataclasses.replace(
        model.params, base=dataclasses.replace(model.params.base, clip_seconds=4.0)))
    draws = torch.stack([beat_draw(4), beat_draw(3)])  # 6 / 4 = 1.5 beats a second (90 BPM); 2 (120 BPM)
    for bpm, kept in ((120.0, 1), (90.0, 0)):
        feats = dict(features("minor"), flow=moving(bpm), flow_fps=24.0)
        feats["clip"] = np.repeat(feats["clip"][:1], 8, 0)
        batch = window_batch(feats, 0.0, 4.0, None, model.device)
        assert abs(inference.video_tempo(model, batch) - bpm) <= 0.04 * bpm
        assert pick_draw(model, batch, draws) == kept
    still = dataclasses.replace(model, net=debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True,
                                                      fusion={"use_motion": False}))
    still.net.load_state_dict(model.net.state_dict(), strict=False)
    assert inference.video_tempo(still, batch) is None
    assert inference.video_tempo(model, dict(batch, flow=batch["flow"][..., :6])) is None  # not the descriptor
