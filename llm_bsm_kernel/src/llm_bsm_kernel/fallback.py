"""The per-item path: one numpy or torch call per item, used when the extension or a GEMM is missing.

It computes the same products as the kernel (fp32 accumulation) without the bundle-level parallelism:
each call uses numpy's or torch's own threads, one item after another. The answers agree only up to
rounding, not bit for bit: another GEMM (or the same one with other tiles and threads) sums in another
order, and numpy applies `scale` after the product rather than inside it. For torch it is
`addmm`/`baddbmm` with `alpha=scale, beta=0`, the very op the kernel's torch route calls per tile.
"""

from __future__ import annotations

import sys

import numpy as np

from .bundle import Array, Item


def _op(x: Array, transpose: bool, is_torch: bool) -> Array:
    if not transpose:
        return x
    return x.mT if is_torch else np.swapaxes(x, -1, -2)


def run(items: list[Item]) -> None:
    """Write `scale * op(a) @ op(b)` into each item's `out`."""
    for it in items:
        a, b, out = _op(it.a, it.ta, it.is_torch), _op(it.b, it.tb, it.is_torch), it.out
        if not it.is_torch:
            np.matmul(a, b, out=out)
            if it.scale != 1.0:
                out *= it.scale
            continue
        torch = sys.modules["torch"]
        if out.ndim == 2:
            torch.addmm(out, a, b, beta=0, alpha=it.scale, out=out)
        else:
            batch = out.shape[0]
            a3 = a if a.ndim == 3 else a.unsqueeze(0)
            b3 = b if b.ndim == 3 else b.unsqueeze(0)
            a3 = a3.expand(batch, -1, -1)  # (batch, M, K)
            b3 = b3.expand(batch, -1, -1)  # (batch, K, N)
            torch.baddbmm(out, a3, b3, beta=0, alpha=it.scale, out=out)
