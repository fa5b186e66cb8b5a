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
                # wider than the default init: sharper, more varied distributions
                param.normal_(0.0, 0.3)
    return model


def generation_config(**settings: object) -> GenerationConfig:
    """A config with transformers' implicit defaults (top_k=50, ...) switched off; `settings` override."""
    # None would be filled with transformers' global defaults (top_k=50): switch each off by its neutral value.
    base: dict[str, object] = {
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": None,
        "repetition_penalty": 1.0,
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

    def run(
        ids: torch.Tensor,
        max_new_tokens: int,
        mask: torch.Tensor | None = None,
        **settings: object,
    ) -> torch.Tensor:
        config = generation_config(max_new_tokens=max_new_tokens, **settings)
        # else generate infers one from pad_token_id
        mask = torch.ones_like(ids) if mask is None else mask
        with torch.no_grad():
            out = qwen2.generate(ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1] :]

    return run


# chi2.ppf(0.999, df) for df = 1..30 (scipy is not a test dependency).
_CHI2_999 = [
    10.828,
    13.816,
    16.266,
    18.467,
    20.515,
    22.458,
    24.322,
    26.124,
    27.877,
    29.588,
    31.264,
    32.909,
    34.528,
    36.123,
    37.697,
    39.252,
    40.790,
    42.312,
    43.820,
    45.315,
    46.797,
    48.268,
    49.728,
    51.179,
    52.620,
    54.052,
    55.476,
    56.892,
    58.301,
    59.703,
]


def _chi_square_critical(df: int) -> float:
    """The 0.999 quantile of chi-square(df): the table, or Wilson-Hilferty (within 0.5%) past df 30."""
    assert df >= 1
    if df <= len(_CHI2_999):
        return _CHI2_999[df - 1]
    z = 3.0902  # standard normal 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.fixture
def chi_square_critical() -> Callable[[int], float]:
    return _chi_square_critical
