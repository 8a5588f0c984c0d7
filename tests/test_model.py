"""pipeline/model: shapes and masks, the loss, the delay pattern, causality, CFG, the KV cache, MusicGen weight loading,
the harmony bank (pipeline/model/harmony.py) through its public interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.model import (
    V2M,
    FusionConfig,
    HarmonyBank,
    ModelConfig,
    TemporalFusion,
    create_model,
    delay_pattern,
    list_presets,
    load_preset,
    token_loss,
    undelay,
)
from pipeline.model.decoder import MusicDecoder, load_musicgen_decoder
from pipeline.model.fusion import FLOW_LOG_FLOOR, SignedLog
from pipeline.model.harmony import harmony_features

torch.set_num_threads(1)
K, CARD, T = 2, 16, 12


def make_batch(B: int = 2, seed: int = 0, clip_len=(4, 3), flow_len=(16, 11)) -> dict:
    g = torch.Generator().manual_seed(seed)
    Tc, Tf = max(clip_len), max(flow_len)
    clip_mask = torch.arange(Tc)[None] < torch.tensor(clip_len[:B])[:, None]
    flow_mask = torch.arange(Tf)[None] < torch.tensor(flow_len[:B])[:, None]
    return {"clip": torch.randn(B, Tc, 8, generator=g), "clip_mask": clip_mask, "clip_fps": torch.full((B,), 2.0),
            "flow": torch.randn(B, Tf, 6, generator=g), "flow_mask": flow_mask, "flow_fps": torch.full((B,), 8.0),
            "codes": torch.randint(0, CARD, (B, K, T), generator=g), "code_mask": torch.ones(B, T, dtype=torch.bool)}


def debug_model(**overrides) -> V2M:
    torch.manual_seed(0)
    cfg = load_preset("debug", decoder={"num_codebooks": K, "codebook_size": CARD},
                      fusion={"clip_dim": 8, "flow_dim": 6, **overrides.pop("fusion", {})}, frame_rate=6.0, **overrides)
    return create_model(cfg).eval()


def test_presets_are_listed_and_unknown_fails():
    assert {"debug", "embedded", "musicgen-small"} <= set(list_presets())
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        load_preset("nope")


def test_delay_pattern_round_trips():
    codes = torch.randint(0, CARD, (3, 4, 7))
    delayed = delay_pattern(codes, CARD)
    assert delayed.shape == (3, 4, 10)
    assert (delayed[:, 2, :2] == CARD).all() and (delayed[:, 2, 9:] == CARD).all()
    assert torch.equal(delayed[:, 3, 3:10], codes[:, 3])
    assert torch.equal(undelay(delayed), codes)


@pytest.mark.parametrize("direction", ["flow_to_clip", "clip_to_flow", "both", "none"])
@pytest.mark.parametrize("use_motion", [True, False])
def test_fusion_shapes_and_masks(direction, use_motion):
    batch = make_batch()
    fusion = TemporalFusion(FusionConfig(clip_dim=8, flow_dim=6, d_model=16, n_heads=2, direction=direction,
                                         use_motion=use_motion, text_dim=5)).eval()
    cond = fusion(batch["clip"], batch["clip_mask"], batch["clip_fps"], batch["flow"], batch["flow_mask"],
                  batch["flow_fps"], torch.randn(2, 5), torch.tensor([True, False]))
    M = 4 + (16 if use_motion else 0) + 1
    assert cond.memory.shape == (2, M, 16) and cond.mask.shape == (2, M)
    assert cond.mask[1].sum() == 3 + (11 if use_motion else 0)  # padded rows and the missing caption are masked
    assert cond.mask[0, -1] and not cond.mask[1, -1]
    ctx = cond.context_at(torch.tensor([[0.0, 0.5, 100.0]] * 2))  # (B, S, d), clamped past the end
    assert ctx.shape == (2, 3, 16) and torch.isfinite(ctx).all()


def test_padded_feature_rows_do_not_change_the_memory():
    batch = make_batch()
    fusion = TemporalFusion(FusionConfig(clip_dim=8, flow_dim=6, d_model=16, n_heads=2, direction="both")).eval()
    args = lambda b: (b["clip"], b["clip_mask"], b["clip_fps"], b["flow"], b["flow_mask"], b["flow_fps"])  # noqa: E731
    before = fusion(*args(batch))
    batch["flow"][1, 11:] = 99.0  # padding of item 1
    batch["clip"][1, 3:] = -99.0
    after = fusion(*args(batch))
    valid = before.mask
    assert torch.allclose(before.memory[valid], after.memory[valid], atol=1e-5)


def test_model_shapes_and_code_mask():
    model = debug_model()
    batch = make_batch()
    batch["code_mask"][1, 9:] = False
    logits, loss, aux = model(batch)
    assert logits.shape == (2, K, T + K - 1, CARD) and loss.shape == () and set(aux) == {"tokens"}
    frames, scored = model.frame_losses(batch)
    assert frames.shape == (2, K, T) and scored[0].all() and not scored[1, :, 9:].any() and scored[1, :, :9].all()
    # one loss: the training loss is the mean of the per-frame losses validation reads, over the scored frames
    assert torch.equal(loss, aux["tokens"]) and torch.allclose(loss, frames[scored].mean())
    valid = delay_pattern(batch["code_mask"][:, None].expand(2, K, T).long(), 0).bool()  # (B, K, S)
    targets = delay_pattern(batch["codes"], model.special).masked_fill(~valid, -100)
    targets[targets == model.special] = -100  # delay padding
    assert torch.equal(loss, token_loss(logits, targets))


@pytest.mark.parametrize("interpolate", [True, False])
def test_decoder_is_causal(interpolate):
    """Changing a later token never changes an earlier logit."""
    model = debug_model(interpolate=interpolate)
    batch = make_batch()
    logits = model(batch)[0]
    changed = dict(batch, codes=batch["codes"].clone())
    changed["codes"][:, :, 7] = (changed["codes"][:, :, 7] + 1) % CARD  # frame 7 = delayed steps 7 .. 7 + K - 1
    logits2 = model(changed)[0]
    # the input of step s is the output of step s - 1, so logits up to step 7 (all codebooks) are unchanged
    assert torch.allclose(logits[:, :, :8], logits2[:, :, :8], atol=1e-6)
    assert not torch.allclose(logits[:, :, 8:], logits2[:, :, 8:])


def test_cfg_guidance_one_is_the_conditional():
    model = debug_model()
    batch = make_batch()
    cond = model(batch)[0]
    assert torch.allclose(model.guided_logits(batch, 1.0), cond, atol=1e-5)
    assert not torch.allclose(model.guided_logits(batch, 3.0), cond, atol=1e-3)


def test_dropped_condition_ignores_the_video():
    model = debug_model()
    batch = make_batch()
    keep = torch.zeros(2, dtype=torch.bool)
    a = model(batch, keep)[0]
    other = dict(batch, clip=torch.randn_like(batch["clip"]), flow=torch.randn_like(batch["flow"]))
    b = model(other, keep)[0]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cache_generation_equals_full_recompute(guidance):
    model = debug_model()
    batch = {k: v for k, v in make_batch().items() if k not in ("codes", "code_mask")}
    fast = model.generate(batch, 9, guidance=guidance, temperature=0.0)
    slow = model.generate(batch, 9, guidance=guidance, temperature=0.0, use_cache=False)
    assert fast.shape == (2, K, 9) and torch.equal(fast, slow)
    assert fast.max() < CARD  # the special token is never emitted as a code
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(batch, 5, top_k=4, generator=g1), model.generate(batch, 5, top_k=4, generator=g2))


def test_plausibility_samples_only_tokens_the_conditional_model_finds_likely():
    model = debug_model()
    batch = {k: v for k, v in make_batch().items() if k not in ("codes", "code_mask")}
    greedy = model.generate(batch, 9, guidance=1.0, temperature=0.0)  # the conditional model's first choices
    only_top = model.generate(batch, 9, guidance=3.0, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              plausibility=1.0)
    assert torch.equal(only_top, greedy)

    def worst_ratio(codes):  # min over sampled cells of p_cond(token) / max p_cond, teacher-forced (causal: same)
        logits = model(dict(batch, codes=codes))[0]
        targets = delay_pattern(codes, model.special)
        logp = logits.float().log_softmax(-1)
        scored = targets != model.special
        picked = logp.gather(-1, targets.clamp(max=CARD - 1)[..., None])[..., 0]
        return (picked - logp.max(-1).values)[scored].exp().min().item()

    free = model.generate(batch, 9, guidance=3.0, temperature=2.0, generator=torch.Generator().manual_seed(0))
    kept = model.generate(batch, 9, guidance=3.0, temperature=2.0, generator=torch.Generator().manual_seed(0),
                          plausibility=0.9)  # an untrained model's distribution is flat: ratios from ~0.6
    assert worst_ratio(free) < 0.9 <= worst_ratio(kept) + 1e-5
    with pytest.raises(ValueError, match="plausibility must be in"):
        model.generate(batch, 3, plausibility=1.5)


def test_token_chroma_table_and_harmony_bias_make_tokens_follow_the_retrieved_chord():
    """fill_token_chroma averages the music's chroma per token and codebook; with a large harmony_bias every sampled
    token is one whose chroma matches the retrieved chord of its frame's time (here pitch class 0 for the first
    second, then 2); harmony_bias 0 is plain sampling; a checkpoint without the table loads with an empty one, or
    keeps the table a model already has (train resuming)."""
    model = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True)
    keys, chroma = torch.eye(4, 8), torch.eye(4, 12)
    model.harmony.fill(keys, chroma, torch.tensor([0, 0, 1, 1]))
    assert not model.has_token_chroma()
    # training music: token v (both codebooks) always sounds pitch class v % 12; tokens 12.. never appear
    codes = torch.arange(12).repeat(2, 3)  # (K, 36)
    frames = torch.eye(12).repeat(3, 1)  # (36, 12)
    model.harmony.fill_token_chroma([codes, codes[:, :5]], [frames, frames[:5]])
    assert model.has_token_chroma()
    table = model.harmony.token_chroma
    assert torch.allclose(table[:, :12], torch.eye(12).expand(K, -1, -1))
    assert torch.equal(table[:, 12:], torch.zeros(K, CARD - 12, 12))
    rows = torch.eye(12)[[0, 2]][None]  # (1, 2 frames, 12): each frame's chroma correlates 1 with its own token
    assert torch.allclose(model.harmony.token_correlation(rows)[0, [0, 1], :, [0, 2]], torch.ones(2, K))
    batch = make_batch(B=2, clip_len=(4, 4))
    batch = {k: v for k, v in batch.items() if k not in ("codes", "code_mask")}
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][:, :2, 0], batch["clip"][:, 2:, 2] = 1.0, 1.0  # rows 0-1 (0-0.5 s) -> pc 0, rows 2-3 -> pc 2

    def draw(bias):
        return model.generate(batch, 12, guidance=3.0, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              harmony_bias=bias)

    plain, biased = draw(0.0), draw(200.0)
    assert torch.equal(plain, model.generate(batch, 12, guidance=3.0, temperature=1.0,
                                             generator=torch.Generator().manual_seed(0)))
    seconds = torch.arange(12) / model.cfg.frame_rate  # frame f at f / 6 s; rows at 0, 0.5, 1, 1.5 s
    early, late = seconds <= 0.5, seconds >= 1.0  # between 0.5 and 1 s the track blends the two chords
    assert (biased[:, :, early] == 0).all() and (biased[:, :, late] == 2).all()
    assert not ((plain[:, :, early] == 0).all() and (plain[:, :, late] == 2).all())
    with pytest.raises(ValueError, match="harmony_bias must be >= 0"):
        model.generate(batch, 3, harmony_bias=-1.0)
    with pytest.raises(ValueError, match="needs a model with harmony_track"):
        debug_model().generate(batch, 3, harmony_bias=1.0)
    with pytest.raises(ValueError, match="values < 16"):
        model.harmony.fill_token_chroma([torch.full((K, 3), CARD)], [torch.eye(12)[:3]])
    state = {k: v for k, v in model.state_dict().items() if k != "token_chroma"}
    old = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True)
    old.load_state_dict(state)
    assert not old.has_token_chroma()
    model.load_state_dict(state)  # resuming from such a checkpoint keeps the table just filled
    assert model.has_token_chroma()


def test_timbre_tables_score_the_tokens_by_what_they_sound_like_in_the_prompted_instrument():
    """A bank with timbre tables (the text system's) fills one token chroma table per instrument from that
    instrument's clips alone; batch["timbre"] makes the harmony bias use it: where two instruments each have a token
    sounding the chord, the bias of the table of all clips ties them and the instrument's table picks its own; -1
    keeps the table of all clips. The tables are saved with the bank (and the instruments in the config, only when
    there are some), and a bad index or missing labels are refused."""
    with pytest.raises(ValueError, match="timbres .* need harmony_track"):
        debug_model(timbres=("bell", "piano"))
    model = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True, timbres=("bell", "piano"))
    model.harmony.fill(torch.eye(4, 8), torch.eye(4, 12), torch.tensor([0, 0, 1, 1]))
    # training music: the bell clip writes token 0 on pitch class 0 and token 2 on pc 2; the piano clip token 12 on
    # pc 0 and token 13 on pc 2, on both codebooks
    frames = torch.eye(12)[[0, 2]].repeat(3, 1)  # (6, 12): pc 0, pc 2, ...
    bell, piano = torch.tensor([0, 2]).repeat(K, 3), torch.tensor([12, 13]).repeat(K, 3)
    with pytest.raises(ValueError, match="timbre tables need each clip's instrument"):
        model.harmony.fill_token_chroma([bell, piano], [frames, frames])
    model.harmony.fill_token_chroma([bell, piano], [frames, frames], [0, 1])
    tables = model.harmony.timbre_chroma
    assert torch.allclose(tables[0][:, [0, 2]], torch.eye(12)[[0, 2]].expand(K, -1, -1))
    assert not tables[0][:, 12:].any() and not tables[1][:, :12].any()
    assert torch.allclose(tables[1][:, [12, 13]], torch.eye(12)[[0, 2]].expand(K, -1, -1))
    rows = torch.eye(12)[[0, 2]][None].expand(3, -1, -1)  # three items, frames sounding pc 0 then pc 2
    corr = model.harmony.token_correlation(rows, torch.tensor([-1, 0, 1]))
    assert torch.equal(corr[0], model.harmony.token_correlation(rows[:1])[0])  # -1: the table of all clips
    assert torch.allclose(corr[0, 0, :, [0, 12]], torch.ones(K, 2))  # both instruments' pc-0 tokens, tied
    assert torch.allclose(corr[1, 0, :, [0, 12]], torch.tensor([1.0, 0.0]).expand(K, -1))  # bell: its own
    assert torch.allclose(corr[2, 1, :, [2, 13]], torch.tensor([0.0, 1.0]).expand(K, -1))  # piano: its own
    with pytest.raises(ValueError, match="timbre must be -1"):
        model.harmony.token_correlation(rows, torch.tensor([-1, 0, 2]))
    batch = make_batch(B=2, clip_len=(4, 4))
    batch = {k: v for k, v in batch.items() if k not in ("codes", "code_mask")}
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][:, :2, 0], batch["clip"][:, 2:, 2] = 1.0, 1.0  # 0-0.5 s retrieves pc 0, 1-1.5 s pc 2

    def draw(timbre):
        b = dict(batch) if timbre is None else dict(batch, timbre=torch.tensor(timbre))
        return model.generate(b, 12, guidance=3.0, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              harmony_bias=200.0)

    seconds = torch.arange(12) / model.cfg.frame_rate
    early, late = seconds <= 0.5, seconds >= 1.0
    mixed, own = draw(None), draw([0, 1])  # item 0 asks for the bell's table, item 1 for the piano's
    assert torch.equal(mixed, draw([-1, -1]))
    assert set(mixed[:, :, early].unique().tolist()) == {0, 12}  # the table of all clips: either instrument's token
    assert (own[0][:, early] == 0).all() and (own[0][:, late] == 2).all()
    assert (own[1][:, early] == 12).all() and (own[1][:, late] == 13).all()
    assert model.cfg.to_dict()["timbres"] == ("bell", "piano") and "timbres" not in debug_model().cfg.to_dict()
    fresh = V2M(ModelConfig.from_dict({**model.cfg.to_dict(), "timbres": ["bell", "piano"]}))
    fresh.load_state_dict(model.state_dict())
    assert "timbre_chroma" in model.state_dict() and torch.equal(fresh.harmony.timbre_chroma, tables)


def test_mode_guard_holds_down_the_tokens_that_sound_the_parallel_key_of_the_retrieved_key():
    """`HarmonyBank.mode_penalty`: a token that sounds the parallel key of the retrieved key (the major third in a
    minor clip) gets a penalty, one that sounds the key itself none, one that the two keys share (tonic and fifth)
    next to none, a token never written none; `generate(..., mode_guard=w)` adds w x that penalty to the logits, so a
    strong guard never writes the wrong-mode triad that unguarded sampling writes, and a model without the harmony
    track refuses it."""
    from pipeline.metrics.rhythm import KK_MAJOR, KK_MINOR

    model = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True)
    c_minor, c_major = torch.tensor(KK_MINOR, dtype=torch.float32), torch.tensor(KK_MAJOR, dtype=torch.float32)
    c_minor, c_major = c_minor / c_minor.sum(), c_major / c_major.sum()
    model.harmony.fill(torch.eye(4, 8), torch.stack([c_minor, c_minor, c_major, c_major]), torch.tensor([0, 0, 1, 1]))
    triad = torch.zeros(3, 12)  # token 0: C minor triad (C Eb G); token 1: C major (C E G); token 2: C and G alone
    triad[0, [0, 3, 7]], triad[1, [0, 4, 7]], triad[2, [0, 7]] = 1 / 3, 1 / 3, 1 / 2
    model.harmony.fill_token_chroma([torch.tensor([0, 1, 2]).repeat(K, 1)], [triad])
    penalty = model.harmony.mode_penalty(torch.stack([c_minor, c_major]))  # (2, K, CARD)
    assert penalty.shape == (2, K, CARD) and (penalty <= 0).all()
    assert (penalty[0, :, 1] < -0.2).all() and (penalty[0, :, 0] > -1e-3).all()  # C minor: the major triad held down
    assert (penalty[1, :, 0] < -0.2).all() and (penalty[1, :, 1] > -1e-3).all()  # C major: the minor triad
    assert (penalty[:, :, 2].abs() < 0.25 * penalty[0, :, 1].abs().min()).all()  # C and G: both keys have them
    assert (penalty[:, :, 3:] == 0).all()  # never written: no chroma, no penalty
    batch = {k: v for k, v in make_batch(B=2, clip_len=(4, 4)).items() if k not in ("codes", "code_mask")}
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][0, :, 0], batch["clip"][1, :, 2] = 1.0, 1.0  # item 0 retrieves C minor, item 1 C major
    bias = model._harmony_bias(batch, 5, 0.0, 3.0)
    assert torch.allclose(bias, 3.0 * model.harmony.mode_penalty(torch.stack([c_minor, c_major]))[:, None]
                          .expand(-1, 5, -1, -1), atol=1e-6)

    def draw(guard):
        return model.generate(batch, 36, guidance=3.0, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              mode_guard=guard)

    free, guarded = draw(0.0), draw(200.0)
    assert (free[0] == 1).any() and (free[1] == 0).any()  # unguarded, each writes the other mode's triad
    assert not (guarded[0] == 1).any() and not (guarded[1] == 0).any()
    with pytest.raises(ValueError, match="mode_guard must be >= 0 and needs a model with harmony_track"):
        debug_model().generate(batch, 4, mode_guard=1.0)


def test_token_noise_replaces_the_decoders_input_tokens_in_training_only():
    batch = make_batch()
    other = dict(batch, codes=(batch["codes"] + 1) % CARD)

    def logits(model, b):
        torch.manual_seed(0)  # the same noise and dropout draws for both inputs
        return model(b)[0]

    noisy = debug_model(token_noise=1.0).train()  # every input token replaced: the inputs no longer matter
    assert torch.allclose(logits(noisy, batch), logits(noisy, other))
    clean = debug_model().train()
    assert not torch.allclose(logits(clean, batch), logits(clean, other))
    noisy.eval()  # no noise at inference
    assert not torch.allclose(logits(noisy, batch), logits(noisy, other))


def test_no_motion_model_ignores_flow():
    model = debug_model(fusion={"use_motion": False})
    batch = make_batch()
    a = model(batch)[0]
    b = model(dict(batch, flow=torch.randn_like(batch["flow"])))[0]
    assert torch.equal(a, b)
    assert not any(n.startswith("fusion.flow") for n, _ in model.named_parameters())


def test_no_clip_model_ignores_the_clip_stream_and_keeps_flow():
    """The no_clip ablation: motion only, its memory the flow rows; another CLIP stream changes nothing."""
    model = debug_model(fusion={"use_clip": False, "direction": "none"})
    batch = make_batch()
    a = model(batch)[0]
    assert torch.equal(a, model(dict(batch, clip=torch.randn_like(batch["clip"])))[0])
    assert not torch.equal(a, model(dict(batch, flow=torch.randn_like(batch["flow"])))[0])
    cond = model.condition(batch)
    assert cond.memory.shape[1] == batch["flow"].shape[1] and len(cond.streams) == 1
    assert not any(n.startswith("fusion.clip") for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="see nothing"):
        FusionConfig(use_clip=False, use_motion=False)


def test_window_and_segment_means_are_what_they_say():
    from pipeline.model.fusion import segment_means, window_means

    rows = torch.arange(10, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)  # row k holds k
    mask = torch.arange(10)[None] < torch.tensor([10, 7])[:, None]  # item 1: 7 valid rows
    short = window_means(rows, mask, torch.tensor([2.0, 2.0]), 2.0)  # +-1 s at 2 fps: rows k-2 .. k+2
    assert short[0, :, 0].tolist() == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.5, 8.0]
    assert short[1, 6, 0] == 5.0  # (4 + 5 + 6) / 3: padding rows 7, 8 are not in the window
    long, centre = segment_means(rows, mask, 3)
    assert long[0, :, 0].tolist() == [1.0, 4.0, 7.5]  # rows 0-2, 3-5, 6-9
    assert long[1, :, 0].tolist() == [0.5, 2.5, 5.0]  # rows 0-1, 2-3, 4-6 of the 7 valid
    assert centre[0].tolist() == [1.0, 4.0, 7.5]
    few, _ = segment_means(rows[:1, :2], mask[:1, :2], 4)  # more segments than rows: each one row, none empty
    assert few[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_vidmuse_style_fusion_reads_frames_near_each_moment_and_the_whole_video():
    """LongShortFusion: memory = long_rows summary rows + one short-term row per CLIP row; flow is not read; a frame
    far from t changes the summary but not t's own window; the long-term context can be the whole video
    (`long_clip`, what inference passes for one window of a long one)."""
    model = debug_model(fusion={"use_motion": False, "mode": "long_short", "short_s": 1.0, "long_rows": 2})
    fusion = model.fusion
    B, Tc = 1, 8
    clip = torch.randn(B, Tc, 8, generator=torch.Generator().manual_seed(3))
    args = (torch.ones(B, Tc, dtype=torch.bool), torch.full((B,), 2.0))
    cond = fusion(clip, *args)
    assert cond.memory.shape == (B, 2 + Tc, 32) and len(cond.streams) == 1
    from pipeline.model.fusion import window_means

    far = clip.clone()
    far[0, 7] = torch.randn(8, generator=torch.Generator().manual_seed(4))  # 3.5 s: outside row 0's +-0.5 s
    projected = fusion.clip_in(clip)
    moved = window_means(fusion.clip_in(far), args[0], args[1], 1.0) - window_means(projected, *args, 1.0)
    assert moved[0, 0].abs().max() == 0 and moved[0, 7].abs().max() > 0
    other = fusion(far, *args)
    assert not torch.allclose(other.memory[0, :2], cond.memory[0, :2])  # the long-term summary moved
    whole = torch.randn(B, 20, 8)
    windowed = fusion(clip, *args, long_clip=whole, long_mask=torch.ones(B, 20, dtype=torch.bool))
    assert not torch.allclose(windowed.memory[0, :2], cond.memory[0, :2])
    batch = make_batch()
    a = model(batch)[0]
    assert torch.equal(a, model(dict(batch, flow=torch.randn_like(batch["flow"])))[0])
    with pytest.raises(ValueError, match="CLIP stream only"):
        FusionConfig(mode="long_short")  # use_motion is on by default
    with pytest.raises(ValueError, match="fusion.mode"):
        FusionConfig(mode="sideways")


def spatial_batch(B: int = 2, cells: int = 3, seed: int = 1) -> dict:
    """make_batch with a patch stream: one row per CLIP row, `cells` cells of the CLIP width (8) each."""
    batch = make_batch(B, seed)
    g = torch.Generator().manual_seed(seed + 10)
    Tc = batch["clip"].shape[1]
    return dict(batch, patch=torch.randn(B, Tc, cells * 8, generator=g), patch_mask=batch["clip_mask"],
                patch_fps=batch["clip_fps"])


def test_spatial_fusion_attends_patch_tokens_and_fuses_each_moment_in_space():
    """SpatialFusion: the memory holds every patch token (P per CLIP row) and one flow row per flow frame; a flow row
    reads the patches of its own moment only (a patch change 2 s away leaves it as it was); the cells are told apart
    (swapping two cells' patches changes the result); the model needs the patch stream and cells that cut the flow
    row evenly."""
    P = 3
    model = debug_model(fusion={"mode": "spatial", "flow_cells": P})
    batch = spatial_batch(cells=P)
    B, Tc = batch["clip"].shape[:2]
    Tf = batch["flow"].shape[1]
    cond = model.condition(batch)
    assert cond.memory.shape[:2] == (B, Tc * P + Tf) and len(cond.streams) == 2
    assert cond.mask[1].sum() == 3 * P + 11  # item 1: 3 CLIP rows, 11 flow rows valid
    flow_rows = cond.memory[:, Tc * P:]
    later = batch["patch"].clone()
    later[:, 3] = torch.randn(B, P * 8)  # CLIP row 3 = 1.5 s; flow rows 0-3 (<= 0.375 s) read rows 0 and 1 only
    moved = model.condition(dict(batch, patch=later)).memory[:, Tc * P:] - flow_rows
    assert moved[0, :4].abs().max() == 0 and moved[0, 12:].abs().max() > 0  # rows at 1.5 s and after: changed
    swapped = batch["patch"].view(B, Tc, P, 8)[:, :, [1, 0, 2]].reshape(B, Tc, P * 8)
    assert not torch.allclose(model.condition(dict(batch, patch=swapped)).memory, cond.memory)
    a = model(batch)[0]
    assert torch.equal(a, model(dict(batch, clip=torch.randn_like(batch["clip"])))[0])  # CLIP rows: only the bank's
    with pytest.raises(ValueError, match="patch"):
        model(make_batch())
    with pytest.raises(ValueError, match="flow_cells"):
        FusionConfig(mode="spatial", flow_dim=6, flow_cells=4)
    with pytest.raises(ValueError, match="use_clip and use_motion"):
        FusionConfig(mode="spatial", use_motion=False)


def tiny_musicgen_config():
    from transformers import MusicgenDecoderConfig

    return MusicgenDecoderConfig(vocab_size=CARD, num_codebooks=K, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                 pad_token_id=CARD, bos_token_id=CARD)


def test_musicgen_weights_load_and_match_transformers(tmp_path):
    """The musicgen-small loading path, on a MusicgenForCausalLM with random weights saved locally: after loading,
    our decoder's logits equal transformers' for the same tokens and memory."""
    from transformers import MusicgenForCausalLM

    torch.manual_seed(0)
    hf = MusicgenForCausalLM(tiny_musicgen_config()).eval()
    hf.save_pretrained(tmp_path / "mg")
    cfg = load_preset("musicgen-small", decoder={"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64,
                                                 "num_codebooks": K, "codebook_size": CARD, "dropout": 0.0},
                      fusion={"clip_dim": 8, "flow_dim": 6, "n_heads": 2})
    model = create_model(cfg, tmp_path / "mg").eval()
    tokens = torch.randint(0, CARD + 1, (2, K, 10))
    memory, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    ours = model.decoder(tokens, memory, mask)  # (B, K, S, card)
    with torch.no_grad():
        theirs = hf(input_ids=tokens.reshape(2 * K, 10), encoder_hidden_states=memory,
                    encoder_attention_mask=mask.long()).logits  # (B * K, S, card)
    assert torch.allclose(ours, theirs.view(2, K, 10, CARD), atol=1e-4)


def test_musicgen_preset_without_weights_says_what_to_do(tmp_path):
    cfg = load_preset("musicgen-small", decoder={"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64})
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/musicgen-small"):
        create_model(cfg, "")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        create_model(cfg, tmp_path)


def test_musicgen_size_mismatch_is_an_error(tmp_path):
    from transformers import MusicgenForCausalLM

    MusicgenForCausalLM(tiny_musicgen_config()).save_pretrained(tmp_path)
    decoder = MusicDecoder(dataclasses.replace(load_preset("debug").decoder, d_model=64))
    with pytest.raises(ValueError, match="musicgen weights in"):
        load_musicgen_decoder(decoder, tmp_path)


def test_flow_norm_layer_divides_out_the_speed_log_keeps_it():
    """flow_norm: layer (LayerNorm over each flow row) gives the same memory for the same motion twice as fast;
    log (sign(x) log(1 + |x| / floor)) tells them apart; anything else is refused."""
    batch = make_batch()
    args = lambda b: (b["clip"], b["clip_mask"], b["clip_fps"], b["flow"], b["flow_mask"], b["flow_fps"])  # noqa: E731
    faster = dict(batch, flow=batch["flow"] * 2.0)
    for norm, same in (("layer", True), ("log", False)):
        torch.manual_seed(0)
        fusion = TemporalFusion(FusionConfig(clip_dim=8, flow_dim=6, d_model=16, n_heads=2, flow_norm=norm)).eval()
        a, b = fusion(*args(batch)).memory, fusion(*args(faster)).memory
        assert torch.allclose(a, b, atol=1e-4) is same, norm
    x = torch.tensor([-0.5, 0.0, 0.05, 1.0])
    assert torch.allclose(SignedLog()(x), x.sign() * torch.log1p(x.abs() / FLOW_LOG_FLOOR))
    with pytest.raises(ValueError, match="flow_norm"):
        FusionConfig(flow_norm="batch")


def test_flow_pooling_over_cells():
    """flow_cells > 1 averages the descriptor over its grid cells: the layout of the motion is dropped."""
    fusion = TemporalFusion(FusionConfig(clip_dim=8, flow_dim=6, d_model=16, n_heads=2, flow_cells=3)).eval()
    batch = make_batch()
    args = lambda b: (b["clip"], b["clip_mask"], b["clip_fps"], b["flow"], b["flow_mask"], b["flow_fps"])  # noqa: E731
    a = fusion(*args(batch)).memory
    swapped = dict(batch, flow=batch["flow"].view(2, 16, 3, 2).flip(2).reshape(2, 16, 6))  # permute the cells
    assert torch.allclose(a, fusion(*args(swapped)).memory, atol=1e-5)


def test_harmony_head_loss_teacher_forcing_and_null_condition():
    """harmony > 0: the head's KL against the true profile is reported in `aux`, zero when the truth is its own
    prediction; in training the decoder sees the true profile of teacher-forced items, at inference only the
    prediction; the null condition hides it."""
    model = debug_model(harmony=1.0, harmony_teacher=1.0)
    batch = make_batch()
    truth = torch.softmax(torch.randn(2, 12, generator=torch.Generator().manual_seed(3)), -1)
    batch["harmony"] = truth
    _, loss, aux = model(batch)
    assert aux["harmony"].item() > 0 and torch.isfinite(aux["harmony"])
    assert torch.equal(loss, aux["tokens"] + model.cfg.harmony * aux["harmony"])
    with torch.no_grad():
        own = model.condition(batch).harmony_logits.softmax(-1)
    assert model.harmony_loss(model.condition(batch), own).abs().item() < 1e-5
    other = dict(batch, harmony=truth.flip(0))
    assert torch.equal(model(batch)[0], model(other)[0])  # eval: the true profile is never read
    model.train()
    for layer in model.modules():  # dropout off, so that only the profile can differ
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    assert not torch.allclose(model(batch)[0], model(other)[0])
    model.eval()
    keep = torch.zeros(2, dtype=torch.bool)
    assert torch.allclose(model(batch, keep)[0], model(dict(batch, clip=torch.randn_like(batch["clip"])), keep)[0],
                          atol=1e-6)
    gen = {k: v for k, v in batch.items() if k not in ("codes", "code_mask", "harmony")}
    assert torch.equal(model.generate(gen, 6, temperature=0.0), model.generate(gen, 6, temperature=0.0,
                                                                               use_cache=False))


def test_harmony_head_reads_the_clip_stream():
    """The profile is predicted from the CLIP rows (what the scene looks like), so it moves with them."""
    model = debug_model(harmony=1.0)
    batch = make_batch()
    with torch.no_grad():
        a = model.condition(batch).harmony_logits
        b = model.condition(dict(batch, clip=torch.randn_like(batch["clip"]))).harmony_logits
    assert a.shape == (2, 12) and not torch.allclose(a, b)
    assert "harmony_head.1.weight" in model.state_dict() and "harmony_head.1.weight" not in debug_model().state_dict()


def profile_of(model: V2M, batch: dict) -> torch.Tensor:
    """The profile the model's harmony bank retrieves for a batch (B, 12)."""
    return model.harmony(batch["clip"], batch["clip_mask"], batch.get("bank_index"))[0]


def test_harmony_knn_takes_the_nearest_training_clips_profile_never_its_own():
    model = debug_model(harmony_knn=1, harmony_bank=3)
    keys = torch.eye(3, 8)  # bank clip i's mean CLIP embedding points along axis i
    profiles = torch.eye(3, 12)
    model.harmony.fill(keys * 5.0, profiles)  # stored normalised
    assert torch.equal(model.harmony.bank_keys, keys)
    batch = make_batch(B=2, clip_len=(4, 4))
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][0, :, 1] = 1.0  # item 0 looks like bank clip 1
    batch["clip"][1, :, 0], batch["clip"][1, :, 2] = 1.0, 0.5  # item 1: nearest 0, then 2
    assert torch.equal(profile_of(model, batch), profiles[[1, 0]])
    assert torch.equal(profile_of(model, dict(batch, bank_index=torch.tensor([-1, 0]))), profiles[[1, 2]])
    restored = debug_model(harmony_knn=1, harmony_bank=3)
    restored.load_state_dict(model.state_dict())  # the bank travels in the checkpoint
    assert torch.equal(profile_of(restored, batch), profiles[[1, 0]])
    with pytest.raises(ValueError, match="harmony bank"):
        model.harmony.fill(torch.zeros(2, 8), torch.zeros(2, 12))
    lone = debug_model(harmony_knn=3, harmony_bank=1)
    lone.harmony.fill(torch.ones(1, 8), profiles[:1])
    assert torch.equal(profile_of(lone, dict(batch, bank_index=torch.tensor([0, 0]))), profiles[[0, 0]])
    empty = debug_model(harmony_knn=3)  # no bank yet (an untrained model): a flat profile, never NaN
    assert torch.allclose(profile_of(empty, batch), torch.full((2, 12), 1 / 12))
    assert torch.isfinite(empty(batch)[0]).all()
    gen = {k: v for k, v in batch.items() if k not in ("codes", "code_mask")}
    assert torch.equal(model.generate(gen, 6, temperature=0.0), model.generate(gen, 6, temperature=0.0,
                                                                               use_cache=False))


def test_harmony_into_memory_adds_one_memory_row_instead_of_the_input():
    batch = make_batch()
    base = debug_model(harmony_knn=1, harmony_bank=2)
    mem = debug_model(harmony_knn=1, harmony_bank=2, harmony_into="memory")
    for m in (base, mem):
        m.harmony.fill(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), torch.eye(2, 12))
    a, b = base.condition(batch), mem.condition(batch)
    assert b.memory.shape[1] == a.memory.shape[1] + 1 and b.mask[:, -1].all()
    assert a.harmony is not None and b.harmony is None
    assert torch.isfinite(mem(batch)[0]).all()


def test_harmony_track_retrieves_per_row_from_other_clips_and_changes_over_time():
    """harmony_track: each CLIP row takes the chroma of its nearest bank row of another clip, the clip profile is
    their mean, and what the decoder gets varies with time (row 0's chord early, row 3's late); the null condition
    hides it."""
    model = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True)
    keys, chroma = torch.eye(4, 8), torch.eye(4, 12)  # bank row i points along axis i and sounds pitch class i
    model.harmony.fill(keys, chroma, torch.tensor([0, 0, 1, 1]))
    batch = make_batch(B=2, clip_len=(4, 4))
    batch["clip"] = torch.zeros(2, 4, 8)
    batch["clip"][:, :2, 0], batch["clip"][:, 2:, 2] = 1.0, 1.0  # rows 0-1 look like bank row 0, rows 2-3 like row 2
    batch["clip"][:, :, 1] = 0.5  # and all a little like bank row 1 (clip 0)
    profile, track = model.harmony(batch["clip"], batch["clip_mask"])
    assert torch.equal(track[0].argmax(-1), torch.tensor([0, 0, 2, 2]))
    assert torch.allclose(profile, track.mean(1))  # the clip's profile: its rows' mean
    _, own = model.harmony(batch["clip"], batch["clip_mask"], torch.tensor([0, 1]))  # item 0 is clip 0, item 1 clip 1
    assert torch.equal(own[0].argmax(-1), torch.tensor([2, 2, 2, 2]))  # clip 0's rows are off limits
    assert torch.equal(own[1].argmax(-1), torch.tensor([0, 0, 1, 1]))  # item 1 rows 2-3: bank row 1 is the nearest left
    cond = model.condition(batch)
    assert torch.allclose(harmony_features(profile, model.key_profiles), harmony_features(
        torch.stack([torch.tensor([0.5, 0, 0.5] + [0] * 9)] * 2), model.key_profiles))
    steps = torch.tensor([0, 11])  # 0 s (row 0) and 11 / 6 s (row 3 at 2 fps)
    extra = model._extra(cond, steps)
    assert not torch.allclose(extra[:, 0], extra[:, 1])
    hidden = model._extra(cond.drop(torch.tensor([False, True])), steps)
    assert torch.equal(hidden[0], model._extra(cond.drop(torch.tensor([False, False])), steps)[0])
    assert not torch.allclose(hidden[1, 0], hidden[0, 0])
    with pytest.raises(ValueError, match="clip index"):
        model.harmony.fill(keys, chroma)
    with pytest.raises(ValueError, match="harmony_track needs"):
        debug_model(harmony_track=True)
    teach = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True, harmony_teacher=1.0).train()
    teach.harmony.fill(keys, chroma, torch.tensor([0, 0, 1, 1]))
    truth = torch.zeros(2, 4, 12)
    truth[..., 7] = 1.0
    taught = teach.condition(dict(batch, harmony=truth.mean(1), harmony_track=truth))
    expected = teach.track_in((truth - truth.mean(-1, keepdim=True)) / truth.std(-1, keepdim=True))
    assert torch.allclose(taught.harmony_track[0], expected)
    gen = {k: v for k, v in batch.items() if k not in ("codes", "code_mask")}
    assert torch.equal(model.generate(gen, 6, temperature=0.0), model.generate(gen, 6, temperature=0.0,
                                                                               use_cache=False))


def test_harmony_bank_is_given_at_construction_and_saved_under_the_names_it_always_had():
    """V2M(cfg, harmony=bank) retrieves from that bank (one that does not match the config is refused); the bank's
    buffers are saved first and under V2M's own prefix (bank_keys ... token_chroma, as before the bank was a
    component), so a state dict round-trips into a model built without a bank."""
    cfg = debug_model(harmony_knn=1, harmony_bank=4, harmony_track=True).cfg
    bank = HarmonyBank.from_config(cfg).fill(torch.eye(4, 8), torch.eye(4, 12), torch.tensor([0, 0, 1, 1]))
    model = V2M(cfg, harmony=bank)
    assert model.harmony is bank and torch.equal(model.harmony.bank_profiles, torch.eye(4, 12))
    state = model.state_dict()
    assert list(state)[:4] == ["bank_keys", "bank_profiles", "bank_clips", "token_chroma"]
    assert not any(k.startswith("harmony.") for k in state) and "harmony" not in state._metadata
    fresh = V2M(cfg)  # an empty bank of the configured size
    assert not fresh.harmony.bank_keys.any()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.harmony.bank_keys, bank.bank_keys) and torch.equal(fresh.harmony.bank_clips,
                                                                                bank.bank_clips)
    with pytest.raises(ValueError, match="does not match the model config"):
        V2M(cfg, harmony=HarmonyBank(3, 8, 1, track=True, token_shape=(K, CARD)))
    with pytest.raises(ValueError, match="does not match the model config"):
        V2M(debug_model().cfg, harmony=bank)  # a bank given to a model without harmony_knn
    assert debug_model().harmony is None and "bank_keys" not in debug_model().state_dict()


def test_text_prior_adds_the_captions_bias_to_every_logit_and_only_with_a_caption():
    """text_prior: a learned (K, V) bias from the caption, zero until trained, added at every step when the caption is
    there (not masked, not dropped, not the null condition); with it sampling follows the caption; text_force keeps a
    caption through caption dropout; the field is saved in a checkpoint's config only when set."""
    with pytest.raises(ValueError, match="text_prior needs a model with text"):
        debug_model(text_prior=True)
    model = debug_model(text_prior=True, fusion={"text_dim": 5})
    batch = make_batch()
    batch["text"], batch["text_mask"] = torch.randn(2, 5, generator=torch.Generator().manual_seed(3)), torch.ones(
        2, dtype=torch.bool)
    before = model(batch)[0]
    no_caption = dict(batch, text_mask=torch.tensor([False, True]))
    before_without = model(no_caption)[0]
    with torch.no_grad():  # as if trained: caption dimension 0 says "token 7 of codebook 1"
        model.text_prior.weight.zero_()
        model.text_prior.bias.zero_()
        row = model.fusion.text_in(batch["text"])
        model.text_prior.weight[CARD + 7] = 40.0 * row[0] / row[0].norm() ** 2
    after = model(batch)[0]
    assert torch.allclose((after - before)[0, 1, :, 7], torch.full_like(after[0, 1, :, 7], 40.0), atol=1e-3)
    assert torch.allclose((after - before)[0, 0], torch.zeros_like(after[0, 0]), atol=1e-5)  # codebook 0: no bias
    assert torch.allclose(model(no_caption)[0][0], before_without[0], atol=1e-5)  # no caption, no bias
    assert torch.allclose(model(batch, torch.tensor([False, True]))[0][0], model(no_caption, torch.tensor(
        [False, True]))[0][0], atol=1e-5)  # the null condition has no caption either
    plain = {k: v for k, v in batch.items() if k not in ("codes", "code_mask")}
    codes = model.generate(plain, 6, guidance=3.0, temperature=0.0)
    assert (codes[0, 1] == 7).all() and not (model.generate(dict(plain, text_mask=torch.tensor([False, True])), 6,
                                                               guidance=3.0, temperature=0.0)[0, 1] == 7).all()
    model.train()
    model.fusion.cfg = dataclasses.replace(model.fusion.cfg, text_dropout=1.0)  # every caption dropped ...
    torch.manual_seed(0)
    cond = model.condition(dict(batch, text_force=torch.tensor([True, False])))
    assert cond.text[1].tolist() == [True, False]  # ... but the forced one
    assert "text_prior" not in debug_model().cfg.to_dict() and model.cfg.to_dict()["text_prior"]
    assert ModelConfig.from_dict(model.cfg.to_dict()) == model.cfg
