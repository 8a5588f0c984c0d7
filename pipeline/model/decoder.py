"""A MusicGen-style decoder: one transformer over K parallel codebooks with the delay pattern, cross-attending to the
conditioning memory. Readable top to bottom; parameter names follow transformers' `MusicgenForCausalLM` (minus its
`model.decoder.` prefix), so the MusicGen-small decoder loads by renaming keys (`load_musicgen_decoder`).

Delay pattern (Copet et al. 2023, "Simple and Controllable Music Generation", section 2.2): codebook k is shifted k
steps to the right, so at step s the model writes codebook 0 of frame s, codebook 1 of frame s-1, ..., and every
codebook of a frame is predicted after the coarser codebooks of the same frame. Codes [B, K, T] become a sequence
[B, K, T + K - 1]; the cells before a codebook's start and after its end hold `special` (= codebook_size, also the BOS
token, as in MusicGen) and are not scored.

Layer: pre-norm self-attention (causal, with a KV cache for generation) -> cross-attention to the memory -> GELU
feed-forward; sinusoidal positions (cos | sin halves, as in MusicGen); K embeddings summed at the input and K linear
heads at the output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    num_codebooks: int = 2  # K (set from the codec)
    codebook_size: int = 256  # cardinality of each codebook (set from the codec); the special token is this value
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.0


def delay_pattern(codes: torch.Tensor, special: int) -> torch.Tensor:
    """codes (B, K, T) -> delayed (B, K, T + K - 1) with delayed[:, k, t + k] = codes[:, k, t], the rest `special`."""
    B, K, T = codes.shape
    out = codes.new_full((B, K, T + K - 1), special)
    for k in range(K):
        out[:, k, k : k + T] = codes[:, k]
    return out


def undelay(delayed: torch.Tensor) -> torch.Tensor:
    """delayed (B, K, S) -> codes (B, K, S - K + 1): the inverse of `delay_pattern`."""
    B, K, S = delayed.shape
    T = S - K + 1
    return torch.stack([delayed[:, k, k : k + T] for k in range(K)], dim=1)


def sinusoidal_positions(n: int, dim: int, offset: int = 0) -> torch.Tensor:
    """MusicGen's (tensor2tensor) positional table rows offset .. offset + n - 1 -> (n, dim): [cos | sin]."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(offset, offset + n, dtype=torch.float32)[:, None] * freq[None]
    return F.pad(torch.cat([angle.cos(), angle.sin()], dim=1), (0, dim % 2))


class Attention(nn.Module):
    """Multi-head attention; self-attention appends to `cache` (a dict) so generation costs one row per step."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, h, T, hs)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, ctx_mask: torch.Tensor | None = None,
                cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d); ctx (B, M, d) + ctx_mask (B, M) for cross-attention, None for causal self-attention."""
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))
        if ctx is None:  # causal self-attention over the cache + the new rows
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                k, v = _append(cache, k, v)
            past = k.shape[2] - T
            # row i may see keys 0 .. past + i; one new row sees them all (no mask: SDPA's faster path, same values)
            mask = None if T == 1 else torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        else:  # cross-attention: the memory's keys and values are computed once per generation
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._heads(self.k_proj(ctx)), self._heads(self.v_proj(ctx))
                if cache is not None:
                    cache["k"], cache["v"] = k, v
            mask = ctx_mask[:, None, None, :]  # (B, 1, 1, M)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, h, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


def _append(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, h, T, hs) appended to the cache's; returns all of them so far (views of its buffers).

    The buffers grow by doubling, so a step writes its row in place instead of copying the whole cache (torch.cat
    at every step moved ~0.3 GB per step at 30 s of music in the MusicGen-small decoder). The values, and so every
    result, are the same as with concatenation."""
    n, T = cache.get("n", 0), k.shape[2]
    if "k" not in cache or n + T > cache["k"].shape[2]:
        size = max(64, 2 * (n + T))
        grown_k, grown_v = k.new_empty(*k.shape[:2], size, k.shape[3]), v.new_empty(*v.shape[:2], size, v.shape[3])
        if n:
            grown_k[:, :, :n], grown_v[:, :, :n] = cache["k"][:, :, :n], cache["v"][:, :, :n]
        cache["k"], cache["v"] = grown_k, grown_v
    cache["k"][:, :, n : n + T], cache["v"][:, :, n : n + T] = k, v
    cache["n"] = n + T
    return cache["k"][:, :, : n + T], cache["v"][:, :, : n + T]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.final_layer_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, memory_mask, cache: dict | None = None):
        x = x + self.drop(self.self_attn(self.self_attn_layer_norm(x), cache=None if cache is None else cache["self"]))
        x = x + self.drop(self.encoder_attn(self.encoder_attn_layer_norm(x), memory, memory_mask,
                                            cache=None if cache is None else cache["cross"]))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))


class MusicDecoder(nn.Module):
    """Delayed codes (B, K, S) + memory (B, M, d) -> logits (B, K, S, codebook_size)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.ModuleList([nn.Embedding(cfg.codebook_size + 1, d) for _ in range(cfg.num_codebooks)])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.layer_norm = nn.LayerNorm(d)
        self.lm_heads = nn.ModuleList([nn.Linear(d, cfg.codebook_size, bias=False)
                                       for _ in range(cfg.num_codebooks)])
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def special(self) -> int:
        return self.cfg.codebook_size

    def new_cache(self) -> list[dict]:
        return [{"self": {}, "cross": {}} for _ in self.layers]

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                extra: torch.Tensor | None = None, cache: list[dict] | None = None, offset: int = 0) -> torch.Tensor:
        """tokens (B, K, S) of the delayed sequence starting at step `offset`; extra (B, S, d) is added to the input
        (the interpolated video context), cache from `new_cache()` for incremental decoding -> (B, K, S, card)."""
        B, K, S = tokens.shape
        x = sum(self.embed_tokens[k](tokens[:, k]) for k in range(K))  # (B, S, d)
        x = x + sinusoidal_positions(S, self.cfg.d_model, offset).to(x)
        if extra is not None:
            x = x + extra
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, memory_mask, None if cache is None else cache[i])
        x = self.layer_norm(x)
        return torch.stack([head(x) for head in self.lm_heads], dim=1)  # (B, K, S, card)


# --------------------------------------------------------------------------------------------------------------------
# MusicGen-small weights
# --------------------------------------------------------------------------------------------------------------------

def _read_safetensors(directory: Path, skip: tuple[str, ...] = ("text_encoder.", "audio_encoder.")
                      ) -> dict[str, torch.Tensor]:
    """The tensors of a transformers folder, but those under `skip`: a full MusicGen save also holds its T5 text
    encoder and EnCodec (~1.2 GB of the 2.4 GB), which the decoder never needs in memory."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"{directory}: no model*.safetensors or pytorch_model*.bin beside config.json")
        return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()
                if not k.startswith(skip)}
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            state.update({k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(skip)})
    return state


def musicgen_decoder_config(directory: str | Path) -> DecoderConfig:
    """DecoderConfig from a transformers MusicGen folder (a full `MusicgenForConditionalGeneration` save, such as
    facebook/musicgen-small, or a `MusicgenForCausalLM` decoder save)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"musicgen weights: {path} not found. Download facebook/musicgen-small on a machine with network access "
            "(`huggingface-cli download facebook/musicgen-small --local-dir DIR`), copy DIR here and set "
            "train.pretrained_dir: DIR in params.yaml.")
    try:
        config = json.loads(path.read_text())
        dec = config.get("decoder", config)
        return DecoderConfig(num_codebooks=dec["num_codebooks"], codebook_size=dec["vocab_size"],
                             d_model=dec["hidden_size"], n_layers=dec["num_hidden_layers"],
                             n_heads=dec["num_attention_heads"], ffn_dim=dec["ffn_dim"],
                             dropout=dec.get("dropout", 0.0))
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: not the config of a MusicGen model (facebook/musicgen-small or a "
                         f"MusicgenForCausalLM save): {type(exc).__name__}: {exc}") from None


def load_musicgen_decoder(decoder: MusicDecoder, directory: str | Path) -> None:
    """Copy MusicGen decoder weights from a local transformers folder into `decoder` (same sizes required)."""
    directory = Path(directory)
    want = musicgen_decoder_config(directory)
    have = decoder.cfg
    if (want.d_model, want.n_layers, want.num_codebooks, want.codebook_size) != (
            have.d_model, have.n_layers, have.num_codebooks, have.codebook_size):
        raise ValueError(f"musicgen weights in {directory} are {want}, the model is {have}")
    try:
        state = _read_safetensors(directory)
    except Exception as exc:  # noqa: BLE001 - a truncated safetensors / bin file: name it
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{directory}: the MusicGen weight files do not load ({type(exc).__name__}: {first}); "
                         "they are truncated or damaged: download them again") from None
    ours = {}
    for prefix in ("decoder.model.decoder.", "model.decoder.", "decoder.", ""):  # full model, causal LM, bare
        for head_prefix in ("decoder.lm_heads.", "lm_heads."):
            got = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            got.update({k[len(head_prefix) - len("lm_heads."):]: v for k, v in state.items()
                        if k.startswith(head_prefix)})
            if "layer_norm.weight" in got and "lm_heads.0.weight" in got:
                ours = got
                break
        if ours:
            break
    if not ours:
        raise ValueError(f"{directory}: no MusicGen decoder weights found (expected keys like "
                         "'decoder.model.decoder.layers.0.fc1.weight')")
    expected = decoder.state_dict().keys()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"{directory}: MusicGen weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    decoder.load_state_dict({k: ours[k] for k in expected})
