"""Llama (the Qwen2 block without q/k/v bias) equals transformers' LlamaForCausalLM (fp32, 1e-4), in RAM and lazy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lazy_helpers import FP32, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import ConfigError, QwenConfig, load_part


def _llama(path: Path, tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7 + tied)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # explicit, != hidden / heads
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = _llama(root / "hf", request.param)
    sw.convert(root / "hf", root / "sep", progress=False)
    return root / "sep", model


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_llama_logits(llama, lazy):
    path, model = llama
    ids = token_ids()
    with torch.no_grad():
        want = model(ids).logits
        part = load_part(path, "f", lazy=lazy)
        got = part(ids)
        part.close()
    torch.testing.assert_close(got, want, **FP32)


def test_llama_config_flags(llama):
    path, _ = llama
    cfg = QwenConfig.from_json(path / "config.json")
    assert (cfg.model_type, cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == ("llama", 24, False, False, False)


def _base() -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=10,
    )


def test_llama_bias_flags():
    # attention_bias=true is Llama's bias on all four projections, mlp_bias on gate/up/down, as in transformers;
    # their numerics, the RoPE types and the errors: test_llama_family.py, test_rope_config.py
    cfg = QwenConfig.from_dict({**_base(), "attention_bias": True, "mlp_bias": True})
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
    with pytest.raises(ConfigError, match="rope_parameters: rope type 'longrope' is not supported"):
        QwenConfig.from_dict({**_base(), "rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}})
