"""The float64 reference every path of llm_bsm_kernel must equal (test helpers, imported by name)."""

from __future__ import annotations

import numpy as np
import torch

# Max error relative to (|op(A)| @ |op(B)|) * |scale|, the natural GEMM error scale.
TOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 8e-3}


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def reference(a, b, scale: float, trans: str = "nn") -> tuple[np.ndarray, np.ndarray]:
    """(scale * op(A) @ op(B), its error scale) in float64 from the inputs as stored (bf16 exactly)."""
    a64, b64 = as_f64(a), as_f64(b)
    if trans[0] == "t":
        a64 = np.swapaxes(a64, -1, -2)
    if trans[1] == "t":
        b64 = np.swapaxes(b64, -1, -2)
    return scale * (a64 @ b64), abs(scale) * (np.abs(a64) @ np.abs(b64)) + 1e-30


def assert_matches(got, item: tuple, dtype: str) -> None:
    want, size = reference(*item)
    got64 = as_f64(got)
    assert got64.shape == want.shape
    err = np.abs(got64 - want) / size
    assert err.max(initial=0.0) <= TOL[dtype], f"max relative error {err.max():.3g} > {TOL[dtype]}"
