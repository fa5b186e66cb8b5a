"""int8_matmul's integer arithmetic (x quantized to int16 per block, exact int32 dot products) equals its pure-torch
twin `int8_matmul_reference` bit for bit, on both ISAs and every thread count; the int32 accumulators cannot
overflow at the extremes; the twin itself stays within the stated error of the fp32 product."""

from __future__ import annotations

import pytest
import torch

import llm_bsm_kernel as bk
from llm_bsm_kernel import quant_gemv as qg

pytestmark = pytest.mark.skipif(bk.quant_gemv_isa() is None, reason="compiled extension not available")
ISAS = ["avx2", "scalar"]


def _isa(isa: str) -> str:
    if isa == "avx2" and bk.quant_gemv_isa() != "avx2":
        pytest.skip("this CPU has no AVX2/FMA")
    return isa


def _case(M: int, N: int, K: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    s = torch.rand(N, generator=gen) * 2e-3 + 1e-4
    x = (torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 4).to(dtype)
    return x, q, s


# K: tails of 1..15 after whole 16s, one block and a bit, blocks + tails, > QK8_ROW_K (the other one-row loop)
SHAPES = [(1, 1), (3, 7), (5, 15), (4, 17), (9, 31), (67, 255), (13, 257), (21, 300), (6, 777), (7, 8192 + 40)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_twin_bit_for_bit(dtype, isa):
    isa = _isa(isa)
    for i, (N, K) in enumerate(SHAPES):
        for M in (1, 2, 3, 4, 5, 8, 9, 33):  # one row, pairs, a pair and a single, > the 32 QuantLinear sends
            x, q, s = _case(M, N, K, seed=100 * i + M, dtype=dtype)
            got = bk.int8_matmul(x, q, s, isa=isa, out_dtype=torch.float32)
            want = bk.int8_matmul_reference(x, q, s, out_dtype=torch.float32)
            assert torch.equal(got, want), f"N={N} K={K} M={M}: max diff {(got - want).abs().max():.3g}"


def test_scalar_fallback_equals_avx2_and_threads_do_not_change_a_bit(monkeypatch):
    _isa("avx2")
    x, q, s = _case(7, 203, 3000, seed=3, dtype=torch.bfloat16)
    one = bk.int8_matmul(x, q, s, num_threads=1)
    for threads in (2, 3, 5):
        assert torch.equal(bk.int8_matmul(x, q, s, num_threads=threads), one)
    assert torch.equal(bk.int8_matmul(x, q, s, isa="scalar", num_threads=3), one)
    monkeypatch.setenv(qg.ISA_ENV, "scalar")  # what a CPU without AVX2 runs under "auto"
    assert bk.quant_gemv_isa() == "scalar"
    assert torch.equal(bk.int8_matmul(x, q, s), one)


@pytest.mark.parametrize("isa", ISAS)
def test_int32_cannot_overflow_at_the_extremes(isa):
    # every product at its largest magnitude and one sign: xq = +-32767 (x at one value), q = -128 or 127
    isa = _isa(isa)
    K = 18944
    q = torch.stack([torch.full((K,), -128), torch.full((K,), 127), torch.full((K,), -128)]).to(torch.int8)
    q[2, 1::2] = 127  # alternating signs: the partial sums swing by the largest step
    s = torch.ones(3)
    x = torch.stack([torch.full((K,), 3.0), torch.full((K,), -3.0)])  # (2, K): xq = 32767, -32767
    got = bk.int8_matmul(x, q, s, isa=isa)
    exact = x.double() @ q.double().T  # x is exact in int16 here (one value per block)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)
    assert got[0, 0] == -3.0 * 128 * K  # what a wrapped int32 could not give


@pytest.mark.parametrize("isa", ISAS)
def test_the_largest_block_the_bound_allows(isa):
    # 512 products of 32767 * -128 = -2,147,418,112: one short of int32's end; a block of 528 is refused
    isa_code = qg._ISA_CODES[_isa(isa)]
    kernel = qg._ext()
    K = 1024
    q = torch.full((4, K), -128, dtype=torch.int8)
    x = torch.full((1, K), 2.0)
    s, y = torch.ones(4), torch.empty(1, 4)
    args = (isa_code, 1, 4, K, x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), y.data_ptr(), 1)
    kernel.int8_gemv(*args, 512)
    assert torch.equal(y, torch.full((1, 4), -2.0 * 128 * K))
    for bad in (528, 8, 100):
        with pytest.raises(ValueError, match=rf"int8_gemv: xblock={bad} must be a multiple of 16 in \[16, 512\]"):
            kernel.int8_gemv(*args, bad)


def test_zeros_tiny_and_non_finite_rows():
    _isa("avx2")
    N, K = 9, 600  # 3 blocks: 256, 256, 88
    x, q, s = _case(4, N, K, seed=5)
    x[0] = 0.0
    x[1, :256] = 1e-35  # a block below 1e-30 counts as zeros; the other blocks are unchanged
    x[2, 300] = float("nan")
    x[3, 599] = float("inf")
    for isa in ISAS:
        y = bk.int8_matmul(x, q, s, isa=isa)
        assert torch.equal(y[0], torch.zeros(N))
        assert torch.equal(y[1], bk.int8_matmul(torch.cat([torch.zeros(256), x[1, 256:]])[None], q, s, isa=isa)[0])
        assert y[2].isnan().all() and y[3].isnan().all()
        torch.testing.assert_close(y, bk.int8_matmul_reference(x, q, s), rtol=0, atol=0, equal_nan=True)


def test_error_vs_the_fp32_product_is_what_the_docs_say():
    # x known to 1/65534 of its block's largest |x|: random x and an outlier block stay within the README's bounds
    gen = torch.Generator().manual_seed(11)
    N, K = 512, 4096
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = torch.rand(N, generator=gen) * 1e-3 + 1e-4
    w = q.float() * s[:, None]
    x = torch.randn(4, K, generator=gen)
    x[2, 7] = 60.0  # one outlier: only its block loses precision
    want = x.double() @ w.double().T
    err = (bk.int8_matmul(x, q, s).double() - want).abs()
    rms = want.pow(2).mean(1, keepdim=True).sqrt()
    assert (err / rms).max() < 1e-3  # per row, relative to the outputs' RMS (measured: 4e-4 in the outlier row)
    assert (err / rms)[[0, 1, 3]].max() < 2.5e-4  # measured 0.9-1.4e-4


def test_twin_checks_its_input():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"int8_matmul_reference: x must be \[M, K\] with K=8"):
        bk.int8_matmul_reference(torch.ones(2, 9), q, torch.ones(4))
    with pytest.raises(ValueError, match=r"int8_matmul_reference: scales must be a float \[N\] = \[4\] tensor"):
        bk.int8_matmul_reference(torch.ones(2, 8), q, torch.ones(3))
