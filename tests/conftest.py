"""Shared fixtures for all packages' tests; the checkpoint builders live in qwen_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from qwen_fixtures import TinyCheckpoint, build_checkpoint

import llm_sepweight as sw


@pytest.fixture(scope="session")
def qwen_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``qwen_checkpoints(name) -> TinyCheckpoint``, built on first use and cached for the session."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, TinyCheckpoint] = {}

    def get(name: str) -> TinyCheckpoint:
        if name not in cache:
            cache[name] = build_checkpoint(name, root)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def sep(qwen_checkpoints, tmp_path_factory):
    """``sep(name) -> (sepweight folder, TinyCheckpoint)``, converted once per session for all packages."""
    root = tmp_path_factory.mktemp("sep")
    cache: dict[str, Path] = {}

    def get(name: str):
        ckpt = qwen_checkpoints(name)
        if name not in cache:
            sw.convert(ckpt.path, root / name, progress=False)
            cache[name] = root / name
        return cache[name], ckpt

    return get
