"""SlabLinear: a frozen linear computed slab by slab, each slab of rows fetched just in time; equals F.linear.

Under a memory budget a layer's linears are swapped for this module (:func:`use_slabs`, on the meta
skeleton as ``match_linears`` does). Its weight is never held whole: ``forward`` asks the part's
streamer for slab j (output rows ``[a_j, b_j)`` of the stored weight, or of a quantized weight's
integers and scales), computes ``out[..., a_j:b_j]`` with it and hands it back before the next one,
so one streaming buffer is in use at a time (``budget.py`` counts ``prefetch + 1``). Resident slabs
come back as the same tensors every call. The bias (with the layer's norms, one small resident item)
is a parameter of the module, put in place by ``QwenPart.materialized``. With autograd the graph keeps
nothing of the weight: backward fetches the slabs again (``grad_x = sum_j grad[..., a_j:b_j] @ W_j``),
so a layer-wise backward stays within the same buffers too, for one more read of the streamed slabs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import QuantSpec

from .budget import Item
from .quant import QuantLinear, grad_input, quant_linear


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
        bias_grad = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or bias_grad):
            out: torch.Tensor = _SlabLinearFn.apply(x, self.bias, self)  # type: ignore[no-untyped-call]
            return out
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """The output, slab by slab; each slab handed back (its buffer reused) before the next is fetched."""
        assert self.streamer is not None
        one = len(self.rows) == 1  # (q/k/v/o of a 7B): the slab's product is the output, no copy
        out = None if one else x.new_empty(*x.shape[:-1], self.out_features)  # (..., out)
        for item, (a, b), spec in zip(self.items, self.rows, self.specs):
            weights = self.streamer.get(item)
            try:
                y = self._slab(x, weights, spec, a, b)  # (..., b - a)
            finally:
                self.streamer.retire(weights)
                del weights
            if out is None:
                return y
            out[..., a:b] = y
        assert out is not None
        return out

    def _grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad @ W``: (..., out) -> (..., in), the slabs fetched again one at a time (none is kept
        by the graph, so a layer-wise backward stays within the buffers the plan counts)."""
        assert self.streamer is not None
        gx: torch.Tensor | None = None
        for item, (a, b), spec in zip(self.items, self.rows, self.specs):
            weights = self.streamer.get(item)
            try:
                g = grad[..., a:b]  # (..., b - a)
                if spec is None:
                    part = g @ weights[self.keys["weight"]].to(g.dtype)  # (..., in)
                else:
                    part = grad_input(g, weights[self.keys["qweight"]], weights[self.keys["scales"]], spec)
            finally:
                self.streamer.retire(weights)
                del weights
            gx = part if gx is None else gx.add_(part)
        assert gx is not None
        return gx

    def extra_repr(self) -> str:
        kind = "float" if self.spec is None else self.spec.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, {len(self.rows)} slabs"
        )


class _SlabLinearFn(torch.autograd.Function):
    """Autograd through a SlabLinear: nothing of the weight is saved; backward fetches the slabs again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, lin: SlabLinear) -> torch.Tensor:
        ctx.lin = lin
        return lin._product(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lin: SlabLinear = ctx.lin
        gx = lin._grad_input(grad) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, lin.out_features).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gb, None


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
