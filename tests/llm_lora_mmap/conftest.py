"""Fixtures for llm_lora_mmap's tests: tiny Qwen checkpoints converted to sepweight folders once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import llm_sepweight as sw

# pytest runs with --import-mode=importlib, so test modules cannot import their neighbours; this makes
# lora_helpers.py (the PEFT oracle helpers) importable from this directory's tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def sep(qwen_checkpoints, tmp_path_factory):
    """``sep(name) -> (sepweight folder, TinyCheckpoint)``, converted once per session."""
    root = tmp_path_factory.mktemp("lora_sep")
    cache: dict[str, Path] = {}

    def get(name: str):
        ckpt = qwen_checkpoints(name)
        if name not in cache:
            sw.convert(ckpt.path, root / name, progress=False)
            cache[name] = root / name
        return cache[name], ckpt

    return get
