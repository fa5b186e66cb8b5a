"""GQA attention without repeating the KV cache: time and peak memory of three ways, on a 7B-like layer shape.

    python benchmarks/bench_gqa.py [--threads 2] [--repeats 7] [--layer]

Ways (all one ``F.scaled_dot_product_attention`` call on CPU):
- ``repeat``: ``repeat_interleave`` of k and v over the query groups, then SDPA (transformers' way; llm_lazy_qwen
  before max_tokens);
- ``gqa``: SDPA's ``enable_gqa=True`` (torch >= 2.5);
- ``fold``: the query groups folded into the query length, q (B, nKV, g*T, d) against k, v (B, nKV, K, d), the mask
  repeated over the groups (an explicit causal mask when T > 1).

Cases: decode (T=1) at context 4096 without and with a padding mask; a 512-token prefill from an empty cache
(causal); a 512-token chunk at the end of a 4096 context (the chunked prefill of ``max_tokens``). Shape: Qwen2.5-7B
(28 query heads, 4 KV heads, head_dim 128), batch 1. Peak memory: VmHWM growth of a fresh process over one call (the
peak reset after its inputs were made) (so it is what the call itself allocates). Time: median of `repeats` calls, the ways
interleaved in one process.

``--layer`` adds one whole 7B-shaped decoder layer (random bf16 weights, a cache of 4096 tokens): its peak memory
over one forward (fresh process each) with llm_lazy_qwen's attention and with k/v repeated, against what the
memory budget counts per layer (``runtime_bytes``'s activations for that many tokens).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

N_HEADS, N_KV, D = 28, 4, 128
CASES = {  # name: (T, context K, padding mask)
    "decode K=4096": (1, 4096, False),
    "decode K=4096 + padding": (1, 4096, True),
    "prefill T=512": (512, 512, False),
    "chunk T=512 at K=4096 + padding": (512, 4096, True),
}
WAYS = ("repeat", "gqa", "fold")


def inputs(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    T, K, pad = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, N_HEADS, T, D, generator=g).to(dtype)
    k = torch.randn(1, N_KV, K, D, generator=g).to(dtype)
    v = torch.randn(1, N_KV, K, D, generator=g).to(dtype)
    q_pos = torch.arange(K - T, K)
    allowed = torch.arange(K)[None] <= q_pos[:, None]  # (T, K) causal over cache indices
    if pad:
        allowed = allowed & (torch.arange(K) >= 7)[None]  # 7 left-padded keys
    mask = allowed[None, None] if (pad or T > 1) else None  # (1, 1, T, K)
    return q, k, v, mask


def attend(way: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    B, nH, T, d = q.shape
    g = nH // k.shape[1]
    causal = mask is not None and T == k.shape[2]  # from an empty cache: SDPA's is_causal, no mask
    m = None if causal else mask
    if way == "repeat":
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    if way == "gqa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    nKV = k.shape[1]
    qf = q.reshape(B, nKV, g * T, d)  # query head j*g + i, position t -> row i*T + t of KV head j
    mf = mask.repeat(1, 1, g, 1) if mask is not None else None  # (B|1, 1, g*T, K)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)  # (B, nKV, g*T, d)
    return out.reshape(B, nH, T, d)


def child(way: str, case: str, dtype: str) -> None:
    torch.set_num_threads(2)
    q, k, v, mask = inputs(case, getattr(torch, dtype))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the RSS now
    before = _status("VmRSS")
    attend(way, q, k, v, mask)
    print(json.dumps({"peak_mb": (_status("VmHWM") - before) / 1024}))


def _status(field: str) -> int:
    """kB of a /proc/self/status field."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def layer_child(way: str, T: int) -> None:
    """Peak memory (MB) and time of one 7B-shaped layer's forward of T tokens ending at cache index 4096."""
    import llm_lazy_qwen.block as block
    from llm_lazy_qwen import QwenConfig, layer_activation_bytes
    from llm_lazy_qwen.attention import attention_bytes
    from llm_lazy_qwen.kv_cache import FullLayerCache
    from llm_lazy_qwen.rope import RotaryEmbedding

    torch.set_num_threads(2)
    K, dtype = 4096, torch.bfloat16
    shape = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=1, num_attention_heads=N_HEADS)
    cfg = QwenConfig.from_dict(
        dict(model_type="qwen2", num_key_value_heads=N_KV, vocab_size=1000, max_position_embeddings=32768, **shape)
        | dict(rms_norm_eps=1e-6, rope_theta=1e6)
    )
    if way == "repeat":  # the attention before this change: k/v repeated over the query groups

        def repeated(q, k, v, mask, causal=False):
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

        block.grouped_attention = repeated
    layer = block.DecoderLayer(cfg, 0, "cpu").to(dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cache, start = FullLayerCache(K), K - T
    with torch.no_grad():
        kv = torch.randn(1, N_KV, start, D).to(dtype)
        cache.update(kv, kv.clone(), 0)
        cos, sin = RotaryEmbedding(cfg.rope_parameters, D, 32768, "cpu")(torch.arange(start, K)[None], dtype)
        x = torch.randn(1, T, 3584).to(dtype)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        t0 = time.perf_counter()
        layer(x, cos, sin, start, cache, None)
        seconds = time.perf_counter() - t0
    plan = layer_activation_bytes(cfg, T, 2) + 8 * T * 3584 + attention_bytes(1, T, K, N_HEADS // N_KV, 2)
    peak = (_status("VmHWM") - before) / 1024
    print(json.dumps({"peak_mb": peak, "ms": 1e3 * seconds, "plan_mb": plan / 2**20}))


def layer_table() -> None:
    print("\none 7B-shaped decoder layer, bf16, cache of 4096 tokens (fresh process per cell; ms of one call)")
    print("| forward | repeated k/v: peak MB | ms | now: peak MB | ms | the plan counts MB |")
    print("|---|---|---|---|---|---|")
    for T in (1, 512):
        cells = {}
        for way in ("repeat", "now"):
            out = subprocess.run(
                [sys.executable, __file__, "--layer-child", way, str(T)], check=True, capture_output=True, text=True
            ).stdout
            cells[way] = json.loads(out.splitlines()[-1])
        r, n = cells["repeat"], cells["now"]
        name = "decode (T=1)" if T == 1 else f"{T}-token chunk"
        print(
            f"| {name} | {r['peak_mb']:.1f} | {r['ms']:.0f} | {n['peak_mb']:.1f} | {n['ms']:.0f} | {n['plan_mb']:.1f} |",
            flush=True,
        )


def peak_mb(way: str, case: str, dtype: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", way, case, dtype], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layer", action="store_true", help="also one whole 7B-shaped layer: peak memory vs the plan")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--layer-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.layer_child:
        layer_child(args.layer_child[0], int(args.layer_child[1]))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms = median of {args.repeats}; MB = peak growth")
    print(f"| dtype | case | {' | '.join(f'{w} ms' for w in WAYS)} | {' | '.join(f'{w} MB' for w in WAYS)} | max err |")
    print("|---|---|" + "---|" * (2 * len(WAYS) + 1))
    for dtype in ("float32", "bfloat16"):
        for case in CASES:
            q, k, v, mask = inputs(case, getattr(torch, dtype))
            ref = attend("repeat", q, k, v, mask).float()
            err = max((attend(w, q, k, v, mask).float() - ref).abs().max().item() for w in WAYS)
            times: dict[str, list[float]] = {w: [] for w in WAYS}
            for _ in range(args.repeats):
                for w in WAYS:
                    t0 = time.perf_counter()
                    attend(w, q, k, v, mask)
                    times[w].append(time.perf_counter() - t0)
            ms = [f"{1e3 * statistics.median(times[w]):.2f}" for w in WAYS]
            mb = [f"{peak_mb(w, case, dtype):.1f}" for w in WAYS]
            print(f"| {dtype} | {case} | {' | '.join(ms)} | {' | '.join(mb)} | {err:.1e} |", flush=True)
    if args.layer:
        layer_table()


if __name__ == "__main__":
    main()
