"""Validate a bundle once, allocate its outputs, and describe each item as one batched GEMM.

An item is `(A, B, scale)` or `(A, B, scale, "nt")`: `out = scale * op(A) @ op(B)`, where the optional
two letters say which operand to transpose ('t') over its last two dimensions ('n': as given). Operands
are 2-D, (M, K) and (K, N), or 3-D, (batch, M, K) and (batch, K, N); a 2-D operand or a batch of 1
broadcasts against the other (GQA: 7 query heads against one KV head), as in `torch.matmul`.

Zero copy: an operand is passed to BLAS as is when one of its last two strides is 1 (row-major, or a
transposed view such as `W.T`), with the other stride as leading dimension; the batch stride may be
anything, 0 included (`expand`). Only operands with no unit stride (`x[:, ::2]`), negative strides or
overlapping rows are copied first.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor; torch stays an optional import
DTYPE_CODE = {"float32": 0, "float64": 1, "bfloat16": 2}
NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
TRANSPOSES = ("nn", "nt", "tn", "tt")
INT32_MAX = 2**31 - 1


class Geometry(NamedTuple):
    """Sizes and element strides of an operand seen as (batch, rows, cols), after its transpose."""

    batch: int
    rows: int
    cols: int
    sb: int
    s0: int
    s1: int


class Item(NamedTuple):
    """One validated product: out = scale * op(a) @ op(b), out already allocated (or given)."""

    a: Array
    b: Array
    ta: bool
    tb: bool
    scale: float
    dtype: str
    is_torch: bool
    out: Array  # (M, N), or (batch, M, N) when A or B is 3-D
    ga: Geometry
    gb: Geometry


def _torch_module() -> Any:
    return sys.modules.get("torch")


def _dtype(x: Array, is_torch: bool, where: str) -> str:
    if is_torch:
        name = str(x.dtype).removeprefix("torch.")
        if name in DTYPE_CODE:
            return name
    elif x.dtype in NUMPY_DTYPES:
        return NUMPY_DTYPES[x.dtype]
    message = f"{where} has dtype {x.dtype}; supported: float32, float64, and bfloat16 for torch tensors"
    raise TypeError(message)


def _whole_strides(x: Array, is_torch: bool) -> bool:
    """False for numpy views whose byte strides are not whole elements (they are copied)."""
    return is_torch or not any(s % x.itemsize for s in x.strides)


def _geometry(x: Array, is_torch: bool, transpose: bool) -> Geometry:
    """(batch, rows, cols) sizes and element strides of op(x), a 2-D x being a batch of 1."""
    shape = tuple(x.shape)
    if is_torch:
        strides = tuple(x.stride())
    else:
        strides = tuple(s // x.itemsize for s in x.strides)
    if len(shape) == 2:
        shape, strides = (1, *shape), (0, *strides)
    batch, rows, cols = shape
    sb, s0, s1 = strides
    if transpose:
        rows, cols, s0, s1 = cols, rows, s1, s0
    return Geometry(batch, rows, cols, 0 if batch == 1 else sb, s0, s1)


def _blas_layout(g: Geometry) -> Geometry | None:
    """`g` with strides BLAS accepts (one of s0/s1 is 1, the other a valid leading dimension), or None."""
    if g.cols == 1 or g.s1 == 1:
        s0 = g.s0 if g.rows > 1 else max(g.cols, 1)
        if s0 >= max(g.cols, 1):
            return g._replace(s0=s0, s1=1)
    if g.rows == 1 or g.s0 == 1:
        s1 = g.s1 if g.cols > 1 else max(g.rows, 1)
        if s1 >= max(g.rows, 1):
            return g._replace(s0=1, s1=s1)
    return None


def _validate_operand(x: Array, i: int, name: str) -> bool:
    """Check one operand's kind, device and rank; return whether it is a torch tensor."""
    torch = _torch_module()
    is_torch = torch is not None and isinstance(x, torch.Tensor)
    if not is_torch and not isinstance(x, np.ndarray):
        message = f"item {i}: {name} is a {type(x).__name__}; expected a numpy array or a torch CPU tensor"
        raise TypeError(message)
    if is_torch and not (x.is_cpu and x.layout is torch.strided):
        message = f"item {i}: {name} is a {x.layout} tensor on {x.device}; bsm computes on strided CPU tensors only"
        raise ValueError(message)
    if x.ndim not in (2, 3):
        message = f"item {i}: {name} must be 2-D or 3-D (batch first), got shape {tuple(x.shape)}"
        raise ValueError(message)
    return is_torch


def parse_item(raw: Any, i: int) -> tuple[Array, Array, float, bool, bool]:
    """(A, B, scale, transpose A, transpose B) of item `i`, or a ValueError/TypeError naming it."""
    if not isinstance(raw, (tuple, list)):
        raise TypeError(f"item {i} is a {type(raw).__name__}; expected a tuple (A, B, scale) or (A, B, scale, 'nt')")
    if len(raw) not in (3, 4):
        raise ValueError(f"item {i} has {len(raw)} elements; expected (A, B, scale) or (A, B, scale, 'nt')")
    a, b, scale = raw[0], raw[1], raw[2]
    trans = raw[3] if len(raw) == 4 else "nn"
    if trans not in TRANSPOSES:
        message = f"item {i}: transposes must be one of {TRANSPOSES} (t = transpose A or B), got {trans!r}"
        raise ValueError(message)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        message = f"item {i}: scale must be a real number, got {type(scale).__name__}"
        raise TypeError(message)
    return a, b, float(scale), trans[0] == "t", trans[1] == "t"


def _check_out(out: Array, i: int, shape: tuple[int, ...], dtype: str, is_torch: bool) -> None:
    torch = _torch_module()
    if is_torch:
        ok = isinstance(out, torch.Tensor) and out.is_cpu and out.layout is torch.strided
    else:
        ok = isinstance(out, np.ndarray)
    if not ok or tuple(out.shape) != shape:
        kind = "torch CPU tensor" if is_torch else "numpy array"
        got = f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}"
        raise ValueError(f"out[{i}] must be a {kind} of shape {shape} and dtype {dtype}; got a {got}")
    if _dtype(out, is_torch, f"out[{i}]") != dtype:
        raise TypeError(f"out[{i}] has dtype {out.dtype}; item {i} computes {dtype}")
    if not is_torch and not out.flags.writeable:
        raise ValueError(f"out[{i}] is read-only")
    g = _blas_layout(_geometry(out, is_torch, False)) if _whole_strides(out, is_torch) else None
    if g is None or (g.batch > 1 and abs(g.sb) < (g.rows - 1) * g.s0 + (g.cols - 1) * g.s1 + 1):
        message = f"out[{i}] must have a unit stride in one of its last two dimensions and no overlapping parts"
        raise ValueError(message)


def _as_numpy(x: Array, is_torch: bool) -> np.ndarray:
    """A numpy view of x's memory (same strides), for overlap checks; bfloat16 seen as int16."""
    if not is_torch:
        return x
    torch = _torch_module()
    x = x.detach()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def _shares_elements(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether x and y have an element in common (exact: column slices of one buffer do not)."""
    if not np.may_share_memory(x, y):  # bounds only: the cheap common case
        return False
    try:
        return bool(np.shares_memory(x, y, max_work=10**6))
    except np.exceptions.TooHardError:
        return True


def _check_no_overlap(items: list[Item]) -> None:
    """Every out must be disjoint from every input and every other out of the bundle.

    The items' tiles run at the same time, so an out that overlaps any operand (of its item or another)
    is overwritten while still being read: a silently wrong product.
    """
    views = [(_as_numpy(it.a, it.is_torch), _as_numpy(it.b, it.is_torch)) for it in items]
    outs = [_as_numpy(it.out, it.is_torch) for it in items]
    for i, out in enumerate(outs):
        clash = next(
            (
                f"item {j}'s {name}"
                for j, ab in enumerate(views)
                for name, x in zip("AB", ab)
                if _shares_elements(out, x)
            ),
            None,
        )
        if clash is None:
            clash = next((f"out[{j}]" for j in range(i) if _shares_elements(out, outs[j])), None)
        if clash is not None:
            message = (
                f"out[{i}] overlaps {clash}: bsm would overwrite values it is still reading; "
                "pass separate output arrays (or omit out= and copy the result)"
            )
            raise ValueError(message)


def prepare(raw_items: Sequence[Any], out: Sequence[Array] | None = None) -> list[Item]:
    """Validate every item (errors name the item and what is wrong) and allocate or check the outputs."""
    if not isinstance(raw_items, (list, tuple)):
        raise TypeError(f"items must be a list of (A, B, scale) tuples, got {type(raw_items).__name__}")
    if out is not None and len(out) != len(raw_items):
        raise ValueError(f"out has {len(out)} arrays for {len(raw_items)} items")
    items = []
    for i, raw in enumerate(raw_items):
        a, b, scale, ta, tb = parse_item(raw, i)
        is_torch = _validate_operand(a, i, "A")
        if _validate_operand(b, i, "B") != is_torch:
            raise TypeError(f"item {i}: A and B must both be numpy arrays or both torch tensors")
        dtype, dtype_b = (
            _dtype(a, is_torch, f"item {i}: A"),
            _dtype(b, is_torch, f"item {i}: B"),
        )
        if dtype_b != dtype:
            raise TypeError(f"item {i}: A is {dtype} but B is {dtype_b}; cast one of them")
        a = a if _whole_strides(a, is_torch) else np.ascontiguousarray(a)
        b = b if _whole_strides(b, is_torch) else np.ascontiguousarray(b)
        ga, gb = _geometry(a, is_torch, ta), _geometry(b, is_torch, tb)
        if ga.cols != gb.rows:
            message = (
                f"item {i}: op(A) is {ga.rows}x{ga.cols} and op(B) is {gb.rows}x{gb.cols}; "
                f"their inner sizes differ ({ga.cols} != {gb.rows}). Transpose with 'nt'/'tn' or a .T view"
            )
            raise ValueError(message)
        if ga.batch != gb.batch and 1 not in (ga.batch, gb.batch):
            raise ValueError(
                f"item {i}: batch sizes {ga.batch} and {gb.batch} do not broadcast; use equal batches or 1"
            )
        shape: tuple[int, ...] = (ga.rows, gb.cols)
        if a.ndim == 3 or b.ndim == 3:
            shape = (max(ga.batch, gb.batch), *shape)
        if out is None:
            if is_torch:
                result = _torch_module().empty(shape, dtype=a.dtype)
            else:
                result = np.empty(shape, dtype=a.dtype)
        else:
            result = out[i]
            _check_out(result, i, shape, dtype, is_torch)
        items.append(Item(a, b, ta, tb, scale, dtype, is_torch, result, ga, gb))
    if out is not None:
        _check_no_overlap(items)
    return items


def _transposed(g: Geometry) -> Geometry:
    return g._replace(rows=g.cols, cols=g.rows, s0=g.s1, s1=g.s0)


def _for_blas(x: Array, g: Geometry, is_torch: bool, transpose: bool) -> tuple[Array, Geometry]:
    """x and its BLAS layout; x is copied first when it has no unit stride, negative strides or
    overlapping rows."""
    layout = _blas_layout(g)
    if layout is None:
        x = x.contiguous() if is_torch else np.ascontiguousarray(x)
        layout = _blas_layout(_geometry(x, is_torch, transpose))
    assert layout is not None, "a contiguous operand always has a BLAS layout"
    return x, layout


def record(item: Item) -> tuple | None:
    """The kernel's record for `item`, or None when there is nothing to multiply (an empty dimension).

    (dtype, batch, M, N, K, A, sab, sa0, sa1, B, sbb, sb0, sb1, C, scb, sc0, alpha), element strides.
    """
    a, b, ga, gb, c = item.a, item.b, item.ga, item.gb, item.out
    if max(ga.batch, gb.batch) * ga.rows * gb.cols == 0:
        return None
    if ga.cols == 0:
        c[...] = 0
        return None
    a, la = _for_blas(a, ga, item.is_torch, item.ta)
    b, lb = _for_blas(b, gb, item.is_torch, item.tb)
    lc = _blas_layout(_geometry(c, item.is_torch, False))
    assert lc is not None, "prepare checked the output's layout"
    # C is column-major: compute C^T = op(B)^T op(A)^T into its row-major transpose.
    if lc.s1 != 1:
        a, b, la, lb, lc = b, a, _transposed(lb), _transposed(la), _transposed(lc)
    batch, m, n, k = max(la.batch, lb.batch), la.rows, lb.cols, la.cols
    scb = lc.sb
    if batch > 1 and lb.batch == 1 and la.s1 == 1 and la.sb == m * la.s0 and scb == m * lc.s0:
        # (batch, M, K) @ (K, N) with A and C stacked row after row is one (batch*M, K) @ (K, N) GEMM
        batch, m, la = 1, batch * m, la._replace(sb=0)
        scb = 0
    if max(m, n, k, la.s0, la.s1, lb.s0, lb.s1, lc.s0) > INT32_MAX:
        raise ValueError(f"a dimension or leading dimension of {item.dtype} item exceeds 2**31-1 (32-bit BLAS)")
    return (
        DTYPE_CODE[item.dtype], batch, m, n, k,
        a, la.sb, la.s0, la.s1,
        b, lb.sb, lb.s0, lb.s1,
        c, scb, lc.s0, item.scale,
    )  # fmt: skip
