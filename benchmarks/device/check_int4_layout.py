"""Does llm_sepweight.pack_int4 equal torch's int4 packing op on this machine's CPU capability?

Run on a machine with the capability to check (AVX512 especially, which the dev box lacks)::

    python benchmarks/device/check_int4_layout.py            # this CPU's best capability
    ATEN_CPU_CAPABILITY=default python benchmarks/device/check_int4_layout.py

Prints one line per shape and exits 1 on a mismatch.
"""

import sys

import torch

import llm_sepweight as sw


def main() -> int:
    layout = sw.int4_layout()
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, layout {layout}")
    ok = True
    for n, k in [(64, 64), (128, 256), (192, 4096), (4096, 512)]:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
        same = torch.equal(sw.pack_int4(q, layout), want)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
        qweight, sz = sw.quantize_int4(w, 64, layout=layout)
        x = torch.randn(3, k)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, 64, sz.transpose(0, 1).contiguous())
        w_hat = sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, sw.QuantSpec("int4", (n, k), 64, layout))
        close = torch.allclose(got, x @ w_hat.T, atol=1e-3, rtol=1e-4)
        print(f"  [{n}, {k}]: pack_int4 == aten: {same}; int4 mm == dequantized matmul: {close}")
        ok &= same and close
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
