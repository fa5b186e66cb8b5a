"""SlabLinear: a frozen linear computed slab by slab, each slab of rows fetched just in time; equals F.linear.

Under a memory budget a layer's linears are swapped for this module (:func:`use_slabs`, on the meta
skeleton as ``match_linears`` does). Its weight is never held whole: ``forward`` asks the part's
streamer for slab j (output rows ``[a_j, b_j)`` of the stored weight, or of a quantized weight's
integers and scales), computes ``out[..., a_j:b_j]`` with it and hands it back before the next one,
so one streaming buffer is in use at a time (``budget.py`` counts ``prefetch + 1``). Resident slabs
come back as the same tensors every call. The bias (with the layer's norms, one small resident item)
is a parameter of the module, put in place by ``QwenPart.materialized``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import QuantSpec

from .budget import Item
from .quant import QuantLinear, quant_linear


class Fetcher(Protocol):
    """What a SlabLinear fetches its slabs from (a ``LayerStreamer``)."""

    def get(self, item: Item) -> dict[str, torch.Tensor]: ...

    def retire(self, tensors: dict[str, torch.Tensor], reuse: bool = True) -> None: ...


class SlabLinear(nn.Module):
    """``y = x @ W.T + b`` with W = the rows of its slabs, fetched one at a time from ``streamer``.

    ``name`` is the linear's storage name in layer ``layer`` (``"mlp.up_proj"``); ``rows`` the slabs'
    output rows; ``spec`` the stored quantization (None: a plain weight). LoRA (llm_lora_mmap) may
    wrap it: it declares ``is_frozen_linear`` and computes (and backprops w.r.t. x) itself.

    Example::

        lin = SlabLinear(64, 96, False, layer=0, name="mlp.up_proj", rows=[(0, 48), (48, 96)])
        lin.streamer = part_streamer              # hands out {"mlp.up_proj.weight": W[a:b]} per slab
        y = lin(x)                                # == F.linear(x, W)
    """

    is_frozen_linear = True  # llm_lora_mmap's is_linear_like: LoraLinear calls forward(x)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        layer: int,
        name: str,
        rows: Sequence[tuple[int, int]],
        spec: QuantSpec | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__()
        bounds = [0, *(b for _, b in rows)]
        if (
            not rows
            or list(rows) != list(zip(bounds, bounds[1:]))
            or bounds[-1] != out_features
            or any(a >= b for a, b in rows)
        ):
            raise ValueError(f"{name}: slabs {list(rows)} do not cover rows 0..{out_features} in order")
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.rows = [(int(a), int(b)) for a, b in rows]
        self.items: list[Item] = [(layer, name, j) for j in range(len(self.rows))]
        self.spec = spec
        # each slab's own spec: the kernels and dequantize take (rows, K) weights
        self.specs = [None if spec is None else dataclasses.replace(spec, shape=(b - a, in_features)) for a, b in rows]
        if spec is None:
            self.keys = {"weight": f"{name}.weight"}
        else:
            self.keys = {"qweight": f"{name}.qweight", "scales": f"{name}.{spec.scales_key}"}
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.streamer: Fetcher | None = None  # set by the part once its streamer exists

    def _slab(
        self, x: torch.Tensor, weights: Mapping[str, torch.Tensor], spec: QuantSpec | None, a: int, b: int
    ) -> torch.Tensor:
        """``x @ W[a:b].T + bias[a:b]``: (..., b - a), as nn.Linear / QuantLinear round it."""
        bias = self.bias[a:b] if self.bias is not None else None
        if spec is None:
            return F.linear(x, weights[self.keys["weight"]], bias)
        return quant_linear(x, weights[self.keys["qweight"]], weights[self.keys["scales"]], bias, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.streamer is None:
            raise RuntimeError(f"{self.name}: a SlabLinear computes only inside a part loaded with a memory_budget")
        grad = torch.is_grad_enabled()  # autograd may keep views of a slab: its buffer is then not reused
        out = None if grad else x.new_empty(*x.shape[:-1], self.out_features)
        pieces = []
        for item, (a, b), spec in zip(self.items, self.rows, self.specs):
            weights = self.streamer.get(item)
            try:
                y = self._slab(x, weights, spec, a, b)  # (..., b - a)
            finally:
                self.streamer.retire(weights, reuse=not grad)
                del weights
            if out is None:
                pieces.append(y)
            else:
                out[..., a:b] = y
        return torch.cat(pieces, dim=-1) if out is None else out  # (..., out)

    def extra_repr(self) -> str:
        kind = "float" if self.spec is None else self.spec.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, {len(self.rows)} slabs"
        )


def use_slabs(
    module: nn.Module,
    layer: int,
    slabs: Mapping[str, Sequence[tuple[int, int]]],
    specs: Mapping[str, QuantSpec],
    dtype: torch.dtype,
) -> list[SlabLinear]:
    """Swap each linear of decoder layer `module` named in `slabs` (storage names, ``"mlp.up_proj"``)
    for a :class:`SlabLinear` over those rows (`specs`: the quantized ones); inside a LoRA wrapper its
    ``base_layer`` is swapped and the adapter kept. Returns the new modules (in `slabs`' order).

    Example::

        small, slabs = layer_slabs(source, 3)
        use_slabs(part.model.layers["3"], 3, slabs, source.linears(3), torch.bfloat16)
    """
    out: dict[str, SlabLinear] = {}
    for name, mod in list(module.named_modules()):
        if not isinstance(mod, (nn.Linear, QuantLinear, SlabLinear)):
            continue
        key = name.replace(".base_layer", "")
        if key not in slabs:
            continue
        bias = mod.bias is not None
        new = SlabLinear(mod.in_features, mod.out_features, bias, layer, key, slabs[key], specs.get(key), dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, new)
        out[key] = new
    missing = sorted(set(slabs) - set(out))
    assert not missing, f"layer {layer}: no linear module for {missing}"
    return [out[k] for k in slabs]
