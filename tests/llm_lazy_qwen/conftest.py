from pathlib import Path

import pytest

import llm_sepweight as sw


@pytest.fixture(scope="session")
def sep(qwen_checkpoints, tmp_path_factory):
    """``sep(name) -> (sepweight folder, TinyCheckpoint)``, converted once per session."""
    root = tmp_path_factory.mktemp("sep")
    cache: dict[str, Path] = {}

    def get(name: str):
        ckpt = qwen_checkpoints(name)
        if name not in cache:
            sw.convert(ckpt.path, root / name, progress=False)
            cache[name] = root / name
        return cache[name], ckpt

    return get
