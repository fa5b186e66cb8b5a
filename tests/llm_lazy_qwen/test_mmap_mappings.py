"""mmap streaming maps each item once and populates / releases its pages per use.

Oracle: the same part held in RAM (lazy=False), fp32 tolerance. RSS of the weights is read from
/proc/self/smaps for the long-lived mappings' own address ranges (Linux).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
from lazy_helpers import FP32, decode, token_ids
from smaps import rss_kb

import llm_sepweight as sw
from llm_lazy_qwen import load_part, stream_mmap
from llm_lazy_qwen import quant as quant_mod

LINUX = sys.platform.startswith("linux")


def _weights_rss_kb(part) -> dict[object, int]:
    """Rss of each streamed item's long-lived mappings (kB), once the worker has nothing left to do."""
    streamer = part._streamer
    for fut in list(streamer._pending.values()):
        fut.result()
    streamer._pool.submit(lambda: None).result()
    return {
        item: rss_kb([t.data_ptr() for t in views.values()], require=False)
        for item, views in list(streamer._views.items())
    }


@pytest.mark.parametrize("prefetch", [0, 1])
def test_items_are_mapped_once_and_equal_ram(sep, monkeypatch, prefetch):
    path, _ = sep("qwen2_tied")
    made: list[tuple] = []
    real = sw.SepWeights.mapping
    monkeypatch.setattr(sw.SepWeights, "mapping", lambda self, *a: made.append(a) or real(self, *a))
    ram = load_part(path, head_chunk_size=100)
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=100, prefetch=prefetch)
    ids = token_ids(seq=7)
    with torch.no_grad():
        want = decode(ram, ids, 3)
        for _ in range(2):
            torch.testing.assert_close(decode(part, ids, 3), want, **FP32)
    streamer = part._streamer
    assert set(streamer._mappings) == set(streamer.order)
    assert len(made) == len(streamer.order)  # one mapping per item (a head chunk of the tied head: one row range)
    part.close()
    ram.close()


def _never_warm(monkeypatch) -> None:
    """Every populate counts as a read from disk: every item is prefetched (a cold page cache's behaviour)."""
    monkeypatch.setattr(stream_mmap, "_WARM_MIN_S", 0.0)
    monkeypatch.setattr(stream_mmap, "_WARM_S_PER_BYTE", 0.0)


def _always_warm(monkeypatch) -> None:
    monkeypatch.setattr(stream_mmap, "_WARM_MIN_S", 3600.0)


@pytest.mark.skipif(not LINUX, reason="MADV_DONTNEED drops the pages from RSS on Linux")
@pytest.mark.parametrize("prefetch", [0, 1])
def test_pages_leave_rss_after_use(sep, monkeypatch, prefetch):
    """After a forward only the prefetched items (the next forward's first) hold pages; during it, the item in use."""
    path, _ = sep("qwen2")
    _never_warm(monkeypatch)
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=128, prefetch=prefetch)
    streamer = part._streamer
    ids = token_ids(seq=5)
    seen: list[dict[object, int]] = []
    real_get = streamer.get

    def get(item):  # the RSS of every item's mapping right after one is handed out
        out = real_get(item)
        seen.append(_weights_rss_kb(part))
        return out

    with torch.no_grad():
        part(ids)  # the mappings are made
        streamer.get = get
        for _ in range(2):
            part(ids)
    del streamer.get
    after = _weights_rss_kb(part)
    window = set(streamer.order[:prefetch])
    assert all(kb == 0 for item, kb in after.items() if item not in window), after
    assert all(after[item] > 0 for item in window)  # (populated, every page)
    for rss in seen:  # in use: the item handed out and at most `prefetch` more
        assert sum(kb > 0 for kb in rss.values()) <= 1 + prefetch, rss
    part.close()


def test_file_truncated_after_mapping_raises_naming_it(sep, tmp_path):
    """The head's long-lived mapping outlives forwards: a truncated end file is refused before any page of it is touched."""
    src, _ = sep("qwen2")
    path = tmp_path / "sep"
    path.mkdir()
    for f in os.listdir(src):
        (path / f).write_bytes((src / f).read_bytes())
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=128, prefetch=0)
    ids = token_ids(seq=5)
    with torch.no_grad():
        part(ids)
        name = path / "end.safetensors"
        os.truncate(name, 4096)
        for _ in range(2):
            with pytest.raises(sw.SepweightError, match=rf"{name}: changed on disk while in use \(now 4096 bytes"):
                part(ids)
    part.close()


def test_quantized_streamed_scales_are_not_kept_prepared(sep, tmp_path):
    """The int kernels cache prepared scales per tensor object while it lives: a long-lived view would keep
    them (a transposed copy of every streamed int4 scale) for good; each use gets tensor objects of its own."""
    src, _ = sep("qwen2")
    sw.convert(src, tmp_path / "int4", quant="int4", group_size=32, progress=False, fsync=False)
    part = load_part(tmp_path / "int4", lazy=True, stream_mode="mmap", head_chunk_size=128, prefetch=0)
    gc.collect()
    before = len(quant_mod._prepared)
    with torch.no_grad():
        for _ in range(2):
            part(token_ids(seq=1))
    gc.collect()
    assert len(quant_mod._prepared) == before
    part.close()


def test_without_rss_release_each_use_maps_afresh(sep, monkeypatch):
    """Where MADV_DONTNEED cannot drop pages from RSS (not Linux), a long-lived mapping would keep the whole
    model resident: each use maps the item afresh instead (unmapped when retired), as exact."""
    path, _ = sep("qwen2_tied")
    monkeypatch.setattr(sw.FileMapping, "RELEASES_RSS", False)
    ram = load_part(path, head_chunk_size=100)
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=100)
    ids = token_ids(seq=7)
    with torch.no_grad():
        torch.testing.assert_close(decode(part, ids, 2), decode(ram, ids, 2), **FP32)
    assert part._streamer._mappings == {}
    part.close()
    ram.close()


@pytest.mark.parametrize("warm", [True, False])
def test_cached_items_are_mapped_where_used_and_cold_ones_prefetched(sep, monkeypatch, warm):
    """Populating pages the page cache holds costs less than handing it to the prefetch thread on busy cores:
    items found cached are mapped by get() itself; items read from disk are prefetched. Exact either way."""
    path, _ = sep("qwen2_tied")
    (_always_warm if warm else _never_warm)(monkeypatch)
    ram = load_part(path, head_chunk_size=100)
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=100, prefetch=1)
    streamer = part._streamer
    submitted: list[object] = []
    real_submit = streamer._pool.submit
    monkeypatch.setattr(streamer._pool, "submit", lambda fn, *a: submitted.append(a) or real_submit(fn, *a))
    ids = token_ids(seq=7)
    with torch.no_grad():
        torch.testing.assert_close(part(ids), ram(ids), **FP32)  # the first use of each item
        submitted.clear()
        for _ in range(2):
            torch.testing.assert_close(part(ids), ram(ids), **FP32)
    assert streamer._warm == (set(streamer.order) if warm else set())
    loads = [a[0] for a in submitted if a and a[0] in streamer._index]
    assert loads == [] if warm else len(loads) == 2 * len(streamer.order)
    part.close()
    ram.close()


def test_an_evicted_warm_item_is_prefetched_again(sep, monkeypatch):
    path, _ = sep("qwen2")
    part = load_part(path, lazy=True, stream_mode="mmap", head_chunk_size=128, prefetch=1)
    streamer = part._streamer
    ids = token_ids(seq=5)
    _always_warm(monkeypatch)
    with torch.no_grad():
        part(ids)
        assert streamer._warm == set(streamer.order) and not streamer._pending
        _never_warm(monkeypatch)  # its next populate reads from disk
        part(ids)
        assert streamer._warm == set() and streamer._pending  # the next forward's first item is prefetched
    part.close()
