"""RoPE scaling of a GGUF model as the HF config's ``rope_scaling``, undoing what llama.cpp's
``convert_hf_to_gguf.py`` wrote.

- ``linear``: ``{arch}.rope.scaling.type`` "linear" and ``.factor`` (older files: ``.rope.scale_linear``;
  a factor without a type is linear, as llama.cpp reads it).
- ``yarn``: type "yarn", ``.factor``, ``.original_context_length`` (default: the context length, as
  llama.cpp), ``.yarn_beta_fast`` / ``.yarn_beta_slow``, ``.yarn_attn_factor`` (HF's ``attention_factor``,
  which the converter writes verbatim), ``.yarn_log_multiplier`` (``mscale_all_dim`` with ``mscale`` 1, as
  llama.cpp reads it) and ``.attn_factor`` (llama.cpp multiplies the attention factor by it).
- ``llama3`` (Llama 3.1+): no metadata; a ``rope_freqs.weight`` tensor holds the divisor of each frequency
  (1, ``factor``, or the smooth ramp between). The parameters are recovered from it and accepted only if
  recomputing the divisors as the converter does gives the tensor back (:func:`llama3_divisors`).
- ``dynamic`` (NTK): the converter writes nothing, so the file reads as default RoPE (the same up to the
  context length; past it llama.cpp does not grow the base either).

Anything else under ``rope.scaling.`` is refused by name: a key we ignored would give wrong logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import SepweightError
from .gguf_reader import GGUFModel

ROPE_FREQS = "rope_freqs.weight"
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_KNOWN = {
    "type",
    "factor",
    "original_context_length",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_attn_factor",
    "yarn_log_multiplier",
    "yarn_ext_factor",
    "attn_factor",
    "finetuned",  # informational
}
_RTOL = 1e-5  # recomputed llama3 divisors vs the stored fp32 tensor


def gguf_rope_scaling(model: GGUFModel, head_dim: int, theta: float, context_length: int) -> dict[str, Any] | None:
    """The ``rope_scaling`` dict of a GGUF model's config (None: default RoPE).

    Example::

        gguf_rope_scaling(open_gguf("Llama-3.2-1B.Q4_K_M.gguf"), 64, 500000.0, 131072)
        # {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        #  'original_max_position_embeddings': 8192}
    """
    arch, where = model.architecture, model.paths[0]
    prefix = f"{arch}.rope.scaling."
    keys = {k.removeprefix(prefix): v for k, v in model.metadata.items() if k.startswith(prefix)}
    unknown = sorted(set(keys) - _KNOWN)
    if unknown:
        raise SepweightError(
            f"{where}: GGUF metadata {[prefix + k for k in unknown]} is RoPE scaling we cannot map to "
            "transformers' rope_scaling; the model is not supported"
        )
    factor = keys.get("factor", model.key("rope.scale_linear"))
    scales = factor not in (None, 0, 0.0, 1.0)
    kind = keys.get("type", "linear")
    if kind in ("none", "linear"):  # llama.cpp scales by the factor whatever the type says; 0 or 1: not at all
        kind = "linear" if scales else "none"
    freqs = model.tensors.get(ROPE_FREQS)
    if freqs is not None and kind != "none":
        raise SepweightError(
            f"{where}: tensor {ROPE_FREQS!r} (llama3 RoPE) and {prefix}type {kind!r} together cannot be "
            "expressed as one transformers rope_scaling"
        )
    attn = keys.get("attn_factor", 1.0)
    if kind != "yarn" and attn != 1.0:
        raise SepweightError(f"{where}: {prefix}attn_factor={attn} is only supported with yarn RoPE")
    if freqs is not None:
        return _llama3(model, head_dim, theta, keys.get("original_context_length"))
    if kind == "none":
        return None
    if factor in (None, 0, 0.0):
        raise SepweightError(f"{where}: {prefix}type is {kind!r} but {prefix}factor is missing")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise SepweightError(
            f"{where}: {prefix}type is {kind!r}; supported: linear, yarn, llama3 ({ROPE_FREQS}) or none"
        )
    return _yarn(keys, float(factor), context_length, where, prefix)


def _yarn(keys: dict[str, Any], factor: float, context_length: int, where: Any, prefix: str) -> dict[str, Any]:
    if keys.get("yarn_ext_factor", 1.0) != 1.0:  # transformers' YaRN always extrapolates fully
        raise SepweightError(f"{where}: {prefix}yarn_ext_factor={keys['yarn_ext_factor']} is not supported (only 1)")
    out: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(keys.get("original_context_length", context_length)),
    }
    if "yarn_beta_fast" in keys:
        out["beta_fast"] = float(keys["yarn_beta_fast"])
    if "yarn_beta_slow" in keys:
        out["beta_slow"] = float(keys["yarn_beta_slow"])
    log_mul = float(keys.get("yarn_log_multiplier", 0.0))
    if log_mul:
        out["mscale"], out["mscale_all_dim"] = 1.0, log_mul
    attention = keys.get("yarn_attn_factor")
    attn = float(keys.get("attn_factor", 1.0))
    if attention is None and attn != 1.0:  # the factor transformers would compute, times llama.cpp's multiplier
        attention = _mscale(factor) / (_mscale(factor, log_mul) if log_mul else 1.0)
    if attention is not None:
        out["attention_factor"] = float(attention) * attn
    return out


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def llama3_divisors(
    theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float, old_context: float
) -> torch.Tensor:
    """(dim/2,) fp32 ``rope_freqs`` as ``convert_hf_to_gguf.py``'s ``LlamaModel.generate_extra_tensors``
    computes them (fp32 frequencies, the same operations in the same order).

    Example::

        llama3_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192)[-1]   # tensor(8.)
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    out: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _llama3(model: GGUFModel, dim: int, theta: float, old_context: int | None) -> dict[str, Any] | None:
    """llama3 parameters whose divisors equal the stored ``rope_freqs`` (None when all are 1)."""
    t = model.tensors[ROPE_FREQS]
    where = f"{t.path}: tensor {ROPE_FREQS!r}"
    if t.shape != (dim // 2,) or t.type_name != "F32":
        raise SepweightError(f"{where} is {t.type_name} {list(t.shape)}, expected F32 [{dim // 2}] (head_dim / 2)")
    d = t.dequantize()  # (dim/2,)
    if not torch.isfinite(d).all() or (d <= 0).any():
        raise SepweightError(f"{where} holds non-positive or non-finite divisors; the file is damaged")
    if (d == 1).all():
        return None  # divides nothing: default RoPE
    old = int(old_context or LLAMA3_DEFAULTS["original_max_position_embeddings"])
    candidates = [(_nice(float(d[-1])), LLAMA3_DEFAULTS["low_freq_factor"], LLAMA3_DEFAULTS["high_freq_factor"])]
    candidates += _fitted(d, dim, theta, old)
    for factor, low, high in candidates:
        if factor <= 1 or not 0 < low < high:
            continue
        if torch.allclose(llama3_divisors(theta, dim, factor, low, high, old), d, rtol=_RTOL, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old,
            }
    raise SepweightError(
        f"{where}: these per-frequency RoPE divisors are not Llama 3's rope scaling for any factor / "
        f"low_freq_factor / high_freq_factor (rope theta {theta}, head_dim {dim}); the model is not supported"
    )


def _fitted(d: torch.Tensor, dim: int, theta: float, old: int) -> list[tuple[float, float, float]]:
    """(factor, low, high) from the ramp: between the two wavelengths ``1 / d`` is linear in the frequency,
    ``s = (old f / 2 pi - low) / (high - low)``; two or more ramp points fix both (rounded and as fitted)."""
    factor = float(d[-1])
    ramp = (d != 1) & (d != d[-1])
    if int(ramp.sum()) < 2 or factor <= 1:
        return []
    freqs = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).double()[ramp]
    s = (1 / d[ramp].double() - 1 / factor) / (1 - 1 / factor)
    a, b = torch.linalg.lstsq(torch.stack([freqs, torch.ones_like(freqs)], 1), s[:, None]).solution[:, 0].tolist()
    if a <= 0:
        return []
    # s = 0 at the low-frequency edge, 1 at the high one: old / wavelen there is low / high
    low, high = old * (-b / a) / (2 * math.pi), old * ((1 - b) / a) / (2 * math.pi)
    return [(_nice(factor), _nice(low), _nice(high)), (factor, low, high)]


def _nice(x: float) -> float:
    """`x` to 6 significant digits (an fp32 8.0 or a fitted 1.9999998 back to the config's number)."""
    return float(f"{x:.6g}")
