"""Llama-family parts (bias flags, RoPE llama3 / linear / dynamic / yarn, v4 and v5 configs, Qwen with scaling)
equal transformers: logits (fp32, 1e-4) in RAM and lazy, and 64 greedy KV-cached tokens."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import FAMILIES, build_family, greedy, hf_greedy
from lazy_helpers import FP32

from llm_lazy_qwen import QwenConfig, load_part

NAMES = [n for n in FAMILIES if FAMILIES[n].arch != "mistral"]  # Mistral: test_mistral.py


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_family(name, root)
        return cache[name]

    return get


def ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(fam, name, lazy):
    """40 positions: past the dynamic variants' max_position_embeddings (32, 40 -> 41 > 40 for qwen3)."""
    ckpt = fam(name)
    tokens = ids(41)
    part = load_part(ckpt.sep, lazy=lazy)
    with torch.no_grad():
        torch.testing.assert_close(part(tokens), ckpt.oracle()(tokens).logits, **FP32)
    part.close()


@pytest.mark.parametrize("name", NAMES)
def test_greedy_64_tokens_equal_generate(fam, name):
    ckpt = fam(name)
    prompt = ids(9, seed=1)
    with torch.no_grad():
        want = hf_greedy(ckpt.oracle(), prompt, 64)
        got = greedy(load_part(ckpt.sep), prompt, 64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["dynamic", "yarn"])
def test_lazy_greedy_equals_generate(fam, name):
    ckpt = fam(name)
    prompt = ids(9, seed=2)
    part = load_part(ckpt.sep, lazy=True)
    with torch.no_grad():
        want = hf_greedy(ckpt.oracle(), prompt, 64)
        got = greedy(part, prompt, 64, chunk=4)
    part.close()
    assert torch.equal(got, want)


def test_split_parts_chain_to_the_whole_model(fam):
    """Each part computes its own RoPE tables (and dynamic state) from the same positions."""
    ckpt = fam("dynamic")
    tokens = ids(37, seed=3)
    first, last = load_part(ckpt.sep, "b 0-2"), load_part(ckpt.sep, "2-3 e", lazy=True)
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), ckpt.oracle()(tokens).logits, **FP32)
    last.close()


def test_dynamic_state_follows_transformers(fam):
    """Grow past max_position_embeddings, keep the grown frequencies, reset on a short sequence: as transformers."""
    ckpt = fam("dynamic")
    hf, part = ckpt.oracle(), load_part(ckpt.sep)
    with torch.no_grad():
        for seq in (50, 40, 12, 20, 60):  # grow, keep (40 < 50), reset (12 < 32), default, grow
            tokens = ids(seq, seed=seq)
            torch.testing.assert_close(part(tokens), hf(tokens).logits, **FP32, msg=f"seq {seq}")
            torch.testing.assert_close(part.rotary.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=0)


def test_flags_from_each_family(fam):
    cfg = QwenConfig.from_json(fam("llama_bias").sep / "config.json")
    assert (cfg.model_type, cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == (
        "llama",
        24,
        True,
        True,
        True,
        False,
    )
    cfg = QwenConfig.from_json(fam("qwen2_yarn_v4").sep / "config.json")
    assert (cfg.qkv_bias, cfg.o_bias, cfg.rope_type, cfg.rope_theta, cfg.max_positions) == (
        True,
        False,
        "yarn",
        1e6,
        256,
    )
    assert QwenConfig.from_json(fam("dynamic").sep / "config.json").max_positions is None
