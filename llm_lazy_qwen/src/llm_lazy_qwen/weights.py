"""Putting stored tensors into modules (and taking them out again) without copying."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module holding `key` ("self_attn.q_proj.weight"); steps into a PEFT-style `base_layer`."""
    *path, attr = key.split(".")
    mod = module
    for name in path:
        mod = getattr(mod, name)
        base = getattr(mod, "base_layer", None)
        if isinstance(base, nn.Module):
            mod = base  # a LoRA wrapper: the frozen weight lives in its base layer
    return mod, attr


def tensor_keys(module: nn.Module) -> list[str]:
    """Keys of the frozen weights of a module in storage naming (LoRA parameters excluded)."""
    keys = []
    for name, _ in module.named_parameters():
        parts = [p for p in name.split(".") if p != "base_layer"]
        if any(p.startswith("lora_") for p in parts):
            continue
        keys.append(".".join(parts))
    return keys


def _set(mod: nn.Module, attr: str, value: nn.Parameter) -> None:
    """``setattr`` for a registered parameter without nn.Module.__setattr__'s checks (hot in lazy mode)."""
    if attr in mod._parameters:
        mod._parameters[attr] = value
    else:
        setattr(mod, attr, value)


def assign(
    module: nn.Module, tensors: dict[str, torch.Tensor], where: str, expected: Collection[str] | None = None
) -> None:
    """Make `tensors` the module's frozen parameters (zero-copy); names and shapes must match exactly.

    A tensor that is already an ``nn.Parameter`` is set as that same object (callers reuse them).

    `expected`: the module's frozen keys when the caller knows them (skips walking the module).
    """
    keys = set(tensor_keys(module)) if expected is None else expected
    if tensors.keys() != keys:
        missing, extra = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
        raise ValueError(f"{where}: stored tensors do not match the model (missing {missing}, unexpected {extra})")
    for key, t in tensors.items():
        mod, attr = _owner(module, key)
        old = mod._parameters.get(attr)
        if old is None:
            old = getattr(mod, attr)
        if old.shape != t.shape:
            raise ValueError(f"{where}: {key} has shape {list(t.shape)}, the config implies {list(old.shape)}")
        _set(mod, attr, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False))


def release(module: nn.Module, placeholders: dict[str, nn.Parameter]) -> None:
    """Swap weights back to meta placeholders so the stored tensors (and their mappings) can go."""
    for key, t in placeholders.items():
        mod, attr = _owner(module, key)
        _set(mod, attr, t)


def meta_placeholders(module: nn.Module) -> dict[str, nn.Parameter]:
    out = {}
    for key in tensor_keys(module):
        mod, attr = _owner(module, key)
        shape, dtype = getattr(mod, attr).shape, getattr(mod, attr).dtype
        out[key] = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype), requires_grad=False)
    return out
