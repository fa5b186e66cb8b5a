"""LoraLinear(matmul="bsm"): base + LoRA-A as one llm_bsm_kernel bundle equals PEFT and the torch path."""

import sys

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
from torch import nn

import llm_lora_mmap.layer as layer_module
from llm_lazy_qwen import load_part
from llm_lora_mmap import (
    LoraError,
    LoraLinear,
    apply_lora,
    bsm_lora,
    mark_only_lora_trainable,
)


@pytest.fixture(autouse=True)
def every_call_bundles(monkeypatch):
    """Tiny test inputs are below the decode threshold: send every call through the bundle."""
    monkeypatch.setattr(bsm_lora, "MIN_ROWS", 1)


def _pair(stored=torch.float32, bias=True, **kw):
    """The same random layer on the torch path and on the bsm path."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias).to(stored)
    torch.manual_seed(1)
    ref = LoraLinear(base, r=4, lora_alpha=12, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    got = LoraLinear(
        nn.Linear(48, 40, bias=bias).to(stored),
        r=4,
        lora_alpha=12,
        init_lora_weights=False,
        matmul="bsm",
        **kw,
    )
    got.load_state_dict(ref.state_dict())
    return ref, got


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.float() ** 2).sum().backward()
    return out, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize(
    ("stored", "act", "bias"),
    [
        (torch.float32, torch.float32, True),
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.float32, True),
    ],
    ids=["fp32", "fp32-nobias", "bf16-stored-fp32-compute"],
)
def test_output_and_grads_equal_torch_path(stored, act, bias):
    pytest.importorskip("llm_bsm_kernel")
    ref, got = _pair(stored, bias)
    x = torch.randn(2, 7, 48).to(act)
    for want, have in zip(_grads(ref, x), _grads(got, x)):
        torch.testing.assert_close(have, want, **FP32)


def test_bf16_layer_rounds_like_the_torch_path():
    pytest.importorskip("llm_bsm_kernel")
    ref, got = _pair(torch.bfloat16)
    x = torch.randn(3, 48).bfloat16()
    out = got(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x), atol=2e-2, rtol=2e-2)


def test_dropout_draws_the_same_mask_as_the_torch_path():
    pytest.importorskip("llm_bsm_kernel")
    ref, got = _pair(lora_dropout=0.3)
    x = torch.randn(5, 48)
    torch.manual_seed(7)
    want = ref(x)
    torch.manual_seed(7)
    torch.testing.assert_close(got(x), want, **FP32)


def test_mixed_dtype_keeps_only_the_stored_weight_for_backward():
    """bf16 weight, fp32 activations: the bundle saves the bf16 tensor itself, never an fp32 copy."""
    pytest.importorskip("llm_bsm_kernel")
    _, layer = _pair(torch.bfloat16)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    weight_sized = [t for t in saved if t.numel() == layer.base_layer.weight.numel()]
    assert weight_sized and all(t.data_ptr() == layer.base_layer.weight.data_ptr() for t in weight_sized)


CASES = [
    ("qwen2", ALL7, 4, 8, False),
    ("qwen3", ["q_proj", "v_proj", "down_proj"], 8, 16, True),
]


@pytest.mark.parametrize(("name", "targets", "r", "alpha", "rslora"), CASES)
def test_logits_and_lora_grads_equal_peft(sep, name, targets, r, alpha, rslora):
    pytest.importorskip("llm_bsm_kernel")
    path, ckpt = sep(name)
    ours = load_part(path, "f")
    apply_lora(ours, targets, r=r, lora_alpha=alpha, use_rslora=rslora, matmul="bsm")
    mark_only_lora_trainable(ours)
    randomize_adapters(ours, seed=1)
    twin = peft_twin(ckpt.model, ours, targets, r, alpha, use_rslora=rslora)
    tokens = ids(seed=2)
    logits, want = ours(tokens), twin(tokens).logits
    torch.testing.assert_close(logits, want, **FP32)
    lm_loss(logits, tokens).backward()
    lm_loss(want, tokens).backward()
    got, ref = lora_grads(ours), lora_grads(twin)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key] is not None and float(got[key].abs().max()) > 0, key
        torch.testing.assert_close(got[key], ref[key], **FP32, msg=key)


def test_with_the_bsm_part_path_too(sep):
    """LoRA layers on the bsm path inside a part on the bsm path: PEFT's logits."""
    pytest.importorskip("llm_bsm_kernel")
    path, ckpt = sep("qwen2")
    ours = load_part(path, "f", matmul="bsm")
    apply_lora(ours, ALL7, r=4, lora_alpha=8, matmul="bsm")
    randomize_adapters(ours, seed=3)
    twin = peft_twin(ckpt.model, ours, ALL7, 4, 8)
    tokens = ids(seed=4)
    torch.testing.assert_close(ours(tokens), twin(tokens).logits, **FP32)


def test_small_inputs_take_the_torch_path(monkeypatch):
    """Below MIN_ROWS rows (decode steps) the layer computes as matmul='torch' does."""
    pytest.importorskip("llm_bsm_kernel")
    monkeypatch.setattr(bsm_lora, "MIN_ROWS", 8)
    calls = []
    real = layer_module.base_and_lora_a
    monkeypatch.setattr(layer_module, "base_and_lora_a", lambda *a: calls.append(1) or real(*a))
    ref, got = _pair()
    for rows, bundled in [(7, 0), (8, 1)]:
        x = torch.randn(rows, 48)
        torch.testing.assert_close(got(x), ref(x), **FP32)
        assert len(calls) == bundled


def test_unknown_matmul_is_refused():
    with pytest.raises(LoraError, match=r"matmul must be one of \('torch', 'bsm'\), got 'cuda'"):
        LoraLinear(nn.Linear(4, 4), matmul="cuda")


def test_non_cpu_input_is_refused():
    pytest.importorskip("llm_bsm_kernel")
    # a lazy part's placeholder weight: not on the CPU
    layer = LoraLinear(nn.Linear(4, 4, device="meta"), r=2, matmul="bsm")
    with pytest.raises(LoraError, match=r"computes on CPU only.*meta.*set matmul='torch'"):
        layer(torch.randn(2, 4, device="meta"))


def test_missing_kernel_says_how_to_install(monkeypatch):
    # a None entry in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "llm_bsm_kernel", None)
    bsm_lora.require_bsm.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install llm_lora_mmap\[bsm\]"):
            apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], matmul="bsm")
    finally:
        bsm_lora.require_bsm.cache_clear()
