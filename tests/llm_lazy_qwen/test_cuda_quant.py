"""Quantized linears on CUDA (run on a GPU machine, skipped elsewhere): the packed integers are copied to the
device and dequantized there, and the result equals the CPU path and ``llm_sepweight.dequantize`` + F.linear.

Every int4 layout of QUANT_FORMAT.md is checked: a folder packed for one CPU's kernel loads on any GPU.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from lazy_helpers import FP32, token_ids
from torch import nn

import llm_sepweight as sw
from llm_lazy_qwen import load_part

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
quant = pytest.importorskip("llm_lazy_qwen.quant", reason="QuantLinear (llm_lazy_qwen/quant.py) not there yet")

LAYOUTS = ["aten_cpu_avx512", "aten_cpu_avx2", "aten_cpu_default", "rows"]
N, K, G = 128, 96, 32  # N a multiple of 64 and K of G: every layout can hold it


def _linear(scheme: str, layout: str | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor, sw.QuantSpec]:
    """A CPU QuantLinear with random integers, scales and bias; its dequantized weight and its bias."""
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    if scheme == "int8":
        q, s = sw.quantize_int8(w)
        tensors, spec = {"qweight": q, "scales": s}, sw.QuantSpec("int8", (N, K))
        lin = quant.QuantLinear(K, N, bias=True, scheme="int8")
    else:
        q, s = sw.quantize_int4(w, group_size=G, layout=layout)
        tensors, spec = {"qweight": q, "scales_and_zeros": s}, sw.QuantSpec("int4", (N, K), G, layout)
        lin = quant.QuantLinear(K, N, bias=True, scheme="int4", group_size=G, layout=layout)
    for name, t in {**tensors, "bias": bias}.items():
        setattr(lin, name, nn.Parameter(t, requires_grad=False))
    return lin, sw.dequantize(tensors, spec), bias, spec


@pytest.mark.parametrize(
    ("scheme", "layout"), [("int8", None)] + [("int4", layout) for layout in LAYOUTS], ids=lambda v: str(v)
)
@pytest.mark.parametrize("rows", [1, 300], ids=["decode", "prefill"])
def test_quant_linear_on_cuda_equals_the_reference(scheme, layout, rows):
    lin, w, bias, _ = _linear(scheme, layout)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    want = F.linear(x, w, bias)
    on_gpu = copy.deepcopy(lin).to("cuda")
    assert on_gpu.qweight.device.type == "cuda" and on_gpu.qweight.dtype in (torch.int8, torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), want, **FP32)
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), want, **FP32)
    # backward (LoRA on top trains through it): grad_x = grad @ W
    xg = x.cuda().requires_grad_()
    grad = torch.randn(rows, N, generator=torch.Generator().manual_seed(2)).cuda()
    on_gpu(xg).backward(grad)
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad.cpu(), grad.cpu() @ w, **FP32)


def _convert_takes_quant() -> bool:
    return "quant" in inspect.signature(sw.convert).parameters


@pytest.mark.skipif(not _convert_takes_quant(), reason="llm_sepweight.convert(quant=...) not there yet")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_quantized_folder_on_cuda_equals_cpu(qwen_checkpoints, tmp_path, scheme, lazy):
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / scheme
    extra = {"group_size": G} if scheme == "int4" else {}
    sw.convert(ckpt.path, dst, dtype="fp32", quant=scheme, progress=False, **extra)
    ids = token_ids()
    cpu = load_part(dst, lazy=lazy, head_chunk_size=128)
    gpu = load_part(dst, device="cuda", lazy=lazy, stream_mode="copy", head_chunk_size=128)
    try:
        if not lazy:
            qlins = [m for m in gpu.modules() if isinstance(m, quant.QuantLinear)]
            assert qlins, "no QuantLinear in the loaded part"
            assert all(m.qweight.device.type == "cuda" for m in qlins)
        with torch.no_grad():
            want = cpu(ids)
            for _ in range(3):  # streamed: the second and third pass reuse the buffers
                torch.testing.assert_close(gpu(ids.cuda()).cpu(), want, **FP32)
    finally:
        cpu.close()
        gpu.close()
