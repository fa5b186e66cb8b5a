"""int4 packing and quantization against torch's own CPU kernels (the reference the format must equal)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llm_sepweight as sw
from llm_sepweight.quant_pack import LAYOUTS

CAPABILITY = torch.backends.cpu.get_cpu_capability()
ATEN_LAYOUTS = [name for name in LAYOUTS if name != "rows"]


def _q(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(64, 32), (128, 96), (192, 256)])
def test_unpack_inverts_pack(layout, shape):
    q = _q(*shape)
    packed = sw.pack_int4(q, layout)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(sw.unpack_int4(packed, layout), q)


@pytest.mark.parametrize("layout", ATEN_LAYOUTS)
def test_row_blocks_unpack_on_their_own(layout):
    q = _q(192, 64)
    packed = sw.pack_int4(q, layout)
    assert torch.equal(sw.unpack_int4(packed[64:128], layout), q[64:128])


def test_pack_equals_aten_on_this_cpu():
    layout = sw.int4_layout()
    for n, k in [(64, 64), (128, 256), (64, 4096 // 16)]:
        q = _q(n, k, seed=n + k)
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
        assert torch.equal(sw.pack_int4(q, layout), want), (layout, n, k)


def _cpu_lacks(flag: str) -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and flag not in cpuinfo.read_text()


@pytest.mark.parametrize("capability", ["default", "avx512"])
def test_pack_equals_aten_in_a_subprocess_with_capability(capability):
    """ATEN_CPU_CAPABILITY selects torch's kernel; a capability the CPU lacks falls back (we skip it then)."""
    if capability == "avx512" and _cpu_lacks("avx512f"):
        pytest.skip("no AVX512 here: run benchmarks/device/check_int4_layout.py on an AVX512 machine")
    code = textwrap.dedent(
        """
        import torch, llm_sepweight as sw
        layout = sw.int4_layout()
        q = torch.randint(0, 16, (128, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
        print(layout, torch.equal(sw.pack_int4(q, layout), want))
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    layout, same = out.split()
    if layout != f"aten_cpu_{capability}":
        pytest.skip(f"this CPU cannot run torch's {capability} kernels (got {layout})")
    assert same == "True"


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("method", ["clip", "rtn"])
def test_int4_kernel_equals_dequantized_matmul(group_size, method):
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    qweight, sz = sw.quantize_int4(w, group_size, method=method)
    spec = sw.QuantSpec("int4", (128, 256), group_size, sw.int4_layout())
    x = torch.randn(5, 256)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group_size, sz.transpose(0, 1).contiguous())
    w_hat = sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec)
    torch.testing.assert_close(got, x @ w_hat.T, atol=1e-4, rtol=1e-4)


def test_int8_kernel_equals_dequantized_matmul():
    torch.manual_seed(0)
    w = torch.randn(96, 160)
    qweight, scales = sw.quantize_int8(w)
    assert qweight.dtype == torch.int8 and scales.shape == (96,) and scales.dtype == torch.float32
    x = torch.randn(3, 160)
    w_hat = sw.dequantize({"qweight": qweight, "scales": scales}, sw.QuantSpec("int8", (96, 160)))
    torch.testing.assert_close(
        torch.ops.aten._weight_int8pack_mm(x, qweight, scales), x @ w_hat.T, atol=1e-4, rtol=1e-4
    )


def test_bf16_weights_get_bf16_scales():
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    assert sw.quantize_int8(w)[1].dtype == torch.bfloat16
    assert sw.quantize_int4(w)[1].dtype == torch.bfloat16
    assert sw.quantize_int4(w, scale_dtype=torch.float32)[1].dtype == torch.float32


def test_layout_defaults_to_rows_when_the_kernel_cannot_take_the_rows():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    qweight, sz = sw.quantize_int4(w, 32)
    assert torch.equal(qweight, sw.quantize_int4(w, 32, layout="rows")[0])
    w_hat = sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, sw.QuantSpec("int4", (96, 64), 32, "rows"))
    assert (w_hat - w).abs().max() < 0.3
