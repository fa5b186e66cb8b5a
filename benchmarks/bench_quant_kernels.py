"""llm_lazy_qwen quantized linears: torch's int8 / int4 CPU kernels and dequantize + GEMM vs a bf16 matmul.

The three linear shapes of a Qwen2.5-7B (gate/up 3584 -> 18944, down 18944 -> 3584, q/o 3584 -> 3584) at
M = 1 (decode), 64 and 256 rows (prefill). Each row: median ms of `--reps` calls after a warm-up, and the
ratio to the bf16 ``F.linear`` of the same shape measured in the same run (the anchor: what an
unquantized bf16 model does). Activations in `--dtype` (bf16 by default). Columns:

- ``bf16`` / ``fp32``: dense ``F.linear`` with a bf16 / fp32 weight;
- ``int8 k`` / ``int4 k``: ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` (g=64);
- ``int8 dq`` / ``int4 dq``: QuantLinear's prefill path (dequantize into a reused buffer + GEMM);
- ``int8 auto`` / ``int4 auto``: QuantLinear as it chooses (llm_bsm_kernel's GEMV up to ``bsm_max_rows(dtype)``
  rows when installed, torch's kernel up to ``kernel_max_rows(dtype)``; benchmarks/bench_quant_gemv.py compares
  the two GEMVs).

    python benchmarks/bench_quant_kernels.py [--reps 5] [--dtype bf16] [--rows 1,64,256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm_lazy_qwen.quant import QuantLinear, _dequant_matmul, _kernel_scales, kernel_max_rows, native_bf16
from llm_sepweight import int4_layout, pack_int4

SHAPES = [(3584, 18944), (18944, 3584), (3584, 3584)]  # (in K, out N)
G = 64


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (also fills QuantLinear's caches and buffer)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def layers(K: int, N: int) -> tuple[torch.Tensor, QuantLinear, QuantLinear]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
    q8 = QuantLinear(K, N, False, "int8", dtype=torch.bfloat16)
    q8.qweight.data = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    q8.scales.data = torch.rand(N, generator=g).bfloat16() * 1e-3
    q4 = QuantLinear(K, N, False, "int4", G, int4_layout(), dtype=torch.bfloat16)
    q4.qweight.data = pack_int4(torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g), int4_layout())
    q4.scales_and_zeros.data = torch.rand(N, K // G, 2, generator=g).bfloat16() * 1e-2
    return w, q8, q4


def candidates(
    x: torch.Tensor, w: torch.Tensor, w32: torch.Tensor, q8: QuantLinear, q4: QuantLinear
) -> dict[str, Callable[[], object]]:
    xb, x32, s4 = x.bfloat16(), x.float(), q4.scales_and_zeros
    return {
        "bf16": lambda: F.linear(xb, w),
        "fp32": lambda: F.linear(x32, w32),
        "int8 k": lambda: torch.ops.aten._weight_int8pack_mm(
            x, q8.qweight, _kernel_scales(q8.scales, q8.spec, x.dtype)
        ),
        "int4 k": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, q4.qweight, G, _kernel_scales(s4, q4.spec, x.dtype)
        ),
        "int8 dq": lambda: _dequant_matmul(x, q8.qweight, q8.scales, q8.spec),
        "int4 dq": lambda: _dequant_matmul(x, q4.qweight, s4, q4.spec),
        "int8 auto": lambda: q8(x),
        "int4 auto": lambda: q4(x),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rows", default="1,64,256")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16()}, int4 layout {int4_layout()}, "
        f"kernel_max_rows {kernel_max_rows(dtype)}, activations {args.dtype}, median of {args.reps}"
    )
    cols = ["bf16", "fp32", "int8 k", "int4 k", "int8 dq", "int4 dq", "int8 auto", "int4 auto"]
    print("| K x N | M | " + " | ".join(f"{c} ms (x bf16)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for K, N in SHAPES:
        w, q8, q4 = layers(K, N)
        w32 = w.float()
        for M in rows:
            x = torch.randn(M, K).to(dtype)
            fns = candidates(x, w, w32, q8, q4)
            ms = {c: median_ms(fn, args.reps) for c, fn in fns.items()}
            cells = [f"{ms[c]:.2f} ({ms[c] / ms['bf16']:.2f})" for c in cols]
            print(f"| {K} x {N} | {M} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
