"""Tiny random Qwen2 models built in-process (no downloads), with biases and norm weights randomised so
that bugs in them are not hidden by transformers' initialisation (bias 0, norm weight 1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

VOCAB = 100


def build_qwen2(seed: int, num_hidden_layers: int = 2, vocab_size: int = VOCAB) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3)  # wider than the default init: sharper, more varied distributions
    return model


def generation_config(**settings: object) -> GenerationConfig:
    """A config with transformers' implicit defaults (top_k=50, ...) switched off; `settings` override."""
    base: dict[str, object] = {
        "do_sample": False,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "min_p": None,
        "repetition_penalty": None,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    base.update(settings)
    return GenerationConfig(**base)


@pytest.fixture(scope="session")
def qwen2() -> Qwen2ForCausalLM:
    return build_qwen2(seed=0)


@pytest.fixture(scope="session")
def qwen2_draft() -> Qwen2ForCausalLM:
    return build_qwen2(seed=1, num_hidden_layers=1)


@pytest.fixture
def hf_generate(qwen2: Qwen2ForCausalLM) -> Callable[..., torch.Tensor]:
    """`hf_generate(ids, n, mask=None, **settings)` -> the new tokens of transformers' own generate."""

    def run(ids: torch.Tensor, max_new_tokens: int, mask: torch.Tensor | None = None, **settings: object) -> torch.Tensor:
        config = generation_config(max_new_tokens=max_new_tokens, **settings)
        mask = torch.ones_like(ids) if mask is None else mask  # else generate infers one from pad_token_id
        with torch.no_grad():
            out = qwen2.generate(ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1] :]

    return run
