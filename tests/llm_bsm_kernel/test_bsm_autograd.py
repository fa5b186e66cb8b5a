"""The autograd Function: gradcheck in float64 (kernel dgemm and fallback), grads against torch autograd."""

from __future__ import annotations

import pytest
import torch

from llm_bsm_kernel import bsm
from llm_bsm_kernel.autograd import BundledMatmul


def leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_()


def test_gradcheck_float64(path):
    """2-D, transposes, batched, broadcast on both sides (GQA) and a folded batch, all in one bundle."""
    torch.manual_seed(0)
    x, w, lora_a = leaf(4, 5), leaf(3, 5), leaf(2, 5)
    q, k_shared = leaf(3, 4, 2), leaf(5, 2)  # 3 query heads against one key head
    left, right = leaf(1, 4, 3), leaf(3, 3, 2)
    scale = 0.7

    def run(x, w, lora_a, q, k_shared, left, right):
        return tuple(
            bsm(
                [
                    (x, w, 1.0, "nt"),  # (4, 3)
                    (x, lora_a.T, 2.0),  # (4, 2)
                    (q, k_shared, scale, "nt"),  # (3, 4, 5): B broadcast, batch folded
                    (left, right, -1.5),  # (3, 4, 2): A broadcast
                    (x.T, x, 1.0),  # (5, 5): the same leaf on both sides
                ]
            )
        )

    assert torch.autograd.gradcheck(run, (x, w, lora_a, q, k_shared, left, right))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grads_match_torch(path, dtype, tol):
    torch.manual_seed(1)
    x, wq, lora_a = (
        leaf(33, 40, dtype=dtype),
        leaf(24, 40, dtype=dtype),
        leaf(8, 40, dtype=dtype),
    )
    q, k = leaf(6, 33, 16, dtype=dtype), leaf(2, 33, 16, dtype=dtype)
    heads = [slice(0, 3), slice(3, 6)]
    items = [(x, wq, 1.0, "nt"), (x, lora_a.T, 2.0)] + [(q[s], k[j], 0.25, "nt") for j, s in enumerate(heads)]
    leaves = (x, wq, lora_a, q, k)
    outs = bsm(items)
    weights = [torch.randn(o.shape).to(dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    got = torch.autograd.grad(loss, leaves)
    want_outs = [x @ wq.T, x @ lora_a.T * 2.0] + [q[s] @ k[j].mT * 0.25 for j, s in enumerate(heads)]
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want_outs, weights)), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * w.abs().max().item())


def test_backward_is_one_bundle_and_skips_unneeded_grads():
    from llm_bsm_kernel import blas

    kernel = blas.kernel_ready()
    if kernel is None:
        pytest.skip("compiled kernel not available")
    x, frozen_w, lora_a = (
        torch.randn(64, 32),
        torch.randn(48, 32),
        torch.randn(8, 32, requires_grad=True),
    )
    y, h = bsm([(x, frozen_w, 1.0, "nt"), (x, lora_a, 2.0, "nt")], num_threads=1)
    assert y.requires_grad and not x.requires_grad
    (y.sum() + h.sum()).backward()
    # Only lora_a needs a grad: one VJP item, dB = 2 * x^T @ g, run as one kernel call.
    assert set(kernel.last_run_stats()["items"]) == {0}
    torch.testing.assert_close(lora_a.grad, 2.0 * (torch.ones(64, 8).T @ x))
    assert BundledMatmul.apply is not None


def test_no_grad_mode_returns_plain_tensors():
    w = torch.randn(5, 6, requires_grad=True)
    with torch.no_grad():
        (out,) = bsm([(torch.randn(4, 5), w, 1.0)])
    assert not out.requires_grad
