"""mmap streaming re-caches items held in 4 KiB page-cache pages once, and stays exact."""

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import load_part, stream_mmap


def test_auto_mode_is_mmap_on_cpu(sep):
    path, _ = sep("qwen2")
    part = load_part(path, lazy=True)
    assert part._streamer.mode == "mmap"
    part.close()
    part = load_part(path, lazy=True, stream_mode="copy")
    assert part._streamer.mode == "copy" and not part._streamer.hugepages
    part.close()


def _watch_drops(part, monkeypatch) -> list[object]:
    dropped: list[object] = []
    real_drop = part._streamer.source.drop_cached
    monkeypatch.setattr(part._streamer.source, "drop_cached", lambda *a: dropped.append(a) or real_drop(*a))
    return dropped


def _run_and_check(part, ckpt) -> None:
    ids = token_ids(seq=9)
    with torch.no_grad():
        want = ckpt.model(ids).logits
        for _ in range(3):
            torch.testing.assert_close(part(ids), want, **FP32)


@pytest.mark.parametrize("coverage", [1.0, None])
def test_items_already_huge_or_unknown_are_left_alone(sep, monkeypatch, coverage):
    """Every item (the tiny test layers and head chunks) is checked once; none is dropped."""
    path, ckpt = sep("qwen2_tied")
    monkeypatch.setattr(stream_mmap, "_HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(stream_mmap, "hugepages_available", lambda: True)
    monkeypatch.setattr(stream_mmap, "hugepage_coverage", lambda t: coverage)
    part = load_part(path, lazy=True, head_chunk_size=100, prefetch=0)  # one thread: a fixed order
    dropped = _watch_drops(part, monkeypatch)
    _run_and_check(part, ckpt)
    assert set(part._streamer._checked) == set(part._streamer.order)
    assert dropped == []
    part.close()


def test_small_page_items_are_recached_once_and_results_stay_exact(sep, monkeypatch):
    """Coverage 0 before a drop and 1 after: every item is re-cached exactly once."""
    path, ckpt = sep("qwen2_tied")
    monkeypatch.setattr(stream_mmap, "_HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(stream_mmap, "hugepages_available", lambda: True)
    calls = iter([0.0, 1.0] * 100)  # each re-cache asks twice: before the drop, after the re-read
    monkeypatch.setattr(stream_mmap, "hugepage_coverage", lambda t: next(calls))
    part = load_part(path, lazy=True, head_chunk_size=100, prefetch=0)  # one thread: a fixed order
    dropped = _watch_drops(part, monkeypatch)
    _run_and_check(part, ckpt)
    order = part._streamer.order
    assert sorted(map(str, dropped)) == sorted(
        str(("end", ("lm_head.weight", *i)) if isinstance(i, tuple) else (i, None)) for i in order
    )
    assert part._streamer.hugepages
    part.close()


def test_recaching_that_gains_nothing_stops(sep, monkeypatch):
    """A file system without large folios: the first re-read does not help, so no file is re-read again."""
    path, ckpt = sep("qwen2_tied")
    monkeypatch.setattr(stream_mmap, "_HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(stream_mmap, "hugepages_available", lambda: True)
    monkeypatch.setattr(stream_mmap, "hugepage_coverage", lambda t: 0.0)
    part = load_part(path, lazy=True, head_chunk_size=100, prefetch=0)  # one thread: a fixed order
    dropped = _watch_drops(part, monkeypatch)
    _run_and_check(part, ckpt)
    assert len(dropped) == 1 and not part._streamer.hugepages
    part.close()


def test_hugepages_off_never_checks(sep, monkeypatch):
    path, _ = sep("qwen2")
    monkeypatch.setattr(stream_mmap, "_HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(stream_mmap, "hugepage_coverage", lambda t: pytest.fail("checked with hugepages=False"))
    part = load_part(path, lazy=True, hugepages=False)
    with torch.no_grad():
        part(token_ids(seq=9, seed=1))
    assert part._streamer._checked == {}
    part.close()


def test_items_are_checked_again_after_many_mappings(sep, monkeypatch):
    """Reclaim can evict pages that come back small: a long-running part re-checks now and then."""
    path, _ = sep("qwen2")
    monkeypatch.setattr(stream_mmap, "_HUGE_MIN_BYTES", 0)
    monkeypatch.setattr(stream_mmap, "_RECHECK_EVERY", 2)
    monkeypatch.setattr(stream_mmap, "hugepages_available", lambda: True)
    checks: list[int] = []
    monkeypatch.setattr(stream_mmap, "hugepage_coverage", lambda t: checks.append(1) or 1.0)
    part = load_part(path, lazy=True, prefetch=0)  # no prefetch of the next pass: exact counts
    n_items = len(part._streamer.order)
    with torch.no_grad():
        for seed in range(4):  # 4 mappings of every item: checked on the 1st and the 3rd
            part(token_ids(seq=9, seed=seed))
    assert len(checks) == 2 * n_items
    part.close()
