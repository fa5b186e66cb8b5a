"""as_transformers(part) on a part whose weights were never loaded: a clear error naming what to do, not
torch's "Cannot copy out of meta tensor" from inside generate(); loaded parts (RAM, lazy, budget) pass."""

from __future__ import annotations

import pytest
import torch

from llm_lazy_qwen import QwenConfig, QwenPart, as_transformers, load_part
from llm_sepweight import SepWeights

pytest.importorskip("transformers")

IDS = torch.tensor([[1, 2, 3, 4]])


def test_never_loaded_is_refused(sep) -> None:
    path, _ = sep("qwen2")
    part = QwenPart(QwenConfig.from_folder(SepWeights(path)), "f")
    with pytest.raises(
        ValueError, match=r"weights were never loaded \(model.embed_tokens.weight and \d+ more.*load_part"
    ):
        as_transformers(part)


def test_loaded_afterwards_generates_as_load_part(sep) -> None:
    path, _ = sep("qwen2")
    source = SepWeights(path)
    part = QwenPart(QwenConfig.from_folder(source), "f").load_weights(source).eval()
    got = as_transformers(part).generate(IDS, max_new_tokens=4, do_sample=False)
    want = as_transformers(load_part(path, "f")).generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs", [{"lazy": True}, {"memory_budget": "64MiB"}], ids=["lazy", "budget"])
def test_streamed_parts_are_not_refused(sep, kwargs) -> None:
    """Their layers and head are meta between calls by design."""
    path, _ = sep("qwen2")
    want = as_transformers(load_part(path, "f")).generate(IDS, max_new_tokens=4, do_sample=False)
    model = as_transformers(load_part(path, "f", **kwargs))
    try:
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), want)
    finally:
        model.close()
