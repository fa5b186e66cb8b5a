"""LoraLinear: a frozen linear layer plus a trainable low-rank update; equals PEFT's ``lora.Linear``.

    y = F.linear(x, W, b) + (dropout(x) @ A^T @ B^T) * scaling

``W + B@A`` is never formed: the frozen weight stays whatever tensor the base layer holds (a
zero-copy, memory-mapped view of a safetensors file), so the only new memory is A, B and the
activations. A frozen weight stored in another dtype than the activations (bf16 on disk, fp32
compute) is cast for one matmul at a time and autograd keeps only the stored tensor, never the
cast copy, so a training step does not hold an upcast copy of every layer until backward.

The base may also be any frozen *linear-like* module (:func:`is_linear_like`), e.g. llm_lazy_qwen's
``QuantLinear`` over int8/int4 weights (QLoRA): LoraLinear then calls ``base_layer(x)``, which
computes the frozen product and its backward w.r.t. ``x`` itself, and adds the LoRA branch. Only a
plain ``nn.Linear`` takes the cast and bsm fast paths above.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bsm_lora import Matmul, base_and_lora_a, check_matmul, worth_it
from .config import InitLoraWeights, check_hyperparameters, scaling


class _CastLinear(torch.autograd.Function):
    """``F.linear(x, W.to(x.dtype), b)`` for a frozen W; saves the stored W, re-casts it in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored (e.g. mmapped bf16) tensor: no copy is kept alive
        b = bias.to(x.dtype) if bias is not None else None
        return F.linear(x, weight.to(x.dtype), b)  # the cast copy dies with this frame

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ weight.to(grad.dtype), None, None  # (..., out) @ (out, in) -> (..., in)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed in ``x.dtype`` whatever the dtype of a frozen ``weight``.

    Same dtype: plain ``F.linear`` (autograd saves the weight itself, no copy). Different dtype and
    frozen: the weight is cast for this call only and backward casts it again.

    Example::

        w = torch.randn(8, 4).bfloat16()              # e.g. a mmapped bf16 weight
        y = frozen_linear(torch.randn(2, 4), w)        # (2, 8) fp32
    """
    same = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if same:
        return F.linear(x, weight, bias)
    if trainable:  # not our case (LoraLinear freezes its base), but stay correct: autograd handles the casts
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    out: torch.Tensor = _CastLinear.apply(x, weight, bias)  # type: ignore[no-untyped-call]
    return out


def is_linear_like(module: object) -> bool:
    """Whether LoRA can wrap ``module``: an ``nn.Linear``, or a frozen linear that declares itself.

    A module declares itself with the class attribute ``is_frozen_linear = True`` and int
    ``in_features`` / ``out_features``; its ``forward(x)`` maps ``(..., in_features)`` to
    ``(..., out_features)`` in ``x.dtype``, differentiable w.r.t. ``x``, and its tensors are frozen
    (llm_sepweight's QUANT_FORMAT.md; llm_lazy_qwen's ``QuantLinear`` does so). llm_lora_mmap never
    imports the class: any module keeping this contract can be adapted.

    Example::

        is_linear_like(nn.Linear(4, 8))       # True
        is_linear_like(nn.LayerNorm(4))       # False
    """
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Module)
        and getattr(type(module), "is_frozen_linear", False) is True
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose ``weight`` is the frozen product (the cast and bsm paths apply)."""
    return isinstance(module, nn.Linear) and getattr(type(module), "is_frozen_linear", False) is not True


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors live (its first parameter or buffer); CPU for a module without any."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """An ``nn.Linear`` (or a frozen linear-like module) wrapped with a LoRA adapter, laid out as PEFT (``base_layer``, ``lora_A``, ``lora_B``).

    Parameter names are ``base_layer.weight`` (frozen; a quantized base has its own, e.g.
    ``base_layer.qweight`` / ``base_layer.scales``), ``lora_A.weight`` (r, in) and
    ``lora_B.weight`` (out, r), so a model's LoRA state dict has PEFT's keys and loaders that assign
    frozen weights into ``base_layer`` (llm_lazy_qwen's lazy mode) keep working.

    Args:
        base_layer: the linear layer to adapt: an ``nn.Linear`` or any :func:`is_linear_like`
            module (a quantized ``QuantLinear``: QLoRA); its parameters are frozen.
        r, lora_alpha, lora_dropout, use_rslora: as PEFT; scaling = lora_alpha / r
            (lora_alpha / sqrt(r) with use_rslora). Dropout applies to the LoRA branch's input only.
        init_lora_weights: True (kaiming-uniform A, zero B: the adapter starts as a no-op),
            "gaussian" (A ~ N(0, 1/r), zero B) or False (both random; for tests).
        dtype: the adapter's dtype (fp32 as PEFT; the input is cast to it for the LoRA branch).
        device: where A and B live; default the base weight's device (CPU if it is ``meta``).
        matmul: "torch" (default) or "bsm": the base product and the LoRA-A product as one
            llm_bsm_kernel bundle (CPU only; ``pip install llm_lora_mmap[bsm]``; bsm_lora.py);
            inputs of fewer than ``bsm_lora.MIN_ROWS`` rows (decode steps) and bases that are
            not a plain ``nn.Linear`` (quantized ones) take the torch path.

    Example::

        layer = LoraLinear(nn.Linear(64, 32), r=4, lora_alpha=8)
        y = layer(torch.randn(2, 5, 64))          # (2, 5, 32); == the base layer until B is trained
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        matmul: Matmul = "torch",
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            message = (
                f"LoraLinear wraps an nn.Linear, got {type(base_layer).__name__}; a quantized or other frozen linear "
                "must declare the class attribute is_frozen_linear = True and have int in_features / out_features"
            )
            raise TypeError(message)
        check_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        check_matmul(matmul)
        self.matmul = matmul
        if device is None:
            device = _device_of(base_layer)
            if device.type == "meta":  # a lazy part: the base weight arrives per forward, adapters stay in RAM
                device = torch.device("cpu")
        self.base_layer = base_layer.requires_grad_(False)
        fan_in, fan_out = int(base_layer.in_features), int(base_layer.out_features)  # type: ignore[arg-type]
        self.lora_A = nn.Linear(fan_in, r, bias=False, device=device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(r, fan_out, bias=False, device=device, dtype=dtype)  # (out, r)
        self.lora_dropout: nn.Module = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = scaling(r, lora_alpha, use_rslora)
        self.reset_lora_parameters(init_lora_weights)

    @property
    def plain(self) -> bool:
        """Whether the base is a plain ``nn.Linear`` (the cast and bsm fast paths apply); False: the base
        computes itself (quantized, or streamed in slabs). Asked of the current base: a loader may swap
        it after wrapping (llm_lazy_qwen's ``load_weights`` on a quantized or budgeted folder)."""
        return _plain_linear(self.base_layer)

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)  # type: ignore[arg-type]

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)  # type: ignore[arg-type]

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_lora_parameters(self, init_lora_weights: InitLoraWeights = True) -> None:
        """Initialise A and B as PEFT's ``reset_lora_parameters``."""
        if init_lora_weights is False:
            return  # nn.Linear's own random init for both (B non-zero): only for tests and debugging
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and loralib
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            result: torch.Tensor = self.base_layer(x)  # (..., out): a quantized base computes (and backprops) itself
        elif self.matmul == "bsm" and worth_it(x, self.in_features):
            return self._forward_bsm(x)
        else:
            result = frozen_linear(x, self.base_layer.weight, self.base_layer.bias)  # (..., out) in x.dtype
        h: torch.Tensor = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r): x in adapter dtype
        # the same operations in the same order as PEFT, so bf16 results round the same way
        lora: torch.Tensor = self.lora_B(h) * self.scaling  # (..., out)
        return (result + lora).to(x.dtype)

    def _forward_bsm(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum with ``x W^T`` and ``dropout(x) A^T`` computed as one bundle."""
        a, bias = self.lora_A.weight, self.base_layer.bias
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        base, h = base_and_lora_a(x2, self.lora_dropout(x2.to(a.dtype)), self.base_layer.weight, a)  # (N, out), (N, r)
        result = base if bias is None else base + bias.to(x.dtype)
        lora: torch.Tensor = self.lora_B(h) * self.scaling  # (N, out)
        return (result + lora).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout_p}"
