"""A quantized folder computed with llm_bsm_kernel's decode GEMV (the optional [bsm] extra) equals transformers'
model with the folder's dequantized weights: logits and greedy tokens; and the rule that picks the GEMV."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lazy_helpers import FP32, token_ids
from test_quant_model import _oracle, quantized  # noqa: F401 - the module-scoped fixture, shared

from llm_lazy_qwen import load_part
from llm_lazy_qwen import quant as quant_mod

needs_bsm = pytest.mark.skipif(quant_mod.bsm_max_rows(torch.float32) == 0, reason="llm_bsm_kernel GEMV not available")


@pytest.fixture
def bsm_calls(monkeypatch) -> list[tuple[str, int]]:
    """(scheme, rows) of every product llm_bsm_kernel's GEMV computes; torch's int kernels are refused."""
    calls: list[tuple[str, int]] = []
    inner = quant_mod._bsm_matmul

    def counted(x2, qweight, scales, spec):
        calls.append((spec.scheme, x2.shape[0]))
        return inner(x2, qweight, scales, spec)

    def torch_kernel(*args):
        raise AssertionError("torch's int kernel was called where llm_bsm_kernel's should have been")

    monkeypatch.setattr(quant_mod, "_bsm_matmul", counted)
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", torch_kernel, raising=False)
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", torch_kernel, raising=False)
    return calls


@needs_bsm
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_model_through_the_bsm_gemv_equals_transformers(quantized, scheme, lazy, bsm_calls):  # noqa: F811
    folder, ckpt = quantized("qwen2", scheme)
    ids = token_ids(batch=1, seq=9, seed=7)  # 9 rows: every product (head included) fits the GEMV
    steps = 8
    with torch.no_grad():
        hf = _oracle(folder, ckpt)
        want_logits = hf(ids).logits
        want = hf.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
        part = load_part(folder, lazy=lazy)
        try:
            torch.testing.assert_close(part(ids), want_logits, **FP32)
            assert bsm_calls and {s for s, _ in bsm_calls} == {scheme}
            cache = part.new_cache()
            out = ids
            nxt = part(ids, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps - 1):
                out = torch.cat([out, nxt], 1)
                nxt = part(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
        finally:
            part.close()
    assert torch.equal(out, want)
    assert (scheme, 1) in bsm_calls  # decode steps went through it


@needs_bsm
def test_the_rule_takes_the_gemv_up_to_bsm_max_rows(quantized, bsm_calls):  # noqa: F811
    most = quant_mod.bsm_max_rows(torch.float32)
    assert most == quant_mod._BSM_MAX_ROWS
    assert quant_mod.bsm_max_rows(torch.float16) == 0
    assert quant_mod.bsm_max_rows(torch.bfloat16) == (0 if quant_mod.native_bf16() else most)
    folder, _ = quantized("qwen2", "int4")
    part = load_part(folder)
    try:
        lin = part.get_submodule("model.layers.0.self_attn.q_proj")
        w = lin.dequantize(torch.float32)
        for rows in (1, most, most + 1):
            x = torch.randn(rows, lin.in_features)
            with torch.no_grad():
                torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), **FP32)
        assert bsm_calls == [("int4", 1), ("int4", most)]  # most + 1 rows: dequantize + GEMM
    finally:
        part.close()


def test_without_llm_bsm_kernel_nothing_takes_the_gemv(monkeypatch):
    monkeypatch.setattr(quant_mod, "_bsm", lambda: None)
    assert quant_mod.bsm_max_rows(torch.float32) == 0 and quant_mod.bsm_max_rows(torch.bfloat16) == 0
    assert not quant_mod._use_bsm(torch.ones(1, 8), torch.ones(8, 8, dtype=torch.int8))
