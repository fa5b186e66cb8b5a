"""Bad input fails up front with an error that names the item (or out[i]) and what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_bsm_kernel import backend, bsm

A = np.ones((4, 5), np.float32)
B = np.ones((5, 6), np.float32)
T = torch.ones(5, 6)


@pytest.mark.parametrize(
    "items,error,match",
    [
        (A, TypeError, r"items must be a list of \(A, B, scale\) tuples, got ndarray"),
        (
            (A, B, 1.0),
            TypeError,
            r"item 0 is a ndarray; expected a tuple \(A, B, scale\)",
        ),
        ([(A, B)], ValueError, r"item 0 has 2 elements; expected \(A, B, scale\)"),
        ([(A, B, 1.0), (A, B, 1.0, "nt", 0)], ValueError, r"item 1 has 5 elements"),
        ([(A, B, 1.0), "AB"], TypeError, r"item 1 is a str"),
        (
            [(A, A, 1.0)],
            ValueError,
            r"item 0: op\(A\) is 4x5 and op\(B\) is 4x5; their inner sizes differ \(5 != 4\)",
        ),
        ([(A, B, 1.0, "tn")], ValueError, r"item 0: op\(A\) is 5x4 and op\(B\) is 5x6"),
        ([(A, B, 1.0, "x")], ValueError, r"item 0: transposes must be one of"),
        ([(A, B, "1")], TypeError, r"item 0: scale must be a real number, got str"),
        (
            [(A, B, torch.tensor(1.0))],
            TypeError,
            r"item 0: scale must be a real number, got Tensor",
        ),
        (
            [(A, B.astype(np.float64), 1.0)],
            TypeError,
            r"item 0: A is float32 but B is float64; cast one",
        ),
        (
            [(A.astype(np.float16), B, 1.0)],
            TypeError,
            r"item 0: A has dtype float16; supported: float32",
        ),
        ([(A.astype(np.int32), B, 1.0)], TypeError, r"item 0: A has dtype int32"),
        (
            [(torch.ones(4, 5, dtype=torch.float16), T.half(), 1.0)],
            TypeError,
            r"item 0: A has dtype torch.float16",
        ),
        (
            [(A, T, 1.0)],
            TypeError,
            r"item 0: A and B must both be numpy arrays or both torch tensors",
        ),
        (
            [(A, [[1.0]], 1.0)],
            TypeError,
            r"item 0: B is a list; expected a numpy array or a torch CPU tensor",
        ),
        (
            [(torch.ones(4, 5, device="meta"), T, 1.0)],
            ValueError,
            r"item 0: A is a torch.strided tensor on meta; bsm computes on strided CPU",
        ),
        (
            [(torch.ones(4, 5).to_sparse(), T, 1.0)],
            ValueError,
            r"item 0: A is a torch.sparse_coo tensor on cpu",
        ),
        (
            [(np.ones(5, np.float32), B, 1.0)],
            ValueError,
            r"item 0: A must be 2-D or 3-D \(batch first\), got shape \(5,\)",
        ),
        (
            [(np.ones((3, 4, 5), np.float32), np.ones((2, 5, 6), np.float32), 1.0)],
            ValueError,
            r"item 0: batch sizes 3 and 2 do not broadcast",
        ),
    ],
)
def test_bad_items(items, error, match):
    with pytest.raises(error, match=match):
        bsm(items)


def test_bad_out():
    with pytest.raises(ValueError, match=r"out has 2 arrays for 1 items"):
        bsm([(A, B, 1.0)], out=[np.empty((4, 6), np.float32)] * 2)
    with pytest.raises(
        ValueError,
        match=r"out\[0\] must be a numpy array of shape \(4, 6\) and dtype float32",
    ):
        bsm([(A, B, 1.0)], out=[np.empty((6, 4), np.float32)])
    with pytest.raises(TypeError, match=r"out\[0\] has dtype float64; item 0 computes float32"):
        bsm([(A, B, 1.0)], out=[np.empty((4, 6))])
    with pytest.raises(ValueError, match=r"out\[0\] must have a unit stride"):
        bsm([(A, B, 1.0)], out=[np.empty((8, 12), np.float32)[::2, ::2]])
    read_only = np.empty((4, 6), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[0\] is read-only"):
        bsm([(A, B, 1.0)], out=[read_only])
    with pytest.raises(ValueError, match=r"out= is not supported when an input requires grad"):
        bsm([(torch.ones(4, 5, requires_grad=True), T, 1.0)], out=[torch.empty(4, 6)])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_threads must be a positive int or None, got 0"):
        bsm([(A, B, 1.0)], num_threads=0)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        backend("float16")


def _overlapping_cases() -> list[tuple[list, list, str]]:
    """(items, out, message) where an out shares elements with an input or another out."""
    sq = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    t = torch.randn(6, 6)
    bf = torch.randn(6, 6, dtype=torch.bfloat16)
    buf = np.zeros((6, 12), np.float32)
    return [
        ([(sq, sq, 1.0)], [sq], r"out\[0\] overlaps item 0's A"),  # in place: out is A
        ([(sq, sq.T.copy(), 1.0, "nt")], [sq.T], r"out\[0\] overlaps item 0's A"),  # a view of A
        ([(t, t[:, :6].clone(), 0.5)], [t], r"out\[0\] overlaps item 0's A"),
        ([(bf.clone(), bf, 1.0)], [bf], r"out\[0\] overlaps item 0's B"),
        (
            [(A, B, 1.0), (buf[:, :6], sq, 1.0)],
            [np.zeros((4, 6), np.float32), buf[:, 3:9]],
            r"out\[1\] overlaps item 1's A",
        ),
        ([(sq, sq, 1.0), (A, B, 1.0)], [np.zeros((6, 6), np.float32), sq[:4]], r"out\[1\] overlaps item 0's A"),
        ([(sq, sq, 1.0), (sq, sq, 1.0)], [buf[:, :6], buf[:, 5:11]], r"out\[1\] overlaps out\[0\]"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_out_overlapping_an_input_is_refused(path, case):
    """Writing into an input while the GEMM still reads it gives a silently wrong product: refuse it."""
    items, out, match = _overlapping_cases()[case]
    before = [x.clone() if isinstance(x, torch.Tensor) else x.copy() for x in out]
    with pytest.raises(ValueError, match=match + r".*pass separate"):
        bsm(items, out=out)
    for x, y in zip(out, before):  # refused before anything was written
        assert (x == y).all()


def test_out_interleaved_with_inputs_is_allowed(path):
    """Column slices of one buffer share no element: a fused buffer as input and output stays legal."""
    rng = np.random.default_rng(1)
    buf = rng.standard_normal((6, 12)).astype(np.float32)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    x = buf[:, :6].copy()
    got = bsm([(buf[:, :6], w, 1.0)], out=[buf[:, 6:]])[0]
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(buf[:, :6], x)
