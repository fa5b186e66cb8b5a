"""GQA softmax attention without repeating the keys and values over the query heads.

transformers repeats k and v of the whole context over the query groups (``repeat_interleave``): on the
Qwen2.5-7B shape at a 4096-token context that is 59 MB (bf16) allocated per layer per decode step, and
the slowest way to compute it. Here KV head j serves query heads ``j*g .. j*g+g-1`` without a copy:

- short forwards (decode, speculative verification, T <= ``FOLD_MAX_TOKENS``): the query groups are
  folded into the query length, q (B, nKV, g*T, d) against k, v (B, nKV, K, d), the mask repeated over
  the groups (T x K each: small for short T);
- longer forwards (prefill): SDPA's ``enable_gqa=True`` (torch >= 2.5; older torch folds as well), which
  keeps SDPA's causal shortcut and a mask of T x K.

Measured on the 7B shape, 2 threads (``benchmarks/bench_gqa.py``): decode at context 4096 takes 1.5 ms
folded, 5.5 ms with ``enable_gqa`` and 53 ms repeated (fp32; bf16 13 / 44 / 52 ms), with ~3 MB of
temporaries instead of 114 MB; a 512-token prefill 63 ms with ``enable_gqa``, 76 ms folded, 80 ms
repeated; a 512-token chunk at context 4096 ties in time, and ``enable_gqa`` needs 18 MB where the fold's
repeated mask needs 83 MB (fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOLD_MAX_TOKENS = 64  # query positions per row up to which the groups are folded (above: enable_gqa)
SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"  # SDPA takes enable_gqa=


def folds(tokens: int) -> bool:
    """Whether a forward of `tokens` query positions per row folds the query groups (else SDPA's GQA)."""
    return tokens <= FOLD_MAX_TOKENS or not SDPA_GQA


def grouped_attention(
    q: torch.Tensor,  # (B, nH, T, d)
    k: torch.Tensor,  # (B, nKV, K, d)
    v: torch.Tensor,  # (B, nKV, K, d)
    mask: torch.Tensor | None,  # (B or 1, 1, T, K) bool, True = may attend; None = every key visible
    causal: bool = False,  # mask is None and the T queries are the K keys: query t sees keys 0..t
) -> torch.Tensor:
    """Softmax attention with KV head j serving query heads ``j*g .. j*g+g-1``; returns (B, nH, T, d).

    Equals ``scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), mask)``
    without the repeated copies.

    Example::

        out = grouped_attention(q, k, v, None)   # decode: one query per row sees the whole cache
    """
    B, nH, T, d = q.shape
    nKV, K = k.shape[1], k.shape[2]
    g = nH // nKV
    if g == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if not folds(T):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    if causal:  # SDPA's is_causal would apply to the folded length: build the mask of the T queries
        assert mask is None and T == K
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()[None, None]  # (1, 1, T, K)
    qf = q.reshape(B, nKV, g * T, d)  # row i*T + t of KV head j: query head j*g + i at position t
    mf = mask.repeat(1, 1, g, 1) if mask is not None else None  # (B or 1, 1, g*T, K): row i*T + t = mask row t
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)  # (B, nKV, g*T, d)
    return out.reshape(B, nH, T, d)


def attention_bytes(rows: int, tokens: int, context: int, groups: int, itemsize: int) -> int:
    """Memory of one layer's attention call of `rows` x `tokens` queries over `context` keys, besides q, k,
    v and the output: the mask (bool) and SDPA's float copy of it and its blocks, over the folded query
    length for short forwards. No scores matrix: SDPA's CPU kernel works in blocks.

    Example::

        attention_bytes(rows=1, tokens=512, context=4096, groups=7, itemsize=2)  # 10.5 MB
    """
    queries = groups * tokens if groups > 1 and folds(tokens) else tokens
    return rows * queries * context * (1 + 2 * itemsize)
