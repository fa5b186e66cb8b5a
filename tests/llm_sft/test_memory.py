"""training_reserve: what LoRA training adds on top of the forward a memory budget plans for."""

import platform
import sys

import pytest
import torch

from llm_lazy_qwen import QwenConfig
from llm_sft import training_reserve

CONFIG = QwenConfig.from_dict(
    dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
)


def test_reserve_is_the_documented_sum():
    H, inter, L, V, nh, nkv, d = 64, 96, 3, 384, 4, 2, 16
    B, T, r = 2, 10, 4
    lora = L * r * ((H + nh * d) + 2 * (H + nkv * d) + (nh * d + H) + 3 * (H + inter)) * 4 * 4
    inputs = L * B * T * H * 4
    layer = 4 * B * T * (10 * H + 4 * inter + 3 * (nh + 2 * nkv) * d) * 2
    attention = 4 * B * nh * T * T * 2
    loss = 4 * B * T * V * 3
    head = 4 * B * T * (V + V)  # the logits the fitted plan counted (vocab 384 < the head chunk)
    total = lora + inputs + layer + attention + loss + head
    assert training_reserve(CONFIG, batch=B, seq=T, r=r) == total + total // 8


def test_reserve_grows_with_what_training_holds():
    base = training_reserve(CONFIG, batch=1, seq=32)
    assert training_reserve(CONFIG, batch=2, seq=32) > base
    assert training_reserve(CONFIG, batch=1, seq=64) > base
    assert training_reserve(CONFIG, batch=1, seq=32, r=16) > base
    assert training_reserve(CONFIG, batch=1, seq=32, targets=["q_proj", "v_proj"]) < base
    assert training_reserve(CONFIG, batch=1, seq=32, dtype=torch.bfloat16) < base


def test_reserve_refuses_nonsense():
    with pytest.raises(ValueError, match="batch, seq and r must be >= 1"):
        training_reserve(CONFIG, batch=0, seq=32)


def test_a_budgeted_part_bounds_glibcs_heap_and_a_part_in_ram_does_not(sep, monkeypatch):
    """Training under a memory_budget fixes glibc's mmap threshold (freed temporaries go back to the
    system; the 7B int8 step peaked 2.5 GiB higher without it); a part in RAM leaves malloc alone."""
    import llm_sft.engine as engine_module
    from llm_lazy_qwen import load_part
    from llm_sft import LayerwiseEngine, bound_heap

    calls = []
    monkeypatch.setattr(engine_module, "bound_heap", lambda: calls.append(1) or True)
    path, _ = sep("qwen2")
    LayerwiseEngine(load_part(path, "f"))
    assert calls == []
    LayerwiseEngine(load_part(path, "f", memory_budget="64MB", max_context=16))
    assert calls == [1]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert bound_heap() is True  # the real call succeeds where there is glibc
