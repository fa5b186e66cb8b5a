"""How a budgeted part's streamed reads go: ``O_DIRECT`` or through the page cache, and how many readers.

Both leave the page cache as it was (llm_sepweight's ``read_into(drop_cache=True, direct=...)``).
Which way is faster depends on the disk and its driver. Measured on one virtio disk (8 MiB readahead),
136 MB pieces: ``O_DIRECT`` 1.6 GB/s with 2, 4 or 8 readers; the page cache with readahead 2.0 GB/s
with 1 reader, 1.8 with 2, 1.5 with 4 (the kernel's readahead is the concurrency); on another machine
``O_DIRECT`` was 9% faster than the page cache. And reading through the page cache costs CPU time
(copies, page cache bookkeeping) that a decode on a few cores needs for its matmuls: 0.7-1.3 CPU
seconds per GB here, against 0.06 for ``O_DIRECT`` (its DMA lands in the buffer); in the 8 GiB box
the 7B decode took 6.2 s/token through the page cache and 3.9 with ``O_DIRECT``, although the page
cache read faster alone. So the first streamed reads try each way in turn, timing only reads that ran
alone, and the way with the least seconds per byte counting both (wall time + the readers' CPU time,
``llm_sepweight.read_cpu_seconds``; median over its reads) is kept for good. (Those ``O_DIRECT`` reads
went into 4 KiB pages; into the 2 MiB pages of ``llm_sepweight.read_buffer``, which the streamer's
buffers now are, ``O_DIRECT`` read 27 MB slabs at 2.3-2.6 GB/s on that disk, as fast as the page cache.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from llm_sepweight import read_cpu_seconds

Way = tuple[bool, int]  # (O_DIRECT, concurrent readers)
# O_DIRECT with one reader: one pread of a 27 MB slab already reaches the disk as ~7 requests of 4 MiB in flight
# (into read_buffer's 2 MiB pages). 4 readers per slab made the 7B bf16 decode 13% slower (3.46 against 3.0
# s/token, two runs each): a thread pool per read, and 4 threads competing with the compute for 2 cores.
WAYS: tuple[Way, ...] = ((True, 1), (False, 1), (False, 2), (False, 4))


class ReadChoice:
    """Picks the way of each read until every way has been timed ``trials`` times, then the cheapest:
    the least wall + reader CPU seconds per byte (``costs``; ``rates`` keeps the GB/s of each read).

    Example::

        choice = ReadChoice()
        with choice.read(nbytes) as (direct, readers):
            source.read_into(part, buf, threads=readers, drop_cache=True, direct=direct)
        choice.way   # None while trying, then e.g. (False, 1): the page cache, one reader
    """

    def __init__(
        self, trials: int = 3, min_bytes: int = 8 << 20, ways: Sequence[Way] = WAYS, way: Way | None = None
    ) -> None:
        if not ways:
            raise ValueError("ReadChoice needs at least one way to read")
        self.trials, self.min_bytes, self.ways = trials, min_bytes, tuple(ways)
        self.way = way  # the choice once made (or given)
        self.rates: dict[Way, list[float]] = {w: [] for w in self.ways}  # GB/s of each timed read
        self.costs: dict[Way, list[float]] = {w: [] for w in self.ways}  # its wall + reader CPU s per GB
        self._lock = threading.Lock()
        self._reading = 0  # reads in progress
        self._started = 0  # reads started so far

    def _pick(self) -> Way:
        if self.way is not None:
            return self.way
        return min(self.ways, key=lambda w: len(self.rates[w]))  # round robin, in the order given

    @contextmanager
    def read(self, nbytes: int) -> Iterator[Way]:
        """The way to read `nbytes` now; the read is timed when nothing else read meanwhile."""
        with self._lock:
            way = self._pick()
            self._reading += 1
            self._started += 1
            mine, alone = self._started, self._reading == 1
        t0, cpu0 = time.perf_counter(), read_cpu_seconds()
        try:
            yield way
        finally:
            seconds, cpu = time.perf_counter() - t0, read_cpu_seconds() - cpu0
            with self._lock:
                self._reading -= 1
                alone = alone and self._started == mine
                if self.way is None and alone and nbytes >= self.min_bytes and seconds > 0:
                    self.rates[way].append(nbytes / seconds / 1e9)
                    self.costs[way].append((seconds + cpu) / nbytes * 1e9)
                    if min(len(r) for r in self.rates.values()) >= self.trials:
                        self.way = min(self.ways, key=lambda w: _median(self.costs[w]))


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]
