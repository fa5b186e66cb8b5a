"""Lazy streaming: a background thread reads the next layers / head chunks while the current one runs.

Two ways to bring an item (a layer, or a vocabulary chunk of the head) in:

- ``"mmap"`` (the default on CPU): each item is mapped read-only once (``SepWeights.mapping``); all
  its pages are mapped before each use (``MADV_POPULATE_READ``: by the worker for items last found
  out of the page cache, by ``get`` itself for items found cached, where a prefetch thread on busy
  cores costs more than it hides) and retiring it drops them from RSS again (``MADV_DONTNEED``, on
  the retiring thread: no mmap / munmap per use). No anonymous memory
  and no copy: the matmuls read the page cache directly. The first time an item is used, if its pages
  sit in the page cache as 4 KiB pages, they are evicted once and read back as 2 MiB pages
  (``hugepages=True``; see ``llm_sepweight.hugepages``): a 1 GB model's pages are then mapped and
  dropped per token in ~2 ms of syscalls instead of ~100 ms in 4 KiB pages.
- ``"copy"`` (the default on CUDA): ``pread`` the item's bytes into one of a few reusable buffers
  (pinned on CUDA, then a non-blocking copy to the device on a side stream). Nothing is mapped per
  token; anonymous memory is the buffer pool (``prefetch + 2`` items), and every byte is copied.

Items are prefetched in a fixed cyclic order: a part's layers, then its head chunks, then its
first layers again for the next token; requests in reverse order (a layer-wise backward) are
prefetched in reverse, and prefetched items that fall out of the window are dropped. ``resident_bytes`` pins items (kept for good, never
re-read) greedily in that order: a knob between lowest memory and in-RAM speed.

Under a memory budget (a :class:`~llm_lazy_qwen.budget.MemoryPlan`) each linear of a layer streams
as row slabs (:func:`layer_slabs`; used one at a time by ``SlabLinear``, in the order of use) and a
layer's norms and biases are one small item kept resident; the plan says which items are resident and
the rest streams in copy mode: resident items are read once into anonymous memory,
streamed ones into the reusable buffers, both with ``O_DIRECT`` (no page cache, no copy; where the
file system refuses it, ``pread`` s that evict each slab from the page cache right after reading it).
So the page cache never grows and never evicts anything the part needs: in a box smaller than the
model, only the streamed bytes are read per token.
No ``gc.collect()`` anywhere: buffers are reused explicitly.

Items, their places and sizes: stream_items.py; the mappings of mmap mode: stream_mmap.py.
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from llm_sepweight import FileMapping, SepweightError, SepWeights, read_buffer

from .budget import Item, MemoryPlan
from .read_choice import WAYS, ReadChoice
from .stream_items import (
    SMALL,
    USE_ORDER,
    Rows,
    Tensors,
    _stored,
    _unit,
    _where,
    head_keys,
    is_head_chunk,
    item_size,
    layer_slabs,
)
from .stream_mmap import MmapItems

# what part.py, head.py, loading.py, tests and benchmarks import from here (item helpers re-exported)
__all__ = [
    "READERS",
    "READ_PIECE",
    "SMALL",
    "USE_ORDER",
    "LayerStreamer",
    "Mode",
    "is_head_chunk",
    "item_size",
    "layer_slabs",
]

Mode = Literal["auto", "copy", "mmap"]
READERS = max(readers for _, readers in WAYS)  # the most concurrent preads per item under a budget
READ_PIECE = 16 << 20  # page cache read_into's fallback (no O_DIRECT) holds at a time: its piece
_ALIGN = 64  # copy mode: each tensor of a head chunk starts at a multiple of this in the buffer


class LayerStreamer(MmapItems):
    """Hands out weights in a fixed cyclic order, keeping `prefetch` upcoming items in flight.

    ``get`` / ``retire`` may be called from several threads: each ``get`` returns weights of its own
    (or the shared ones of a pinned item) until they are retired.
    """

    def __init__(
        self,
        source: SepWeights,
        order: list[Item],
        device: torch.device,
        dtype: torch.dtype,
        prefetch: int = 1,
        resident_bytes: int = 0,
        mode: Mode = "auto",
        hugepages: bool = True,
        plan: MemoryPlan | None = None,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if resident_bytes < 0:
            raise ValueError(f"resident_bytes must be >= 0, got {resident_bytes}")
        if mode not in ("auto", "copy", "mmap"):
            raise ValueError(f"stream mode must be 'auto', 'copy' or 'mmap', got {mode!r}")
        if plan is not None:  # a budget: copy mode, nothing re-cached, the page cache dropped as it is read
            mode, hugepages = "copy", False
        if mode == "auto":
            mode = "copy" if device.type == "cuda" else "mmap"
        self.plan = plan
        # under a budget: O_DIRECT or the page cache with readahead, whichever reads faster here
        self.read_choice = ReadChoice()
        self.bytes_read = 0  # stored bytes of the items read (copy mode) or mapped (mmap mode) so far
        self.source, self.order, self.device, self.dtype = source, order, device, dtype
        self._head_keys = head_keys(source) if any(is_head_chunk(i) for i in order) else []
        self._places: dict[Item, tuple[int | str, Rows | None]] = {}  # _where, cached
        self.prefetch, self.mode = prefetch, mode
        self._init_mmap(hugepages and mode == "mmap")
        self._index = {item: i for i, item in enumerate(order)}
        # units: the slabs of one linear (in order), or one item; the direction of traversal (forward, or
        # a backward: layers and a layer's linears in reverse) applies to units; a unit's slabs always go forward
        self._units: list[list[Item]] = []
        for item in order:
            if not self._units or _unit(item) is None or _unit(item) != _unit(self._units[-1][0]):
                self._units.append([])
            self._units[-1].append(item)
        self._unit_of = {item: (u, p) for u, unit in enumerate(self._units) for p, item in enumerate(unit)}
        self._windows: dict[tuple[Item, int], list[Item]] = {}  # (item, direction) -> _window
        self._step = 1  # the direction of traversal over units
        self.pinned: set[Item] = set(plan.resident) if plan is not None else set()
        budget = 0 if plan is not None else resident_bytes
        for item in order:
            if self._nbytes(item) <= budget:
                self.pinned.add(item)
                budget -= self._nbytes(item)
        self._kept: dict[Item, Tensors] = {}
        self._kept_ids: set[int] = set()  # id() of each dict in _kept: retire checks it per item (~20 a layer)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm_lazy_qwen-prefetch")
        self._pending: dict[Item, Future[Tensors]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # under a budget reads bypass the page cache (O_DIRECT) given this much spare room per read
        self._slack = source.READ_SLACK if plan is not None else 0
        # copy mode: a pool of byte buffers, one per item in flight (+ the ones in use)
        self._buffer_bytes = max((self._room(i) for i in order if i not in self.pinned), default=0)
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._allocated = 0
        self._lock = threading.Lock()
        self._buffer_of: dict[int, torch.Tensor] = {}  # id(returned dict) -> its buffer
        # CUDA: id(returned dict) -> event after its copies (the consumer's stream waits on it);
        # id(pinned buffer) -> event after the copy out of it (the buffer is refilled only after it)
        self._ready: dict[int, torch.cuda.Event] = {}
        self._copied: dict[int, torch.cuda.Event] = {}
        self._last: Item | None = None  # the previous request: tells the direction of traversal
        # get / retire / close may come from several threads (and retire from the worker's callbacks):
        # this guards their bookkeeping (_pending, _kept, _last). Never held while waiting for the worker.
        self._state = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------------------- sizes
    def _where(self, item: Item) -> tuple[int | str, Rows | None]:
        place = self._places.get(item)
        if place is None:
            place = self._places[item] = _where(self.source, item, self._head_keys)
        return place

    def _room(self, item: Item) -> int:
        """Buffer bytes an item is read into: its stored bytes, each tensor read separately (rows of the
        head, slabs of a layer) aligned, and the spare bytes each O_DIRECT read needs."""
        rows = self._where(item)[1]
        return self._stored_nbytes(item) + _ALIGN * len(rows or ()) + self._slack * len(rows or [None])

    def _stored_nbytes(self, item: Item) -> int:
        return _stored(self.source, *self._where(item))

    def _nbytes(self, item: Item) -> int:
        """Bytes the item occupies in the compute dtype."""
        return item_size(self.source, item, self.dtype).resident

    # ------------------------------------------------------------------------------- loading (worker thread)
    def _buffer(self) -> torch.Tensor:
        """A free buffer, or a new one: never blocks, so no access pattern can deadlock the worker.
        For the access pattern the window expects, ``prefetch + 2`` buffers are all that exist."""
        try:
            buf = self._free.get_nowait()
            copied = self._copied.pop(id(buf), None)
            if copied is not None:
                copied.synchronize()  # the device copy out of it may still be in flight
            return buf
        except queue.Empty:
            with self._lock:
                self._allocated += 1
            if self._stream is not None:
                return torch.empty(self._buffer_bytes, dtype=torch.uint8).pin_memory()
            return read_buffer(self._buffer_bytes)  # 2 MiB pages: O_DIRECT reads in large requests

    def _read(self, item: Item) -> tuple[Tensors, torch.Tensor | None]:
        with self._lock:
            self.bytes_read += self._stored_nbytes(item)
        part, rows = self._where(item)
        if item in self.pinned:
            if self.plan is None:
                return self._map(item), None
            # resident under a budget: anonymous memory of its own, read once
            own = read_buffer(self._room(item))
            return self._read_budgeted(item, part, own, rows), None
        if self.mode == "mmap":  # (where a release cannot drop pages from RSS: a fresh mapping per use)
            return (self._mapped(item) if FileMapping.RELEASES_RSS else self._map(item)), None
        buf = self._buffer()
        if self.plan is not None:
            return self._read_budgeted(item, part, buf, rows), buf
        return self._read_into(part, buf, rows, {}), buf

    def _read_budgeted(self, item: Item, part: int | str, buf: torch.Tensor, rows: Rows | None) -> Tensors:
        """Under a budget: the page cache left as it was; O_DIRECT or readahead, and the readers, as timed."""
        with self.read_choice.read(self._stored_nbytes(item)) as (direct, readers):
            return self._read_into(part, buf, rows, {"threads": readers, "drop_cache": True, "direct": direct})

    def _read_into(self, part: int | str, buf: torch.Tensor, rows: Rows | None, how: dict) -> Tensors:
        """A layer, or the rows of each tensor of a head chunk / slab / small item one after the other (aligned)."""
        if rows is None:
            return self.source.read_into(part, buf, None, **how)
        out, at = {}, 0
        for r in rows:
            nbytes = self.source.nbytes(part, r)
            out.update(self.source.read_into(part, buf[at : at + nbytes + self._slack], r, **how))
            at += -(-(nbytes + self._slack) // _ALIGN) * _ALIGN
        return out

    def _load(self, item: Item) -> Tensors:
        # kept tensors (resident items, the long-lived mappings' views) outlive this call: never make
        # them inference tensors, even when the first use runs under torch.inference_mode (a forward
        # with autograd could not use them later); the prefetch thread is never in inference mode
        with torch.inference_mode(False):
            return self._load_item(item)

    def _load_item(self, item: Item) -> Tensors:
        tensors, buf = self._read(item)
        convert = any(t.is_floating_point() and t.dtype != self.dtype for t in tensors.values())
        if self._stream is not None:
            # no host sync: the consumer's stream waits on `ready` (see _handoff), so the copies
            # overlap the kernels queued there; the blocks are allocated on the side stream
            with torch.cuda.stream(self._stream):
                out = {k: t.to(self.device, non_blocking=True) for k, t in tensors.items()}
                out = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in out.items()}
                ready = self._stream.record_event()
            self._ready[id(out)] = ready
            if buf is not None:
                self._copied[id(buf)] = ready
        elif convert:
            out = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        else:
            out = tensors
        if buf is not None:
            if out is tensors or any(out[k] is tensors[k] for k in out):  # (ints are not converted)
                self._buffer_of[id(out)] = buf  # in use until retired
            else:
                self._free.put(buf)  # the data was copied out; the buffer is free again
        elif self.mode == "mmap":
            self._release(tensors, out)  # converted (or copied to the device): the pages are not used again
        return out

    # ------------------------------------------------------------------------------- compute thread
    def _handoff(self, tensors: Tensors, keep: bool = False) -> Tensors:
        """CUDA: order the side stream's copies before their use on the caller's current stream,
        and tell the allocator the tensors are used there: when they are freed (on the worker, or
        when autograd lets go), their blocks are not handed to the next prefetch before the
        kernels queued on this stream so far have run. ``keep`` (items kept for good, which any
        stream may use later): also wait on the host, once."""
        ready = self._ready.pop(id(tensors), None)
        if ready is None:
            return tensors
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        if keep:
            ready.synchronize()
        for t in tensors.values():
            t.record_stream(consumer)
        return tensors

    def _window(self, item: Item, step: int) -> list[Item]:
        """The next `prefetch` streamed (not pinned) items after `item`: the rest of its unit, then the
        units after it cyclically in direction `step` (each unit's items in order)."""
        known = self._windows.get((item, step))
        if known is not None:  # what is pinned never changes: each window is found once (a walk over every
            return known  # item when all are resident, and under a budget there are ~20 items per layer)
        (u, p), n, out = self._unit_of[item], len(self._units), []
        following = itertools.chain(  # lazily: stops at the first `prefetch` streamed items
            self._units[u][p + 1 :], itertools.chain.from_iterable(self._units[(u + step * k) % n] for k in range(1, n))
        )
        for nxt in following:
            if len(out) == self.prefetch:
                break
            if nxt not in self.pinned and nxt != item:
                out.append(nxt)
        self._windows[item, step] = out
        return out

    def get(self, item: Item) -> Tensors:
        """The weights of `item` (waits for its prefetch), and start prefetching the ones after it.

        The direction follows the caller: items requested in reverse order (a layer-wise backward)
        are prefetched in reverse. Prefetched items that fall out of the window are dropped.
        """
        if item not in self._index:
            raise KeyError(f"{item!r} is not streamed by this part")
        with self._state:
            units, unit = len(self._units), self._unit_of[item][0]
            last = self._unit_of[self._last][0] if self._last is not None else None
            if last is not None and unit != last:  # items of one unit keep the direction
                self._step = -1 if units > 2 and unit == (last - 1) % units else 1
            backward = self._step == -1
            self._last = item
            window = [] if self._closed else self._window(item, -1 if backward else 1)  # closed: no worker
            for other in [i for i in self._pending if i != item and i not in window]:
                fut = self._pending.pop(other)
                if not fut.cancel():  # already loading or loaded: hand its buffer back when done
                    fut.add_done_callback(lambda f: None if f.exception() else self.retire(f.result()))
            for nxt in window:
                if nxt not in self._pending and nxt not in self._warm:  # (mmap mode: warm ones are mapped here)
                    self._pending[nxt] = self._pool.submit(self._load, nxt)
            if item in self.pinned:
                if item not in self._kept:
                    self._kept[item] = self._handoff(self._load(item), keep=True)
                    self._kept_ids.add(id(self._kept[item]))
                kept = self._kept[item]
            else:
                kept = None
                fut = self._pending.pop(item, None)
        if kept is not None:
            self._unchanged(item)
            return kept
        tensors = fut.result() if fut is not None else self._load(item)
        self._unchanged(item, tensors)
        return self._handoff(tensors)

    def _unchanged(self, item: Item, tensors: Tensors | None = None) -> None:
        """Check the item's file is unchanged since the folder was opened, before `tensors` read or mapped
        earlier (a prefetch) are used: not after a re-conversion, and never touched if the file was
        truncated meanwhile (a SIGBUS in mmap mode). A ``SepweightError`` naming the file otherwise."""
        part, rows = self._where(item)
        try:
            self.source.check_unchanged(part, rows[0][0] if rows else None)
        except SepweightError:
            if tensors is not None:
                self.retire(tensors)
            raise

    def retire(self, tensors: Tensors, reuse: bool = True) -> None:
        """Give used weights back. Copy mode: the buffer is reused (``reuse=False`` when autograd may
        still hold views of it: then a fresh buffer replaces it). Mmap mode: the item's pages leave RSS
        now (its mappings stay for the next use). Pinned items are kept."""
        with self._state:
            if id(tensors) in self._kept_ids:  # (the dicts in _kept live, so their ids are theirs)
                return
            self._ready.pop(id(tensors), None)  # a prefetch dropped unused: never used off the side stream
            buf = self._buffer_of.pop(id(tensors), None)
            if buf is not None:
                if reuse:
                    self._free.put(buf)
                else:
                    with self._lock:
                        self._allocated -= 1  # autograd owns it now; a new buffer will be allocated
            elif self._release(tensors):
                pass  # mmap mode: one madvise per mapping, here (~15 us a layer in 2 MiB pages)
            elif self._closed:
                tensors.clear()  # the worker is gone: unmap here
            else:
                self._pool.submit(tensors.clear)

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._kept.clear()
            self._kept_ids.clear()
            self._mappings.clear()  # unmapped as the last views go
            self._views.clear()
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True)  # its callbacks retire what it was loading: not under _state
