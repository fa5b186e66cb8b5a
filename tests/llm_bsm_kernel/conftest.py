"""Fixture for llm_bsm_kernel's tests: run a test on the compiled kernel and on the forced fallback."""

from __future__ import annotations

import os
import sys

import pytest

# pytest runs with --import-mode=importlib, so test modules cannot import their neighbours; this makes
# bsm_helpers.py (the float64 reference) importable from this directory's tests.
sys.path.insert(0, os.path.dirname(__file__))

from llm_bsm_kernel import blas


@pytest.fixture(params=["kernel", "fallback"])
def path(request, monkeypatch) -> str:
    """Run a test on the compiled kernel and on the per-item fallback (forced, same process)."""
    if request.param == "fallback":
        monkeypatch.setattr(blas, "gemm", lambda dtype: blas.Gemm("fallback", "forced by the test"))
    elif blas.gemm("float32").name == "fallback":
        pytest.skip("compiled kernel not available")
    return request.param
