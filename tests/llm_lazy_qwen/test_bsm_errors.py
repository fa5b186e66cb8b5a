"""The matmul option is validated up front: unknown value, non-CPU device, kernel not installed."""

import sys

import pytest

from llm_lazy_qwen import bsm_path, load_part


def test_unknown_matmul_is_refused(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match=r"matmul must be one of \('torch', 'bsm'\), got 'blas'"):
        load_part(path, matmul="blas")


def test_bsm_on_cuda_is_refused(sep):
    path, _ = sep("qwen2")
    with pytest.raises(
        ValueError,
        match=r"matmul='bsm' computes on CPU only.*device is cuda.*use matmul='torch'",
    ):
        load_part(path, device="cuda", matmul="bsm")


def test_missing_kernel_says_how_to_install(sep, monkeypatch):
    path, _ = sep("qwen2")
    # a None entry in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "llm_bsm_kernel", None)
    bsm_path.require_bsm.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install llm_lazy_qwen\[bsm\]"):
            load_part(path, matmul="bsm")
    finally:
        bsm_path.require_bsm.cache_clear()
    # the default path never imports the kernel
    assert load_part(path).matmul == "torch"
