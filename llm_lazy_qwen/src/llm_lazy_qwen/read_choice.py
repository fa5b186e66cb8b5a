"""How a budgeted part's streamed reads go: ``O_DIRECT``, or through the page cache with readahead.

Both leave the page cache as it was (llm_sepweight's ``read_into(drop_cache=True, direct=...)``).
Which is faster depends on the disk and its driver: on a virtio disk with 8 MiB readahead, 4 readers
got 2.0 GB/s through the cache and 1.2 GB/s with ``O_DIRECT``; on another machine ``O_DIRECT`` was
9% faster. So the first streamed reads try both ways in turn, timing only reads that ran alone, and
the faster (bytes per second) is kept for good.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ReadChoice:
    """Picks ``direct`` for each read until both ways have been timed ``trials`` times, then the faster.

    Example::

        choice = ReadChoice()
        with choice.read(nbytes) as direct:
            source.read_into(part, buf, threads=4, drop_cache=True, direct=direct)
        choice.direct   # None while trying, then True (O_DIRECT) or False (page cache + readahead)
    """

    def __init__(self, trials: int = 3, min_bytes: int = 8 << 20, direct: bool | None = None) -> None:
        self.trials, self.min_bytes = trials, min_bytes
        self.direct = direct  # the choice once made (or given)
        self.rates: dict[bool, list[float]] = {True: [], False: []}  # GB/s of each timed read
        self._lock = threading.Lock()
        self._reading = 0  # reads in progress
        self._started = 0  # reads started so far

    def _pick(self) -> bool:
        if self.direct is not None:
            return self.direct
        return len(self.rates[True]) <= len(self.rates[False])  # alternate, O_DIRECT first

    @contextmanager
    def read(self, nbytes: int) -> Iterator[bool]:
        """The way to read `nbytes` now; the read is timed when nothing else read meanwhile."""
        with self._lock:
            direct = self._pick()
            self._reading += 1
            self._started += 1
            mine, alone = self._started, self._reading == 1
        t0 = time.perf_counter()
        try:
            yield direct
        finally:
            seconds = time.perf_counter() - t0
            with self._lock:
                self._reading -= 1
                alone = alone and self._started == mine
                if self.direct is None and alone and nbytes >= self.min_bytes and seconds > 0:
                    self.rates[direct].append(nbytes / seconds / 1e9)
                    if min(len(r) for r in self.rates.values()) >= self.trials:
                        self.direct = _median(self.rates[True]) >= _median(self.rates[False])


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]
