"""The oracle side of the tests: PEFT on the transformers model, with the same adapter weights as ours."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from llm_lora_mmap import lora_layers

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = {"atol": 1e-5, "rtol": 1e-4}


def ids(batch: int = 2, seq: int = 13, seed: int = 0, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Random A and non-zero B (a fresh adapter's B is zero, which would hide errors in the B path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora_layers(model).items()):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def peft_name(name: str) -> str:
    """PEFT's runtime parameter name -> ours (``base_model.model.X.lora_A.default.weight`` -> ``X.lora_A.weight``)."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def peft_twin(
    hf_model: nn.Module, ours: nn.Module, targets=ALL7, r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False
):
    """PEFT on a copy of the transformers model (the session's oracle stays untouched), our adapter weights copied in."""
    cfg = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, target_modules=list(targets)
    )
    twin = get_peft_model(copy.deepcopy(hf_model), cfg)
    mine = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    copied = set()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if peft_name(name) in mine:  # a part of the model: PEFT's other layers keep B = 0 (a no-op)
                p.copy_(mine[peft_name(name)])
                copied.add(peft_name(name))
    assert copied == set(mine), sorted(set(mine) - copied)
    return twin


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {peft_name(n): p.grad for n, p in model.named_parameters() if "lora_" in n}


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
