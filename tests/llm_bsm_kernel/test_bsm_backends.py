"""Backend discovery, the forced fallback (LLM_BSM_KERNEL_NO_EXT) and the missing-extension warning."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from bsm_helpers import assert_matches

from llm_bsm_kernel import backend, backend_info, bsm

NAMES = {"mkl", "openblas", "torch", "fallback"}


def test_backend_names_and_info():
    assert {backend(d) for d in ("float32", "float64", "bfloat16")} <= NAMES
    info = backend_info()
    assert {
        "version",
        "extension",
        "openmp",
        "max_threads",
        "fallback_reason",
        "float32",
        "bfloat16",
    } <= set(info)
    if info["extension"]:
        assert info["fallback_reason"] is None
        # torch is installed in the test environment
        assert backend("bfloat16") == "torch"
        assert backend("float32") in {"mkl", "openblas", "torch"}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, with LLM_BSM_KERNEL_NO_EXT only if given in `env`."""
    base = {k: v for k, v in os.environ.items() if k != "LLM_BSM_KERNEL_NO_EXT"}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        check=False,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


SCRIPT = """
import numpy as np, torch, llm_bsm_kernel as bk
a = np.arange(12, dtype=np.float32).reshape(3, 4); b = np.ones((4, 2), np.float32)
t = torch.arange(12.0).reshape(3, 4).bfloat16()
print(bk.backend("float32"), bk.backend("bfloat16"), bk.bsm([(a, b, 2.0)])[0].tolist(), bk.bsm([(t, t, 1.0, "nt")])[0].float().tolist())
"""


def test_forced_fallback_by_env_var():
    done = _python(SCRIPT, LLM_BSM_KERNEL_NO_EXT="1")
    assert done.returncode == 0, done.stderr
    name32, name16, *_ = done.stdout.split()
    assert (name32, name16) == ("fallback", "fallback")
    assert "Warning" not in done.stderr  # the user asked for it: no warning
    assert done.stdout.split(" ", 2)[2].strip() == _python(SCRIPT).stdout.split(" ", 2)[2].strip()


def test_missing_extension_warns_once_and_falls_back():
    code = "import sys; sys.modules['llm_bsm_kernel._kernel'] = None\n" + SCRIPT
    done = _python(code)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "UserWarning" in line]
    assert len(warnings) == 1 and "using the per-item numpy/torch fallback" in warnings[0], done.stderr
    assert done.stdout.startswith("fallback fallback")


def test_fallback_equals_kernel(path):
    """Through the `path` fixture this runs on both; both must equal the float64 reference."""
    rng = np.random.default_rng(3)
    items = [
        (
            rng.standard_normal((31, 17), dtype=np.float32),
            rng.standard_normal((23, 17), dtype=np.float32),
            0.5,
            "nt",
        ),
        (torch.randn(5, 31, 17), torch.randn(17, 9), 2.0),
        (torch.randn(31, 17).bfloat16(), torch.randn(17, 9).bfloat16(), 1.0),
    ]
    for got, item in zip(bsm(items), items):
        assert_matches(got, item, "bfloat16" if got.dtype == torch.bfloat16 else "float32")
