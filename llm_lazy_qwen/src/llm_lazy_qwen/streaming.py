"""Lazy layer streaming: a background thread maps/converts the next layers while the current one runs.

For each layer the worker opens its sepweight file (a private memory map), asks the kernel to read
it ahead, touches every page so the compute thread never faults, and converts to the compute
dtype / copies to the device when needed. The compute thread takes the finished layer, uses it and
drops it; dropping the last reference unmaps the file (no ``gc.collect()``; the mapping's pages
are file-backed, so "releasing" costs nothing and leaves them in the page cache for the next token).
The order is cyclic: after the part's last layer come its first ones, for the next token.
"""

from __future__ import annotations

import mmap
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from llm_sepweight import SepWeights

Tensors = dict[str, torch.Tensor]
_PAGE = mmap.PAGESIZE


def _prefault(t: torch.Tensor) -> None:
    """Read one byte per page so the pages are mapped before compute touches them."""
    if t.numel() == 0:
        return
    flat = t.reshape(-1).view(torch.uint8)
    flat[:: _PAGE].max()  # strided read: one byte of every page


class LayerStreamer:
    """Hands out layer weights in order, keeping `prefetch` upcoming layers in flight."""

    def __init__(
        self,
        source: SepWeights,
        order: list[int],
        device: torch.device,
        dtype: torch.dtype,
        prefetch: int = 2,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.source, self.order, self.device, self.dtype, self.prefetch = source, order, device, dtype, prefetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm_lazy_qwen-prefetch")
        self._pending: dict[int, Future[Tensors]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _load(self, layer: int) -> Tensors:
        tensors = self.source.layer(layer)  # zero-copy views of a fresh private mapping
        out: Tensors = {}
        for k, t in tensors.items():
            if t.dtype != self.dtype and t.is_floating_point():
                t = t.to(self.dtype)  # converted copy: anonymous memory, freed after use
            else:
                _prefault(t)
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    t = t.pin_memory().to(self.device, non_blocking=True)
            out[k] = t
        if self._stream is not None:
            self._stream.synchronize()
        return out

    def _schedule(self, after: int) -> None:
        n = len(self.order)
        pos = self.order.index(after)
        for step in range(1, min(self.prefetch, n - 1) + 1) if n > 1 else ():
            nxt = self.order[(pos + step) % n]
            if nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._load, nxt)

    def get(self, layer: int) -> Tensors:
        """The weights of `layer` (waits for its prefetch), and start prefetching the ones after it."""
        fut = self._pending.pop(layer, None)
        self._schedule(layer)
        return fut.result() if fut is not None else self._load(layer)

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
