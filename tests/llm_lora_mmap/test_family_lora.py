"""LoRA on Llama-family and Mistral parts: logits and adapter gradients equal PEFT on the transformers model."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import build_family
from lora_helpers import ALL7, FP32, ids, lm_loss, lora_grads, peft_twin, randomize_adapters

from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in cache:
            cache[name] = build_family(name, root)
        return cache[name]

    return get


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["llama_bias", "yarn", "llama3", "mistral"])
def test_lora_grads_equal_peft(fam, name, lazy):
    ckpt = fam(name)
    ours = load_part(ckpt.sep, lazy=lazy)
    apply_lora(ours, ALL7, r=4, lora_alpha=8)
    mark_only_lora_trainable(ours)
    randomize_adapters(ours, seed=1)
    twin = peft_twin(ckpt.oracle(), ours, ALL7, 4, 8)
    tokens = ids(seq=21, seed=2)  # longer than Mistral's window (4)
    logits, want = ours(tokens), twin(tokens).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    lm_loss(logits, tokens).backward()
    lm_loss(want, tokens).backward()
    got, ref = lora_grads(ours), lora_grads(twin)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key] is not None and float(got[key].abs().max()) > 0, key
        torch.testing.assert_close(got[key], ref[key], **FP32, msg=key)
    ours.close()
