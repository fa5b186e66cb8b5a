"""int4_matmul / int8_matmul equal the pure-torch reference: llm_sepweight's pack_int4 / dequantize + an fp32
matmul, for every int4 layout, odd shapes, 1..8 rows, fp32 and bf16 x, the AVX2 and the scalar loops, one
and several threads; bad input fails up front with an error that says what is wrong."""

from __future__ import annotations

import threading

import pytest
import torch

import llm_bsm_kernel as bk
import llm_sepweight as sw
from llm_bsm_kernel import quant_gemv as qg

FP32 = {"atol": 1e-4, "rtol": 1e-4}
LAYOUTS = ["aten_cpu_avx2", "aten_cpu_avx512", "aten_cpu_default", "rows"]
# (N, K, g): one group, 3 groups (K not a multiple of 8 groups, nor of 64), the largest group; N = 64 * odd
INT4_SHAPES = [(64, 32, 32), (192, 96, 32), (64, 192, 64), (128, 384, 128), (64, 256, 256)]
ROWS_SHAPES = [(1, 32, 32), (3, 96, 32), (70, 160, 32), (33, 384, 128)]  # "rows" takes any N
ISAS = ["avx2", "scalar"]

pytestmark = pytest.mark.skipif(bk.quant_gemv_isa() is None, reason="compiled extension not available")


def _isa(isa: str) -> str:
    if isa == "avx2" and bk.quant_gemv_isa() != "avx2":
        pytest.skip("this CPU has no AVX2/FMA")
    return isa


def _int4(N: int, K: int, g: int, layout: str, seed: int = 0, scale_dtype=torch.float32):
    """(packed, scales_and_zeros, fp32 W) with W = llm_sepweight.dequantize, the reference."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    sz = torch.empty(N, K // g, 2)
    sz[..., 0] = torch.rand(N, K // g, generator=gen) * 0.01 + 1e-3
    sz[..., 1] = torch.randn(N, K // g, generator=gen) * 0.01
    sz = sz.to(scale_dtype)
    packed = sw.pack_int4(q, layout)
    w = sw.dequantize({"qweight": packed, "scales_and_zeros": sz}, sw.QuantSpec("int4", (N, K), g, layout))
    return packed, sz, w


def _int8(N: int, K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = torch.rand(N, generator=gen) * 2e-4 + 1e-5
    return q, s, sw.dequantize({"qweight": q, "scales": s}, sw.QuantSpec("int8", (N, K)))


def _x(M: int, K: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int4_equals_dequantize_matmul(layout, dtype, isa):
    isa = _isa(isa)
    shapes = ROWS_SHAPES if layout == "rows" else INT4_SHAPES
    for N, K, g in shapes:
        packed, sz, w = _int4(N, K, g, layout, seed=N + K, scale_dtype=dtype)  # bf16 scales with bf16 x
        prepared = bk.prepare_int4_scales(sz)
        for M in range(1, 9):
            x = _x(M, K, dtype, seed=M)
            want = x.float() @ w.T  # (M, N), the bf16 x's own values in fp32
            got = bk.int4_matmul(x, packed, prepared, g, layout, isa=isa, out_dtype=torch.float32)
            torch.testing.assert_close(got, want, **FP32, msg=lambda m, at=f"N={N} K={K} g={g} M={M}": f"{at}: {m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_equals_dequantize_matmul(dtype, isa):
    isa = _isa(isa)
    for N, K in [(1, 1), (5, 7), (4, 8), (67, 16), (64, 33), (9, 300), (130, 1000)]:  # K tails of 8 and 16
        q, s, w = _int8(N, K, seed=N * K)
        for M in range(1, 9):
            x = _x(M, K, dtype, seed=M)
            got = bk.int8_matmul(x, q, s, isa=isa, out_dtype=torch.float32)
            torch.testing.assert_close(
                got, x.float() @ w.T, **FP32, msg=lambda m, at=f"N={N} K={K} M={M}": f"{at}: {m}"
            )


def test_output_dtype_defaults_to_x_dtype_and_scales_may_be_bf16():
    packed, sz, w = _int4(64, 128, 64, "aten_cpu_avx2", scale_dtype=torch.bfloat16)
    x = _x(3, 128, torch.bfloat16)
    want = x.float() @ w.T
    y = bk.int4_matmul(x, packed, sz, 64, "aten_cpu_avx2")  # stored [N, K/g, 2] bf16 scales, prepared per call
    assert y.dtype == torch.bfloat16 and y.shape == (3, 64)
    torch.testing.assert_close(y, want.bfloat16())  # the fp32 result rounded once
    q, s, w8 = _int8(64, 128)
    y8 = bk.int8_matmul(x, q, s.bfloat16())
    assert y8.dtype == torch.bfloat16
    torch.testing.assert_close(y8, (x.float() @ (q.float() * s.bfloat16().float()[:, None]).T).bfloat16())


def test_stored_and_prepared_scales_give_the_same_result():
    packed, sz, _ = _int4(128, 192, 64, "aten_cpu_default")
    x = _x(2, 192, torch.float32)
    a = bk.int4_matmul(x, packed, sz, 64, "aten_cpu_default")
    b = bk.int4_matmul(x, packed, bk.prepare_int4_scales(sz), 64, "aten_cpu_default")
    assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_counts_give_identical_results(threads):
    # each output row is summed by one thread in a fixed order: the split cannot change a bit
    packed, sz, _ = _int4(320, 256, 32, "aten_cpu_avx2")
    q, s, _ = _int8(101, 77)
    x4, x8 = _x(5, 256, torch.float32), _x(5, 77, torch.float32)
    one = bk.int4_matmul(x4, packed, sz, 32, "aten_cpu_avx2", num_threads=1)
    assert torch.equal(bk.int4_matmul(x4, packed, sz, 32, "aten_cpu_avx2", num_threads=threads), one)
    assert torch.equal(bk.int8_matmul(x8, q, s, num_threads=threads), bk.int8_matmul(x8, q, s, num_threads=1))


def test_concurrent_calls_from_python_threads():
    packed, sz, w = _int4(256, 512, 64, "aten_cpu_avx2")
    xs = [_x(2, 512, torch.float32, seed=i) for i in range(4)]
    out: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(5):
            out[i] = bk.int4_matmul(xs[i], packed, sz, 64, "aten_cpu_avx2")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        torch.testing.assert_close(out[i], x @ w.T, **FP32)


def test_zero_rows_and_the_isa_switch(monkeypatch):
    packed, sz, _ = _int4(64, 64, 32, "rows")
    assert bk.int4_matmul(torch.empty(0, 64), packed, sz, 32, "rows").shape == (0, 64)
    monkeypatch.setenv(qg.ISA_ENV, "scalar")  # forces the portable loops under "auto"
    assert bk.quant_gemv_isa() == "scalar"
    x = _x(3, 64, torch.float32)
    assert torch.equal(
        bk.int4_matmul(x, packed, sz, 32, "rows"), bk.int4_matmul(x, packed, sz, 32, "rows", isa="scalar")
    )
    monkeypatch.setenv(qg.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"\$LLM_BSM_KERNEL_ISA='sse9': use one of \['avx2', 'scalar'\]"):
        bk.int4_matmul(torch.ones(1, 64), packed, sz, 32, "rows")
    monkeypatch.delenv(qg.ISA_ENV)
    with pytest.raises(ValueError, match="isa must be 'auto', 'avx2' or 'scalar', got 'neon'"):
        bk.int4_matmul(torch.ones(1, 64), packed, sz, 32, "rows", isa="neon")  # type: ignore[arg-type]


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(qg, "_ext", lambda: None)
    assert bk.quant_gemv_isa() is None
    q, s, _ = _int8(4, 8)
    with pytest.raises(RuntimeError, match="int8_matmul: llm_bsm_kernel's compiled extension is not available"):
        bk.int8_matmul(torch.ones(1, 8), q, s)


_P, _SZ, _ = _int4(64, 128, 32, "aten_cpu_avx2")
_X = torch.ones(2, 128)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            {"x": _X.half()},
            TypeError,
            r"int4_matmul: x has dtype torch.float16; supported: torch.float32, torch.bfloat16",
        ),
        ({"x": _X.numpy()}, TypeError, r"int4_matmul: x must be a torch.Tensor, got ndarray"),
        (
            {"x": torch.ones(2, 96)},
            ValueError,
            r"x must be \[M, K\] with K=128 \(the weight's in_features\), got \[2, 96\]",
        ),
        ({"x": torch.ones(128)}, ValueError, r"x must be \[M, K\] with K=128"),
        (
            {"x": torch.ones(128, 2).T},
            ValueError,
            r"int4_matmul: x \[2, 128\] is not contiguous; pass x.contiguous\(\)",
        ),
        (
            {"qweight": _P.to(torch.int8)},
            TypeError,
            r"qweight must be a uint8 \[N, K/2\] tensor, got torch.int8 \[64, 64\]",
        ),
        ({"qweight": torch.cat([_P, _P], 1)[:, ::2]}, ValueError, r"qweight \[64, 64\] is not contiguous"),
        ({"qweight": _P[:48]}, ValueError, r"N=48 rows are not a multiple of 32, which layout 'aten_cpu_avx2' needs"),
        ({"layout": "avx9"}, ValueError, r"unknown int4 layout 'avx9'; use one of \['aten_cpu_avx2', "),
        ({"group_size": 48}, ValueError, r"group_size 48 must be a positive even divisor of K=128"),
        ({"group_size": 0}, ValueError, r"group_size 0 must be"),
        (
            {"scales": _SZ[:, :2]},
            ValueError,
            r"scales_and_zeros must be \[N, K/g, 2\] = \[64, 4, 2\], got \[64, 2, 2\]",
        ),
        (
            {"scales": _SZ.reshape(64, 8)},
            ValueError,
            r"scales must be the stored \[N, K/g, 2\] = \[64, 4, 2\] or prepare_int4_scales' fp32 / bf16 \[2K/g, N\] = \[8, 64\], got torch.float32 \[64, 8\]",
        ),
        (
            {"scales": bk.prepare_int4_scales(_SZ).half()},
            ValueError,
            r"prepare_int4_scales' fp32 / bf16 \[2K/g, N\] = \[8, 64\], got torch.float16",
        ),
        ({"scales": bk.prepare_int4_scales(_SZ).T.contiguous().T}, ValueError, r"scales \[8, 64\] is not contiguous"),
        ({"num_threads": 0}, ValueError, r"num_threads must be a positive int or None, got 0"),
        ({"out_dtype": torch.float16}, TypeError, r"out_dtype must be None, torch.float32 or torch.bfloat16"),
    ],
)
def test_int4_bad_input(kwargs, error, match):
    args = {"x": _X, "qweight": _P, "scales": _SZ, "group_size": 32, "layout": "aten_cpu_avx2"} | kwargs
    with pytest.raises(error, match=match):
        bk.int4_matmul(**args)


_Q8, _S8, _ = _int8(16, 40)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            {"qweight": _Q8.to(torch.uint8)},
            TypeError,
            r"int8_matmul: qweight must be an int8 \[N, K\] tensor, got torch.uint8",
        ),
        ({"qweight": _Q8[None]}, TypeError, r"qweight must be an int8 \[N, K\] tensor, got torch.int8 \[1, 16, 40\]"),
        ({"x": torch.ones(3, 41)}, ValueError, r"int8_matmul: x must be \[M, K\] with K=40"),
        ({"x": torch.ones(3, 40, dtype=torch.float64)}, TypeError, r"x has dtype torch.float64"),
        ({"scales": _S8[:8]}, ValueError, r"scales must be a float \[N\] = \[16\] tensor, got torch.float32 \[8\]"),
        ({"scales": _S8.to(torch.int32)}, ValueError, r"scales must be a float \[N\] = \[16\] tensor, got torch.int32"),
        ({"scales": torch.stack([_S8, _S8], 1)[:, 0]}, ValueError, r"scales \[16\] is not contiguous"),
        ({"isa": "sse"}, ValueError, r"isa must be 'auto', 'avx2' or 'scalar', got 'sse'"),
    ],
)
def test_int8_bad_input(kwargs, error, match):
    args = {"x": torch.ones(3, 40), "qweight": _Q8, "scales": _S8} | kwargs
    with pytest.raises(error, match=match):
        bk.int8_matmul(**args)


def test_prepare_int4_scales_layout_and_errors():
    sz = torch.tensor([[[2.0, 1.0], [3.0, -1.0]]])  # N=1, G=2
    assert bk.prepare_int4_scales(sz).tolist() == [[2.0], [1.0], [3.0], [-1.0]]  # (2G, N): scales, zeros per group
    assert bk.prepare_int4_scales(sz.bfloat16()).dtype == torch.bfloat16  # exact: no bigger than stored
    assert bk.prepare_int4_scales(sz.half()).dtype == torch.float32
    with pytest.raises(
        ValueError, match=r"scales_and_zeros must be a float \[N, K/g, 2\] tensor, got torch.float32 \[1, 4\]"
    ):
        bk.prepare_int4_scales(sz.view(1, 4))
