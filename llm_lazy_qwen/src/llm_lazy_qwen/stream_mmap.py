"""Mmap mode of :class:`~llm_lazy_qwen.streaming.LayerStreamer`: each streamed item is mapped once
(long-lived ``FileMapping`` s), its pages mapped before each use and dropped from RSS when it is retired,
and re-cached once as 2 MiB pages where the page cache holds it in 4 KiB ones (``llm_sepweight.hugepages``).
"""

from __future__ import annotations

import time

from torch import nn

from llm_sepweight import FileMapping, SepWeights, hugepage_coverage, hugepages_available

from .budget import Item
from .stream_items import Rows, Tensors

_HUGE_MIN_BYTES = 4 << 20  # smaller items cannot gain much from 2 MiB pages
# mmap mode: an item whose populate took less than this (per byte, or at all) was in the page cache;
# it is then populated where it is used rather than prefetched (see _mapped). Cached pages: ~2 us/MB
# in 2 MiB pages, ~15 in 4 KiB ones; a disk read: 500+
_WARM_S_PER_BYTE = 100e-6 / 1e6
_WARM_MIN_S = 50e-6
_RECHECK_EVERY = 512  # mappings of an item between checks: a check reads /proc/self/smaps (~3-5 ms)
_HUGE_ENOUGH = 0.99  # re-cache an item unless all its whole 2 MiB blocks are huge pages (the header
# block is read with read() first and comes in 4 KiB pages; re-cached, it joins the rest)


def _coverage(tensors: Tensors) -> float | None:
    """2 MiB-page coverage of the mapping behind a layer / head chunk (all its tensors share one)."""
    largest = max(tensors.values(), key=lambda t: t.numel() * t.element_size())
    return hugepage_coverage(largest)


class MmapItems:
    """The mapping half of a streamer (a mixin): mmap mode's long-lived mappings and their pages, and
    the fresh mappings of items kept mapped for good (pinned without a budget).

    The streamer provides ``source``, ``_where`` and ``_stored_nbytes``, and calls :meth:`_init_mmap` once.
    """

    source: SepWeights

    def _where(self, item: Item) -> tuple[int | str, Rows | None]:
        raise NotImplementedError

    def _stored_nbytes(self, item: Item) -> int:
        raise NotImplementedError

    def _init_mmap(self, hugepages: bool) -> None:
        """`hugepages`: re-cache items as 2 MiB pages (mmap mode only), where this kernel can."""
        self.hugepages = hugepages and hugepages_available()
        # hugepages: item -> mappings since its page-cache page size was last checked
        self._checked: dict[Item, int] = {}
        # mmap mode: each streamed item's long-lived mappings (made on first use, populated per use), and
        # id(returned dict) -> the mappings it views, released (dropped from RSS) when it is retired
        self._mappings: dict[Item, list[FileMapping]] = {}
        self._views: dict[Item, dict[str, nn.Parameter]] = {}  # their tensors, as Parameters made once
        self._populated: dict[int, list[FileMapping]] = {}
        self._warm: set[Item] = set()  # items whose pages were all cached when last populated

    def _map(self, item: Item) -> Tensors:
        """Zero-copy read-only views of a fresh mapping whose pages are all mapped up front."""
        part, rows = self._where(item)
        if rows is None:
            return self.source.layer(item, prefault=True)
        return {key: self.source.rows(part, key, first, stop, prefault=True) for key, first, stop in rows}

    def _mapped(self, item: Item) -> Tensors:
        """Mmap mode: views of the item's long-lived mappings (made on first use) with every page
        mapped now; :meth:`retire` drops the pages from RSS again. No mmap / munmap and no new views
        per use (24 layers of the 0.5B shape: ~1.3 ms instead of ~7 ms for fresh mappings here)."""
        maps = self._mappings.get(item)
        if maps is None:
            part, rows = self._where(item)
            maps = self._mappings[item] = [self.source.mapping(part, r) for r in rows or [None]]
            # frozen Parameters already: a part assigns them as they are (no new Parameter per use)
            views = {k: nn.Parameter(t, requires_grad=False) for m in maps for k, t in m.tensors.items()}
            self._views[item] = views
        t0 = time.perf_counter()
        for m in maps:
            m.populate()
        # On 2 busy cores a prefetch thread cannot hide a populate of cached pages (~45 us a layer): it
        # waits for a core and its hand-off costs more. get() maps warm items itself; cold ones (read
        # from disk) are prefetched. A warm item found evicted is read once here and prefetched again.
        if time.perf_counter() - t0 < max(_WARM_MIN_S, _WARM_S_PER_BYTE * sum(m.nbytes for m in maps)):
            self._warm.add(item)
        else:
            self._warm.discard(item)
        out = dict(self._views[item])
        if self.hugepages:
            self._recache(item, maps, out)
        if self.source.quant is not None:  # new tensor objects: the int kernels cache prepared scales per
            out = {k: t.detach() for k, t in out.items()}  # tensor while it lives, these views live for good
        self._populated[id(out)] = maps
        return out

    def _recache(self, item: Item, maps: list[FileMapping], tensors: Tensors) -> None:
        """The first time (and every ``_RECHECK_EVERY`` times after, since reclaim may evict pages
        that then come back small), re-cache the populated item as 2 MiB pages if it is not."""
        since = self._checked.get(item, _RECHECK_EVERY)
        if since < _RECHECK_EVERY:
            self._checked[item] = since + 1
            return
        self._checked[item] = 1
        if self._stored_nbytes(item) < _HUGE_MIN_BYTES:
            return
        coverage = _coverage(tensors)
        if coverage is None or coverage >= _HUGE_ENOUGH:
            return
        for m in maps:
            m.release()  # nothing of ours maps the pages now
        part, rows = self._where(item)
        for r in rows or [None]:
            self.source.drop_cached(part, r)
        for m in maps:
            m.populate()  # read back through a MADV_HUGEPAGE mapping: 2 MiB folios
        after = _coverage(tensors)
        if after is None or after <= coverage:
            # no gain (a file system without large folios, pages mapped elsewhere, memory too
            # fragmented): stop re-reading files for nothing and stream the pages as they are
            self.hugepages = False

    def _release(self, tensors: Tensors, out: Tensors | None = None) -> bool:
        """Mmap mode: drop the pages of the mappings behind `tensors` from RSS, or (given `out`, what
        was made of them) only if `out` holds none of their views; else `out` releases them when retired.
        False if `tensors` views no long-lived mapping."""
        maps = self._populated.pop(id(tensors), None)
        if maps is None:
            return False
        if out is not None and (out is tensors or any(out[k] is tensors[k] for k in out)):
            self._populated[id(out)] = maps
            return True
        for m in maps:
            m.release()
        return True
