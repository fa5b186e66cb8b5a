"""apply_lora(): wrap a model's linear layers, chosen by name, in LoraLinear; mark_only_lora_trainable()."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .bsm_lora import Matmul
from .config import InitLoraWeights, LoraConfig
from .errors import LoraError
from .layer import LoraLinear, is_linear_like

ALL_LINEAR = "all-linear"
QWEN2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoraLinear modules by full name (``model.layers.3.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the model itself and without anything inside a LoraLinear."""
    inside = {f"{n}." for n in lora_layers(model)}
    return [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p) for p in inside)]


def _matches(name: str, target: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex fully matching the name, or a name equal to / ending in ``.`` + a target."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target)


def _adaptable(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap (plain or quantized), or one it already wraps."""
    return is_linear_like(module) or isinstance(module, LoraLinear)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Full names of the modules ``target_modules`` selects; every listed name must select something.

    Example::

        find_targets(part, ["q_proj", "v_proj"])   # ['model.layers.0.self_attn.q_proj', ...]
    """
    modules = _candidates(model)
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m)})
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        found = [n for n, m in modules if _adaptable(m) and n.rsplit(".", 1)[-1] != "lm_head"]
        if not found:
            raise LoraError(
                "target_modules='all-linear' found no linear layer (nn.Linear or quantized) in the model "
                "(lm_head is never targeted)"
            )
        return found
    if isinstance(target_modules, str):
        found = [n for n, _ in modules if _matches(n, target_modules)]
        if not found:
            raise LoraError(
                f"target_modules regex {target_modules!r} matches no module name (it must match a full name such as "
                f"'model.layers.0.self_attn.q_proj'); the model's linear layers are named {linear_leaves}"
            )
        return found
    found = []
    for t in target_modules:
        hits = [n for n, _ in modules if _matches(n, [t])]
        if not hits:
            raise LoraError(
                f"target module {t!r} does not exist in the model; its linear layers are named {linear_leaves}"
            )
        found += [n for n in hits if n not in found]
    return found


def _check_called(model: nn.Module, name: str) -> None:
    """Refuse a head the model never calls: a llm_lazy_qwen part reads ``lm_head``'s weight chunk by chunk."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf == "lm_head" and callable(getattr(parent, "head_chunks", None)):
        raise LoraError(
            f"target {name}: LoRA on the head is not supported on a {type(parent).__name__}: it computes the logits "
            "chunk by chunk from lm_head's weight and never calls the module, so an adapter there would be bypassed; "
            "leave lm_head out of target_modules ('all-linear' already does)"
        )


def apply_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = QWEN2_TARGETS,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: InitLoraWeights = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    matmul: Matmul = "torch",
) -> list[str]:
    """Replace the selected linear modules of ``model`` by :class:`LoraLinear` (in place).

    Works on any nn.Module: a llm_lazy_qwen part (lazy ones too: the frozen weight keeps arriving in
    ``base_layer`` per forward while A and B stay in RAM; quantized ones too: QLoRA over int8/int4
    ``QuantLinear`` bases) or a transformers model. The wrapped layers' own weights are frozen; call
    :func:`mark_only_lora_trainable` to freeze everything else. Each new LoraLinear takes the
    train/eval mode of the module it wraps (no LoRA dropout in an eval model).
    Returns the full names of the wrapped modules.

    Args:
        target_modules: module names as PEFT (``["q_proj", "v_proj"]``; a regex string over full
            names; ``"all-linear"``). Default: all 7 Qwen2 projections.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights: as PEFT's LoraConfig.
        dtype, device: of the adapter weights (fp32; the base weight's device, CPU if it is meta).
        matmul: "torch" (default) or "bsm" (base and LoRA-A products as one llm_bsm_kernel bundle,
            CPU only, ``pip install llm_lora_mmap[bsm]``).

    Example::

        part = load_part("qwen-sep", "f", lazy=True)
        apply_lora(part, ["q_proj", "v_proj"], r=16, lora_alpha=32)
        opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
    """
    cfg = LoraConfig(
        list(target_modules) if not isinstance(target_modules, str) else target_modules,
        r,
        lora_alpha,
        lora_dropout,
        use_rslora,
        init_lora_weights,
    )
    names = find_targets(model, cfg.target_modules)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            raise LoraError(f"{name} already has a LoRA adapter; apply_lora once per model (or load_adapter into it)")
        if not is_linear_like(module):
            raise LoraError(
                f"target {name} is a {type(module).__name__}; LoRA is supported on nn.Linear only, and on frozen "
                "linears that declare is_frozen_linear = True (a quantized QuantLinear)"
            )
        _check_called(model, name)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = model.get_submodule(name)
        wrapped = LoraLinear(
            module,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            dtype=dtype,
            device=device,
            matmul=matmul,
        ).train(module.training)  # an eval model stays in eval: no dropout in the LoRA branch
        setattr(parent, leaf, wrapped)  # works for ModuleDict/ModuleList parents too (keys are strings)
    return names


def is_lora_parameter(name: str) -> bool:
    """True for ``...q_proj.lora_A.weight`` and the like (any path component starting with ``lora_``)."""
    return any(p.startswith("lora_") for p in name.split("."))


def mark_only_lora_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter except the LoRA ones; return the LoRA parameters (for the optimizer).

    Frozen parameters keep ``requires_grad=False``, so backward allocates no gradient for them.

    Example::

        opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
    """
    trainable = []
    for name, p in model.named_parameters():
        lora = is_lora_parameter(name)
        p.requires_grad_(lora)
        if lora:
            trainable.append(p)
    if not trainable:
        raise LoraError("the model has no LoRA parameters; call apply_lora(model, ...) or load_adapter first")
    return trainable
