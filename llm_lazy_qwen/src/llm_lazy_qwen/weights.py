"""Putting stored tensors into modules (and taking them out again) without copying."""

from __future__ import annotations

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


def assign(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Make `tensors` the module's frozen parameters (zero-copy); names and shapes must match exactly."""
    expected = set(tensor_keys(module))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{where}: stored tensors do not match the model (missing {missing}, unexpected {extra})")
    for key, t in tensors.items():
        mod, attr = _owner(module, key)
        old = getattr(mod, attr)
        if tuple(old.shape) != tuple(t.shape):
            raise ValueError(f"{where}: {key} has shape {list(t.shape)}, the config implies {list(old.shape)}")
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))


def release(module: nn.Module, placeholders: dict[str, torch.Tensor]) -> None:
    """Swap weights back to meta placeholders so the stored tensors (and their mappings) can go."""
    for key, t in placeholders.items():
        mod, attr = _owner(module, key)
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))


def meta_placeholders(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key in tensor_keys(module):
        mod, attr = _owner(module, key)
        out[key] = torch.empty(getattr(mod, attr).shape, device="meta", dtype=getattr(mod, attr).dtype)
    return out
