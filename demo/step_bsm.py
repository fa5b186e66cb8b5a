"""Demo step 5: llm_bsm_kernel's bundled scaled matmul on one attention layer's products, vs torch."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def best_ms(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Best time of each function in ms; runs interleaved, so load from elsewhere hits all alike."""
    times = [[] for _ in fns]
    for _ in range(reps + 1):  # the first round warms up
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e3 * min(t[1:]) for t in times]


def bsm_attention(sep: Path, tokens: int, reps: int, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """llm_bsm_kernel's bundles on layer 0's attention weights against torch doing the same products
    one after another: q/k/v projections (3 items), then the scores QK^T/sqrt(d) per KV head.
    ``dtype``: compute dtype, fp32 or bf16 (default: the stored one, fp32 for any other)."""
    import llm_sepweight as sw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import llm_bsm_kernel as bk

        w = sw.SepWeights(sep).layer(0)
        wq, wk, wv = (w[f"self_attn.{n}_proj.weight"] for n in "qkv")  # (out, in)
        dtype = dtype or (wq.dtype if wq.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        wq, wk, wv = wq.to(dtype), wk.to(dtype), wv.to(dtype)
        config = json.loads((sep / "config.json").read_text())
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        d = wk.shape[0] // kv_heads
        x = torch.randn(tokens, wq.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.to(dtype)  # (T, hidden): stands in for the layer's input hidden states

        def bundles(
            matmul: Callable[[list[tuple]], list[torch.Tensor]],
        ) -> list[torch.Tensor]:
            q, k, v = matmul([(x, wq, 1.0, "nt"), (x, wk, 1.0, "nt"), (x, wv, 1.0, "nt")])
            qh = q.view(tokens, heads, d).transpose(0, 1)  # (heads, T, d), a view
            kh = k.view(tokens, kv_heads, d)  # (T, kv_heads, d)
            g = heads // kv_heads  # query heads per KV head (GQA)
            items = [(qh[g * i : g * i + g], kh[:, i], d**-0.5, "nt") for i in range(kv_heads)]
            return [q, k, v, *matmul(items)]  # scores: (g, T, T) per KV head

        def one_by_one(items: list[tuple]) -> list[torch.Tensor]:
            return [scale * (a @ b.mT) for a, b, scale, _ in items]

        with torch.no_grad():
            got, want = bundles(bk.bsm), bundles(one_by_one)
            fns = [lambda: bundles(bk.bsm), lambda: bundles(one_by_one)]
            bsm_ms, torch_ms = best_ms(fns, reps)
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want))
    name = str(dtype).removeprefix("torch.")
    info = bk.backend_info()
    return {
        "backend": bk.backend(name),
        "gemm": info[name],
        "fallback_reason": info["fallback_reason"],
        "warnings": [str(c.message) for c in caught],
        "dtype": name,
        "items": 3 + kv_heads,
        "tokens": tokens,
        "max_rel_err": err,
        "equal": err < (2e-2 if dtype == torch.bfloat16 else 1e-5),
        "bsm_ms": bsm_ms,
        "torch_ms": torch_ms,
    }


def show_bsm(bsm: dict[str, Any]) -> tuple[str, str]:
    """Print step 5's checks and times; return its summary row."""
    for w in bsm["warnings"]:
        print(f"warning: {w}")
    if bsm["backend"] == "fallback":
        print(f"no compiled kernel: per-item fallback ({bsm['fallback_reason']})")
    print(f"backend for {bsm['dtype']}: {bsm['gemm']}")
    print(
        f"layer 0, {bsm['tokens']} tokens: q/k/v projections, then scores per KV head "
        f"({bsm['items']} products in 2 bundles)"
    )
    ok = "equal to torch" if bsm["equal"] else "DIFFERENT from torch"
    print(f"{ok}: max relative error {bsm['max_rel_err']:.1e}")
    ms, torch_ms = bsm["bsm_ms"], bsm["torch_ms"]
    ratio = ms / torch_ms
    print(f"best of runs: bsm {ms:.3f} ms, torch one by one {torch_ms:.3f} ms ({ratio:.2f}x)")
    same = "==" if bsm["equal"] else "!="
    row = f"{bsm['items']} attention products of layer 0 {same} torch; "
    row += f"{ms:.2f} ms vs {torch_ms:.2f} ms torch ({ratio:.2f}x)"
    return (f"bsm kernel ({bsm['backend']})", row)


# ------------------------------------------------------------------------------------------ step 7
