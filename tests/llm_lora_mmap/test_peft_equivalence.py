"""Logits and LoRA gradients equal PEFT's on the transformers model with the same adapter weights."""

import copy

import pytest
import torch
from lora_helpers import (
    ALL7,
    FP32,
    ids,
    lm_loss,
    lora_grads,
    peft_twin,
    randomize_adapters,
)

from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable

CASES = [  # (variant, targets, r, lora_alpha, use_rslora): batch 2 and scaling != 1 everywhere
    ("qwen2", ALL7, 4, 8, False),
    ("qwen2", ["q_proj", "v_proj"], 8, 16, True),
    ("qwen2_tied", ["o_proj", "down_proj"], 2, 3, False),
    ("qwen3", ALL7, 4, 16, True),
]


def _check(ours, twin, tokens, tol):
    logits = ours(tokens)
    want = twin(tokens).logits
    torch.testing.assert_close(logits, want, **tol)
    lm_loss(logits, tokens).backward()
    lm_loss(want, tokens).backward()
    got, ref = lora_grads(ours), lora_grads(twin)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] is not None and float(got[name].abs().max()) > 0, name
        torch.testing.assert_close(got[name], ref[name], **tol, msg=name)


@pytest.mark.parametrize(("name", "targets", "r", "alpha", "rslora"), CASES)
def test_logits_and_lora_grads_equal_peft(sep, name, targets, r, alpha, rslora):
    path, ckpt = sep(name)
    ours = load_part(path, "f")
    apply_lora(ours, targets, r=r, lora_alpha=alpha, use_rslora=rslora)
    mark_only_lora_trainable(ours)
    randomize_adapters(ours, seed=1)
    twin = peft_twin(ckpt.model, ours, targets, r, alpha, use_rslora=rslora)
    _check(ours, twin, ids(seed=2), FP32)


def test_bf16_weights_and_activations_equal_peft_in_bf16(sep):
    """bf16 base model computing in bf16, fp32 adapters (PEFT's autocast_adapter_dtype default)."""
    path, ckpt = sep("qwen2_bf16")
    ours = load_part(path, "f")  # the stored dtype: bf16, zero-copy
    apply_lora(ours, ALL7, r=4, lora_alpha=8)
    mark_only_lora_trainable(ours)
    randomize_adapters(ours, seed=3)
    twin = peft_twin(ckpt.model, ours, ALL7, 4, 8)
    assert next(twin.parameters()).dtype == torch.bfloat16
    _check(ours, twin, ids(seed=4), {"atol": 2e-2, "rtol": 2e-2})


def test_bf16_storage_fp32_compute_equals_fp32_peft(sep):
    """A middle part over bf16 weights fed fp32 hidden states computes in fp32 (weights cast per matmul)."""
    path, ckpt = sep("qwen2_bf16")
    mid = load_part(path, "0-2")  # layers 0, 1; weights stay bf16 mmapped views
    assert mid.model.layers["0"].mlp.up_proj.weight.dtype == torch.bfloat16
    apply_lora(mid, ALL7, r=4, lora_alpha=8)
    mark_only_lora_trainable(mid)
    randomize_adapters(mid, seed=5)
    hf32 = copy.deepcopy(ckpt.model).float()  # the same weights, exactly, in fp32 ...
    rope = hf32.model.rotary_emb
    rope.inv_freq.copy_(type(rope)(hf32.config).inv_freq)  # ... and RoPE frequencies not rounded to bf16
    twin = peft_twin(hf32, mid, ALL7, 4, 8)
    tokens = ids(seed=6)
    out = twin(tokens, output_hidden_states=True)
    h0 = out.hidden_states[0].detach()
    got = mid(h0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, out.hidden_states[2], **FP32)
    upcast = load_part(path, "0-2", dtype=torch.float32)  # what it must equal: the weights upcast once, in RAM
    apply_lora(upcast, ALL7, r=4, lora_alpha=8)
    randomize_adapters(upcast, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(got, upcast(h0), atol=0, rtol=0)
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
    (got * probe).sum().backward()
    (out.hidden_states[2] * probe).sum().backward()
    ref = {k: v for k, v in lora_grads(twin).items() if k.startswith(("model.layers.0.", "model.layers.1."))}
    got_grads = lora_grads(mid)
    assert sorted(got_grads) == sorted(ref)
    for k, want in ref.items():
        torch.testing.assert_close(got_grads[k], want, **FP32, msg=k)


def test_dropout_matches_peft_with_the_same_seed(sep):
    """Dropout applies to the LoRA branch's input only, drawing masks in the same order as PEFT."""
    path, ckpt = sep("qwen2")
    ours = load_part(path, "f")
    apply_lora(ours, ALL7, r=4, lora_alpha=8, lora_dropout=0.3)
    mark_only_lora_trainable(ours)
    randomize_adapters(ours, seed=8)
    twin = peft_twin(ckpt.model, ours, ALL7, 4, 8, lora_dropout=0.3)
    ours.train()
    twin.train()
    tokens = ids(seed=9)
    torch.manual_seed(10)
    got = ours(tokens)
    torch.manual_seed(10)
    want = twin(tokens).logits
    torch.testing.assert_close(got, want, **FP32)
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(ours(tokens), got, atol=1e-3)  # the masks did something
