"""The C fast path (`_kernel.plain_records`) plans exactly what bundle.py plans, or declines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_bsm_kernel import blas, bundle

kernel = blas.kernel_ready()
pytestmark = pytest.mark.skipif(kernel is None, reason="compiled kernel not available")


def plain_items(kind: str, dtype: str) -> list[tuple]:
    def r(*shape):
        x = np.random.default_rng(len(shape)).standard_normal(shape)
        if kind == "numpy":
            return x.astype(dtype)
        return torch.from_numpy(x).to(getattr(torch, dtype))

    big = r(3, 20, 30)
    return [
        (r(7, 5), r(5, 9), 1.0),
        (r(7, 5), r(9, 5), 0.5, "nt"),
        (r(5, 7), r(5, 9), 2, "tn"),
        (r(5, 7), r(9, 5), -1.0, "tt"),
        (r(1, 5), r(5, 1), 1.0),  # size-1 dims: canonical strides
        (r(4, 20, 6), r(6, 11), 0.125),  # folded into one (80, 6) GEMM
        (r(4, 20, 6), r(1, 6, 11), 1.0),  # batch 1 on the right: folded too
        (r(1, 20, 6), r(4, 6, 11), 1.0),  # batch 1 on the left: per-slice
        (r(4, 20, 6), r(4, 11, 6), 1.0, "nt"),
        (
            big[:, 2:12, 5:25],
            r(20, 3),
            1.0,
        ),  # strided 3-D view with a unit stride: no copy
        (big[1].T, big[2], 1.0),  # transposed view
    ]


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("numpy", "float32"),
        ("numpy", "float64"),
        ("torch", "float32"),
        ("torch", "bfloat16"),
    ],
)
def test_same_records_as_bundle_py(kind, dtype):
    items = plain_items(kind, dtype)
    fast = kernel.plain_records(items)
    assert fast is not None
    records, outs = fast
    slow = [bundle.record(item) for item in bundle.prepare(items)]
    assert len(records) == len(slow) == len(items)
    for got, want, out in zip(records, slow, outs):
        assert got[:5] == want[:5]  # dtype, batch, M, N, K
        assert got[5] is want[5] and got[9] is want[9]  # the very same operands: no copies
        assert got[6:9] == want[6:9] and got[10:13] == want[10:13]  # their strides
        assert got[14:] == want[14:]  # C's strides and alpha
        assert tuple(out.shape) == tuple(want[13].shape) and out.dtype == want[13].dtype


@pytest.mark.parametrize(
    "item",
    [
        (
            np.ones((4, 6), np.float32)[:, ::2],
            np.ones((3, 2), np.float32),
            1.0,
        ),  # needs a copy
        (
            np.ones((4, 0), np.float32),
            np.ones((0, 2), np.float32),
            1.0,
        ),  # K = 0: zero-fill
        (
            np.ones((4, 3), np.float32),
            np.ones((3, 2), np.float32),
            np.float32(1.0),
        ),  # numpy scalar
        (
            np.ones((4, 3), np.float32),
            np.ones((3, 2), np.float64),
            1.0,
        ),  # mixed dtypes: error
        (
            np.ones((4, 3), np.float32),
            np.ones((4, 2), np.float32),
            1.0,
        ),  # mismatch: error
        (
            np.ones((4, 3), np.float16),
            np.ones((3, 2), np.float16),
            1.0,
        ),  # unsupported: error
        (torch.ones(4, 3), np.ones((3, 2), np.float32), 1.0),  # mixed kinds: error
    ],
)
def test_declines_what_bundle_py_must_handle(item):
    assert kernel.plain_records([item]) is None
