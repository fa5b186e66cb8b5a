"""Mistral (every layer slides over a window through the ring cache) equals transformers' MistralForCausalLM."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import build_family, greedy, hf_greedy
from lazy_helpers import FP32

from llm_lazy_qwen import QwenConfig, load_part


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return build_family("mistral", tmp_path_factory.mktemp("mistral"))


def ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_logits_equal_transformers(mistral, lazy):
    tokens = ids(2, 23, 0)  # far longer than the window (4)
    part = load_part(mistral.sep, lazy=lazy)
    with torch.no_grad():
        torch.testing.assert_close(part(tokens), mistral.oracle()(tokens).logits, **FP32)
    part.close()


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_greedy_64_tokens_equal_generate(mistral, lazy):
    prompt = ids(2, 9, 1)
    part = load_part(mistral.sep, lazy=lazy)
    with torch.no_grad():
        want = hf_greedy(mistral.oracle(), prompt, 64)
        got = greedy(part, prompt, 64, chunk=3)  # chunked prefill through the ring, then decode
    part.close()
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_chunked_prefill_through_the_ring(mistral, chunk):
    """Chunks smaller, equal and larger than W = 4 give the full forward's logits; every layer is a ring."""
    tokens = ids(2, 17, 2)
    part = load_part(mistral.sep)
    cache = part.new_cache()
    with torch.no_grad():
        want = mistral.oracle()(tokens).logits
        got = torch.cat([part(tokens[:, s : s + chunk], cache=cache) for s in range(0, 17, chunk)], dim=1)
    torch.testing.assert_close(got, want, **FP32)
    assert all(layer.slots == 4 for layer in cache.layers.values())


def _mistral(**extra) -> dict:
    return dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        vocab_size=10,
        **extra,
    )


def test_window_normalised_as_mistral_config():
    """No use_sliding_window key: a window means every layer slides; absent means 4096; null means none."""
    cfg = QwenConfig.from_dict(_mistral(sliding_window=8, layer_types=["full_attention"] * 3, max_window_layers=2))
    assert [cfg.window(i) for i in range(3)] == [8, 8, 8]
    assert QwenConfig.from_dict(_mistral()).window(0) == 4096
    assert QwenConfig.from_dict(_mistral(sliding_window=None)).window(2) is None
    cfg = QwenConfig.from_dict(_mistral(attention_bias=True, mlp_bias=True))  # keys MistralConfig ignores
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.max_position_embeddings) == (False, False, False, 131072)
