"""`bsm`: run a bundle of independent `scale * A @ B` products at once, on the fastest path available.

Path per item: the compiled kernel (tiles over all cores, GIL released) when its dtype has a GEMM,
else the per-item fallback; torch inputs that require grad go through the autograd Function.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from . import blas, bundle, fallback
from .bundle import Array


def _num_threads(num_threads: int | None) -> int:
    kernel, _ = blas.extension()
    if num_threads is None:
        return kernel.max_threads() if kernel is not None else 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    return num_threads


def _needs_grad(items: Sequence[Any]) -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled() or not isinstance(items, (list, tuple)):
        return False  # malformed items are reported by the validator
    operands = (x for item in items if isinstance(item, (list, tuple)) for x in item[:2])
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in operands)


def compute(
    items: Sequence[Any],
    num_threads: int | None = None,
    out: Sequence[Array] | None = None,
) -> list[Array]:
    """`bsm` without autograd: validate, then run kernel items in one parallel call and the rest per item."""
    nt = _num_threads(num_threads)
    kernel = blas.kernel_ready()
    if kernel is not None and out is None:
        # The common case, planned in C: ~2 us per item instead of ~15 through bundle.py.
        plain = kernel.plain_records(items)
        if plain is not None:
            kernel.run(plain[0], nt)
            return plain[1]
    prepared = bundle.prepare(items, out)
    records, slow = [], []
    for item in prepared:
        if blas.gemm(item.dtype).name == "fallback":
            slow.append(item)
        else:
            rec = bundle.record(item)
            if rec is not None:
                records.append(rec)
    if records:
        assert kernel is not None, "records are only built for dtypes the kernel serves"
        kernel.run(records, nt)
    if slow:
        fallback.run(slow)
    return [item.out for item in prepared]


def bsm(
    items: Sequence[Any],
    num_threads: int | None = None,
    out: Sequence[Array] | None = None,
) -> list[Array]:
    """Compute `scale * op(A) @ op(B)` for every item of a bundle at once; return the outputs in order.

    Args:
        items: `(A, B, scale)` or `(A, B, scale, "nt")` tuples. A is (M, K) or (batch, M, K), B is
            (K, N) or (batch, K, N), after the optional transposes ('t' swaps the last two dims; a
            `.T`/`.mT` view works as well and is not copied). A 2-D operand or a batch of 1 broadcasts.
            numpy arrays or torch CPU tensors; float32, float64, or bfloat16 (torch), fp32 accumulation.
            Shapes and dtypes may differ between items.
        num_threads: OpenMP threads for the bundle; default: OpenMP's default (OMP_NUM_THREADS, or
            torch.set_num_threads, which shares the runtime).
        out: optional outputs, one per item, of the result's shape and dtype, with a unit stride in one
            of their last two dimensions (column slices of a wider buffer work). An out that shares
            an element with any input or another out is refused with a ValueError (it would be
            overwritten while still read). Not allowed when inputs require grad.

    Torch inputs that require grad (with grad mode on) run through an autograd Function whose backward
    is one more bundle of all the vector-Jacobian products.

    Example:
        >>> x = np.ones((256, 896), np.float32)
        >>> w_q, w_k = np.ones((896, 896), np.float32), np.ones((128, 896), np.float32)
        >>> q, k = bsm([(x, w_q.T, 1.0), (x, w_k, 1.0, "nt")])  # x @ W_q^T, x @ W_k^T
        >>> q.shape, k.shape
        ((256, 896), (256, 128))
    """
    if _needs_grad(items):
        if out is not None:
            raise ValueError("out= is not supported when an input requires grad; call bsm under torch.no_grad()")
        from .autograd import bsm_autograd

        return bsm_autograd(items, num_threads)
    return compute(items, num_threads, out)
