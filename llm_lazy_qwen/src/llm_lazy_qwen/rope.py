"""Rotary position embedding exactly as transformers (``modeling_rope_utils.py``, rotate_half layout, fp32 angles).

Dimension i pairs with i + d/2 (not interleaved pairs as in Meta/gpt-fast code). The RoPE variants are
a table keyed by ``rope_type`` (transformers' ``ROPE_INIT_FUNCTIONS``): each returns ``(inv_freq,
attention_factor)``; the factor multiplies cos and sin (YaRN's attention temperature, 1 elsewhere).
``dynamic`` (NTK) uses the frequencies of the longest sequence seen since the last reset once past the
original ``max_position_embeddings`` (transformers' ``dynamic_rope_update``). That history belongs to a
sequence: a KV cache carries it (:meth:`RotaryEmbedding.length_for`), calls without a cache share the
module's, as transformers; the frequencies of a call are a pure function of its length, so calls on one
part run side by side.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Params = Mapping[str, Any]  # the normalised rope_parameters: rope_type, rope_theta, factor, ...
# (params, head_dim, max_position_embeddings, seq_len or None) -> (inv_freq (head_dim/2,), attention factor)
RopeInit = Callable[[Params, int, int, Any], tuple[torch.Tensor, float]]


def inv_freq(head_dim: int, theta: float | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    # (head_dim/2,) fp32
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def _default(p: Params, dim: int, max_pos: int, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    return inv_freq(dim, p["rope_theta"]), 1.0


def _linear(p: Params, dim: int, max_pos: int, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    return inv_freq(dim, p["rope_theta"]) / p["factor"], 1.0


def _dynamic(p: Params, dim: int, max_pos: int, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """NTK-aware: the base grows with the sequence length once it passes ``max_position_embeddings``."""
    factor = p["factor"]
    if seq_len is None:
        seq_len = max_pos
    elif isinstance(seq_len, torch.Tensor):  # at run time transformers computes the base in fp32 tensors
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, max_pos)
    base = p["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return inv_freq(dim, base), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p: Params, dim: int, max_pos: int, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Interpolate the low frequencies, keep the high ones, ramp between (beta_fast / beta_slow rotations)."""
    base, factor, original = p["rope_theta"], p["factor"], p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if factor is None:
        factor = max_pos / original
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (d/2,)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention_factor


def _llama3(p: Params, dim: int, max_pos: int, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: divide long wavelengths by ``factor``, keep short ones, interpolate smoothly between."""
    inv = inv_freq(dim, p["rope_theta"])
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


ROPE_INIT: dict[str, RopeInit] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
}
# the keys each type reads from rope_parameters (rope_theta is always filled in)
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def dynamic_length(seen: int, seq_len: int, original: int) -> int:
    """The length whose NTK frequencies a call of `seq_len` positions uses, given `seen`, the length of
    the previous call (`original` for none): transformers' ``dynamic_frequency_update`` as a pure function.

    It grows past `seen`, keeps `seen` while ``seq_len >= original`` and resets to `original` below
    (`original` itself: the initial frequencies). The result is the next call's `seen`.

    Example::

        dynamic_length(32, 50, 32), dynamic_length(50, 40, 32), dynamic_length(50, 12, 32)   # 50, 50, 32
    """
    if seq_len > seen:
        return seq_len
    return original if seq_len < original else seen


@functools.lru_cache(maxsize=64)
def _ntk_inv_freq(theta: float, factor: float, dim: int, original: int, length: int) -> torch.Tensor:
    """NTK frequencies for `length` (> original), computed as transformers does at run time: from an int64
    length tensor (so in fp32), bit for bit. Shared between calls: never modify the result."""
    return _dynamic({"rope_theta": theta, "factor": factor}, dim, original, torch.tensor(length))[0]


# guards the read-modify-write of a module's history (an int); never held across a forward
_HISTORY_LOCK = threading.Lock()


class RotaryEmbedding(nn.Module):
    """cos/sin tables of a model's RoPE; for ``dynamic`` also the history of calls without a KV cache.

    Example::

        rope = RotaryEmbedding({"rope_type": "default", "rope_theta": 1e4}, head_dim=64, max_position_embeddings=4096)
        cos, sin = rope(torch.arange(5)[None], torch.float32)   # (1, 5, 64) each
    """

    def __init__(
        self, params: Params, head_dim: int, max_position_embeddings: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.params, self.head_dim = dict(params), head_dim
        self.rope_type = str(params["rope_type"])
        # dynamic: the length of the last call without a cache (transformers' module state)
        self.original_max_seq_len = self.max_seq_len_cached = max_position_embeddings
        inv, self.attention_scaling = ROPE_INIT[self.rope_type](self.params, head_dim, max_position_embeddings, None)
        self.register_buffer("original_inv_freq", inv.to(device), persistent=False)

    @property
    def inv_freq(self) -> torch.Tensor:
        """(head_dim/2,) the frequencies of the last call without a KV cache (transformers' ``inv_freq``)."""
        return self.frequencies(self.max_seq_len_cached)

    def frequencies(self, length: int | None) -> torch.Tensor:
        """(head_dim/2,) fp32 frequencies for a dynamic length from :meth:`length_for` (None, or any
        length for the other RoPE types: the fixed ones)."""
        if self.rope_type != "dynamic" or length is None or length <= self.original_max_seq_len:
            return self.original_inv_freq
        p = self.params
        inv = _ntk_inv_freq(p["rope_theta"], p["factor"], self.head_dim, self.original_max_seq_len, length)
        return inv.to(self.original_inv_freq.device)

    def length_for(self, position_ids: torch.Tensor, seen: int | None) -> int | None:
        """The dynamic length of a call at `position_ids` (B, T) on a sequence whose previous call had
        `seen` (None: a new sequence); None for the other RoPE types. Store it for the sequence's next call.

        Example::

            length = rope.length_for(position_ids, cache_length)   # changes nothing
            cos, sin = rope(position_ids, torch.float32, length)
        """
        if self.rope_type != "dynamic":
            return None
        seq_len = int(position_ids.max()) + 1  # as transformers: padding positions count too
        original = self.original_max_seq_len
        return dynamic_length(original if seen is None else seen, seq_len, original)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, head_dim) in `dtype`, computed in fp32 from integer positions (B, T).

        Dynamic RoPE: `length` from :meth:`length_for` (calls with a KV cache); None advances the
        module's own history, as transformers (calls without a cache)."""
        if self.rope_type == "dynamic" and length is None:
            seq_len = int(position_ids.max()) + 1
            with _HISTORY_LOCK:
                length = dynamic_length(self.max_seq_len_cached, seq_len, self.original_max_seq_len)
                self.max_seq_len_cached = length
        return cos_sin(position_ids, self.frequencies(length), dtype, self.attention_scaling)


def cos_sin(
    position_ids: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) in `dtype`, computed in fp32 from integer positions (B, T)."""
    freqs = position_ids[..., None].float() * inv.to(position_ids.device, torch.float32)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos/sin: (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin
