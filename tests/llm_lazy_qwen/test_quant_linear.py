"""QuantLinear against its pure-torch twin: ``llm_sepweight.dequantize`` + ``F.linear`` (forward) and autograd
on the dequantized weight (backward), through both compute paths (the int kernel and dequantize + GEMM)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from lazy_helpers import FP32
from torch import nn

import llm_sepweight as sw
from llm_lazy_qwen import quant
from llm_lazy_qwen.layers import linear
from llm_lazy_qwen.quant import QuantLinear, repack_int4
from llm_lazy_qwen.weights import assign, meta_placeholders, release, tensor_keys

LAYOUTS = ["rows", sw.int4_layout()]
K = 256  # every group size divides it


def make(scheme: str, n: int = 128, k: int = K, g: int | None = None, layout: str | None = None, seed: int = 0):
    """A QuantLinear with quantized random weights and a random bias; its twin's weight [N, K] and bias."""
    gen = torch.Generator().manual_seed(seed)
    w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    if scheme == "int8":
        q, s = sw.quantize_int8(w)
        spec = sw.QuantSpec("int8", (n, k))
    else:
        q, s = sw.quantize_int4(w, group_size=g, layout=layout, method="rtn")
        spec = sw.QuantSpec("int4", (n, k), g, layout)
    tensors = {"qweight": q, spec.scales_key: s}
    lin = linear(k, n, True, "meta", spec)
    assign(lin, {**tensors, "bias": bias}, "test")
    return lin, sw.dequantize(tensors, spec, torch.float32), bias


def close(y: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, **FP32)
    else:  # bf16 output: the kernels round the weight or the products to bf16; relative to the output scale
        assert y.dtype == dtype
        err = (y.float() - want).abs().max() / want.abs().max()
        assert err < 1e-2, f"bf16 relative error {err:.3g}"


def twin(lin: QuantLinear, w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F.linear on the dequantized weight; for an int8 product llm_bsm_kernel's GEMV computes (x quantized to
    int16 per block on the fly), that GEMV's own twin, ``int8_matmul_reference``, plus the bias."""
    x2 = x.reshape(-1, x.shape[-1])
    if lin.spec.scheme != "int8" or not quant._use_bsm(x2, lin.qweight):
        return F.linear(x.float(), w, bias)
    y = quant._bsm().int8_matmul_reference(x2, lin.qweight, lin.scales.float(), out_dtype=torch.float32)
    return (y + bias).view(*x.shape[:-1], -1)


CASES = [("int8", None, None)] + [("int4", g, layout) for g in (32, 64, 128) for layout in LAYOUTS]


@pytest.mark.parametrize(("scheme", "g", "layout"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["kernel", "dequant"])
def test_forward_equals_dequantize_then_linear(scheme, g, layout, dtype, path, monkeypatch):
    monkeypatch.setattr(quant, "kernel_max_rows", lambda dtype: 10**9 if path == "kernel" else 0)
    lin, w, bias = make(scheme, g=g, layout=layout)
    if path == "kernel" and scheme == "int4" and layout == "rows":
        assert not quant.kernel_fits(torch.ones(1, K), lin.qweight, lin.spec)  # no kernel: dequantize
    for rows in (1, 3, 37, 300):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.no_grad():
            y = lin(x)
        close(y, twin(lin, w, bias, x), dtype)
    x3 = torch.randn(2, 5, K).to(dtype)  # (B, T, K): leading dims kept
    with torch.no_grad():
        close(lin(x3), twin(lin, w, bias, x3), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_rule_takes_the_kernel_for_few_rows_only(monkeypatch, dtype):
    lin, w, bias = make("int8")
    calls = []
    kernel = quant._kernel
    monkeypatch.setattr(quant, "_kernel", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    most = quant.kernel_max_rows(dtype)
    assert most == 1 if dtype == torch.float32 else most >= 8  # fp32: torch's kernels are slow past one row
    with torch.no_grad():
        for rows in (1, most, most + 1):
            x = torch.ones(rows, K, dtype=dtype)
            close(lin(x), F.linear(x.float(), w, bias), dtype)
    assert calls == [1, most]


@pytest.mark.parametrize(("scheme", "g", "layout"), CASES[:1] + CASES[4:6], ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 300])
def test_backward_equals_autograd_on_the_dequantized_weight(scheme, g, layout, rows):
    lin, w, bias = make(scheme, g=g, layout=layout)
    lin.bias.requires_grad_(True)  # a trainable bias gets its gradient too
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2))
    lin(x).backward(grad)
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.clone().requires_grad_()
    F.linear(x_ref, w, b_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
    torch.testing.assert_close(lin.bias.grad, b_ref.grad, **FP32)
    assert lin.qweight.grad is None and not lin.qweight.requires_grad


def test_kernel_scales_are_prepared_once_per_tensor_and_die_with_it():
    lin, _, _ = make("int4", g=64, layout=sw.int4_layout())
    s = lin.scales_and_zeros
    first = quant._kernel_scales(s, lin.spec, torch.bfloat16)
    assert quant._kernel_scales(s, lin.spec, torch.bfloat16) is first  # cached
    assert first.shape == (K // 64, 128, 2) and first.dtype == torch.bfloat16  # (K/g, N, 2) as the kernel takes
    streamed = s.clone()  # a streamed tensor: prepared while it lives
    quant._kernel_scales(streamed, lin.spec, torch.float32)
    n = len(quant._prepared)
    del streamed
    assert len(quant._prepared) == n - 1
    int8, _, _ = make("int8")
    assert quant._kernel_scales(int8.scales, int8.spec, torch.float32) is int8.scales  # already as the kernel takes it
    assert len(quant._prepared) == n - 1  # not cached: the entry would keep its own key alive


def test_threads_do_not_share_the_dequantize_buffer():
    lins = [make("int4", n=64 * (i + 1), g=32, layout="rows", seed=i) for i in range(2)]
    errors: list[float] = []

    def run(i: int) -> None:
        lin, w, bias = lins[i]
        x = torch.randn(300, K, generator=torch.Generator().manual_seed(i))  # 300 rows: dequantize path
        for _ in range(20):
            with torch.no_grad():
                errors.append(float((lin(x) - F.linear(x, w, bias)).abs().max()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 40 and max(errors) < 1e-3


def test_frozen_parameters_for_assign_release_and_placeholders():
    lin = QuantLinear(K, 128, True, "int4", 64, sw.int4_layout(), device="meta")
    assert sorted(tensor_keys(lin)) == ["bias", "qweight", "scales_and_zeros"]
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (128, K // 2)
    assert all(not p.requires_grad for p in lin.parameters())
    placeholders = meta_placeholders(lin)
    real, w, bias = make("int4", g=64, layout=sw.int4_layout())
    assign(lin, {k: getattr(real, k) for k in placeholders}, "test", placeholders.keys())
    x = torch.randn(2, K)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, w, bias), **FP32)
    release(lin, placeholders)
    assert lin.qweight.is_meta
    assert QuantLinear.is_frozen_linear and "int4" in repr(lin)


@pytest.mark.parametrize("layout", ["aten_cpu_avx512", "aten_cpu_avx2", "aten_cpu_default", "rows"])
def test_unpacking_into_the_buffer_equals_llm_sepweights_unpack(layout):
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    w = torch.empty(128, 96)
    quant._unpack_into(w, sw.pack_int4(q, layout), layout)
    assert torch.equal(w, sw.unpack_int4(sw.pack_int4(q, layout), layout).float())


def test_another_cpus_layout_repacks_to_the_same_weight():
    q = torch.randint(0, 16, (128, K), dtype=torch.uint8)
    for other in ("aten_cpu_avx512", "aten_cpu_avx2", "aten_cpu_default", "rows"):
        packed = sw.pack_int4(q, other)
        assert torch.equal(sw.unpack_int4(repack_int4(packed, other, sw.int4_layout()), sw.int4_layout()), q)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"group_size 64"):
        QuantLinear(96, 64, False, "int4", 64, "rows")
    with pytest.raises(ValueError, match=r"scheme 'int3'"):
        QuantLinear(64, 64, False, "int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"quantized weight has shape \[64, 128\], the config implies \[32, 128\]"):
        linear(128, 32, False, "meta", sw.QuantSpec("int8", (64, 128)))
    assert type(linear(128, 32, False, "meta")) is nn.Linear


def test_scratch_bytes_is_the_largest_weight_in_the_gemm_dtype():
    assert quant.scratch_bytes(1000, torch.float32) == 4000
    assert quant.scratch_bytes(1000, torch.bfloat16) == (2000 if quant.native_bf16() else 4000)
