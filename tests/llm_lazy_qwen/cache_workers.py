"""Run in spawned processes by test_from_pretrained_cache.py (importable: conftest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def load_and_run(src: str, cache_dir: str, forbid_work: bool) -> list:
    """``from_pretrained`` then logits of fixed ids, as lists; ``forbid_work``: converting would raise."""
    import llm_sepweight.writer as writer
    from llm_lazy_qwen import from_pretrained

    if forbid_work:

        def boom(*args: object, **kwargs: object) -> None:
            raise AssertionError("a finished conversion must not hash or write")

        writer.SepweightWriter.__init__ = boom  # type: ignore[method-assign]
        writer.sha256_file = boom  # type: ignore[assignment]
    part = from_pretrained(src, "f", cache_dir=cache_dir)
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return part(ids).tolist()
