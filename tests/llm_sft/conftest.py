"""Fixtures for llm_sft's tests: tiny Qwen checkpoints (tests/qwen_fixtures.py) converted to sepweight once per session."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# pytest runs with --import-mode=importlib: make sft_helpers.py importable from this directory's tests
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: on a loaded 2-core machine, intra-op threads cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
