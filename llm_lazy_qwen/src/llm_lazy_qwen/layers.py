"""RMSNorm, the SwiGLU MLP (equal to transformers' Qwen2RMSNorm / Qwen2MLP) and the one linear factory.

Every linear of a part (q/k/v/o, gate/up/down, the head) is built by :func:`linear`, so a quantized
folder is a module swap on the meta skeleton (:func:`match_linears`, as gpt-fast's ``quantize.py``):
``nn.Linear`` where the folder stores a weight, ``QuantLinear`` where it stores integers + scales.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import QuantSpec

from .quant import QuantLinear
from .slab_linear import SlabLinear


def linear(
    in_features: int,
    out_features: int,
    bias: bool,
    device: torch.device | str | None = None,
    spec: QuantSpec | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """``nn.Linear``, or a ``QuantLinear`` stored as `spec` says (``dtype``: its scales' and bias' dtype)."""
    if spec is None:
        return nn.Linear(in_features, out_features, bias=bias, device=device)
    if tuple(spec.shape) != (out_features, in_features):
        raise ValueError(
            f"quantized weight has shape {list(spec.shape)}, the config implies {[out_features, in_features]}"
        )
    return QuantLinear(in_features, out_features, bias, spec.scheme, spec.group_size, spec.layout, device, dtype)


def fits(module: nn.Module, spec: QuantSpec | None) -> bool:
    """Whether a linear module already computes with weights stored as `spec` (None: a plain weight)."""
    if spec is None:
        return type(module) is nn.Linear
    return isinstance(module, QuantLinear) and module.spec == spec


def match_linears(module: nn.Module, specs: Mapping[str, QuantSpec], dtype: torch.dtype, where: str) -> None:
    """Swap each (meta) linear of `module` for the kind its stored weight needs: a ``QuantLinear`` where
    ``specs`` (``{"self_attn.q_proj": QuantSpec, ...}``, storage names) has it, ``nn.Linear`` elsewhere.

    A LoRA wrapper keeps its adapter: its ``base_layer`` is swapped.
    """
    names = set()
    for name, mod in list(module.named_modules()):
        if not isinstance(mod, (nn.Linear, QuantLinear, SlabLinear)):  # (a budget's SlabLinear: swapped back)
            continue
        key = name.replace(".base_layer", "")
        names.add(key)
        spec = specs.get(key)
        if fits(mod, spec):
            continue
        try:
            new = linear(mod.in_features, mod.out_features, mod.bias is not None, "meta", spec, dtype)
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, new)
    unknown = sorted(set(specs) - names)
    if unknown:
        raise ValueError(f"{where}: quantized tensors for {unknown}, which are not linears of this model")


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then multiply by the weight in the input dtype (as transformers)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``; ``bias``: Llama's ``mlp_bias`` on all three."""

    def __init__(self, hidden: int, inter: int, device: torch.device | str | None = None, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = linear(hidden, inter, bias, device)
        self.up_proj = linear(hidden, inter, bias, device)
        self.down_proj = linear(inter, hidden, bias, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
