"""bsm against the float64 reference: odd shapes, transposes, strided views, batches, dtypes, threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bsm_helpers import assert_matches, reference

from llm_bsm_kernel import bsm

rng = np.random.default_rng(0)


def rand(*shape, dtype="float32", kind="numpy"):
    x = rng.standard_normal(shape)
    if kind == "numpy":
        return x.astype(dtype)
    return torch.from_numpy(x).to(getattr(torch, dtype))


ODD = [
    (1, 1, 1),
    (3, 5, 7),
    (17, 1, 9),
    (64, 65, 63),
    (129, 37, 300),
    (300, 129, 17),
    (2, 300, 1),
]


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("numpy", "float32"),
        ("numpy", "float64"),
        ("torch", "float32"),
        ("torch", "bfloat16"),
        ("torch", "float64"),
    ],
)
@pytest.mark.parametrize("num_threads", [1, None])
def test_odd_shapes_all_transposes(path, kind, dtype, num_threads):
    items = []
    for i, (m, k, n) in enumerate(ODD):
        trans = ("nn", "nt", "tn", "tt")[i % 4]
        a = rand(*((k, m) if trans[0] == "t" else (m, k)), dtype=dtype, kind=kind)
        b = rand(*((n, k) if trans[1] == "t" else (k, n)), dtype=dtype, kind=kind)
        items.append((a, b, [1.0, 0.125, -3.0][i % 3], trans))
    outs = bsm(items, num_threads=num_threads)
    for got, item in zip(outs, items):
        assert_matches(got, item, dtype)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_transposed_and_strided_views(path, kind):
    """Views go to BLAS without copies where a stride is 1, and are copied where none is."""
    x = rand(40, 70, kind=kind)
    w = rand(90, 70, kind=kind)
    big = rand(3, 50, 80, kind=kind)
    items = [
        (x, w.T, 1.0),  # nn.Linear: x @ W^T with W^T a view
        (x.T, x, 0.5),  # both layouts at once: (70, 40) @ (40, 70)
        (x[5:30, 3:64], w[:, 3:64].T, 2.0),  # offsets and sub-blocks keep a unit stride
        (x[::2, ::3], w[::4, ::3].T, 1.0),  # no unit stride: copied
        (big[:, ::2, 1:71], w.T, 1.0),  # 3-D strided rows
        (
            big[1].T[::-1] if kind == "numpy" else big[1].T.flip(0),
            big[2][:, :7],
            1.0,
        ),  # negative strides
    ]
    for got, item in zip(bsm(items), items):
        assert_matches(got, item, "float32")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batched_and_broadcast(path, kind):
    """3-D items; a batch of 1 or a 2-D operand broadcasts on either side (GQA)."""
    q = rand(7, 33, 16, kind=kind)
    kt = rand(16, 45, kind=kind)
    items = [
        (q, kt, 0.25),  # (7, 33, 16) @ (16, 45): folded into one (231, 16) GEMM
        (q, rand(1, 16, 45, kind=kind), 1.0),  # batch 1 on the right
        (
            rand(1, 33, 16, kind=kind),
            rand(7, 16, 5, kind=kind),
            1.0,
        ),  # batch 1 on the left
        (rand(33, 16, kind=kind), rand(7, 16, 5, kind=kind), 1.0),  # 2-D on the left
        (q, rand(7, 45, 16, kind=kind), 1.0, "nt"),  # per-head K^T
        (
            q.transpose(1, 2) if kind == "torch" else q.transpose(0, 2, 1),
            q,
            1.0,
        ),  # (7, 16, 33) @ (7, 33, 16)
    ]
    for got, item in zip(bsm(items), items):
        assert_matches(got, item, "float32")
    # (2, 45, 16) view with batch stride 16
    heads = rand(45, 2, 16, kind="torch").transpose(0, 1)
    expanded = heads[:1].expand(7, 45, 16)  # batch stride 0
    item = (rand(7, 33, 16, kind="torch"), expanded, 1.0, "nt")
    assert_matches(bsm([item])[0], item, "float32")


def test_empty_and_single_bundles(path):
    assert bsm([]) == []
    a, b = rand(5, 3), rand(3, 4)
    (out,) = bsm([(a, b, 2.0)])
    assert_matches(out, (a, b, 2.0), "float32")
    zero_k = bsm([(rand(4, 0), rand(0, 6), 1.0)])[0]
    assert zero_k.shape == (4, 6) and not zero_k.any()
    assert bsm([(rand(0, 3), rand(3, 6), 1.0)])[0].shape == (0, 6)
    assert bsm([(rand(2, 0, 3), rand(3, 6), 1.0)])[0].shape == (2, 0, 6)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_out_arrays(path, kind):
    """Given outputs: column slices of a fused buffer, a column-major array, NaN contents ignored."""
    x, wq, wk = rand(20, 30, kind=kind), rand(24, 30, kind=kind), rand(8, 30, kind=kind)
    qkv = rand(20, 40, kind=kind)
    qkv[:] = float("nan")
    col_major = rand(8, 20, kind=kind).T  # (20, 8), unit stride along rows
    outs = [qkv[:, :24], qkv[:, 24:32], col_major]
    result = bsm([(x, wq, 1.0, "nt"), (x, wk, 1.0, "nt"), (x, wk.T, 0.5)], out=outs)
    assert all(r is o for r, o in zip(result, outs))
    assert_matches(qkv[:, :24], (x, wq, 1.0, "nt"), "float32")
    assert_matches(qkv[:, 24:32], (x, wk, 1.0, "nt"), "float32")
    assert_matches(col_major, (x, wk.T, 0.5), "float32")
    assert np.isnan(np.asarray(qkv[:, 32:])).all()  # untouched


def test_heterogeneous_bundle_threads_agree(path):
    """One big item among small ones (tiles), fp32 and bf16 mixed; 1 thread and 2 threads agree."""
    items = [
        (rand(256, 896, kind="torch"), rand(896, 1024, kind="torch"), 1.0),
        (rand(256, 896, kind="torch"), rand(8, 896, kind="torch"), 2.0, "nt"),
        (
            rand(7, 64, 64, kind="torch", dtype="bfloat16"),
            rand(64, 64, kind="torch", dtype="bfloat16"),
            0.125,
            "nt",
        ),
        (rand(64, 32), rand(32, 48), 1.0),
    ]
    one, two = bsm(items, num_threads=1), bsm(items, num_threads=2)
    for got1, got2, item in zip(one, two, items):
        dtype = "bfloat16" if got1.dtype == torch.bfloat16 else "float32"
        assert_matches(got1, item, dtype)
        assert_matches(got2, item, dtype)


def test_bf16_equals_torch_addmm():
    """The bf16 route is torch's own addmm per tile: bitwise equal to it for an untiled item."""
    a, b = (
        rand(64, 96, kind="torch", dtype="bfloat16"),
        rand(96, 80, kind="torch", dtype="bfloat16"),
    )
    (got,) = bsm([(a, b, 0.5)], num_threads=1)
    want = torch.addmm(torch.empty(64, 80, dtype=torch.bfloat16), a, b, beta=0, alpha=0.5)
    assert torch.equal(got, want)
    assert reference(a, b, 0.5)[0].shape == (64, 80)
