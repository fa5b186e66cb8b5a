"""Page-cache huge pages for streamed weights (Linux; a no-op elsewhere).

A lazy runner maps each layer, uses it and unmaps it again, every token. With the page cache in
4 KiB pages, mapping and unmapping 1 GB costs ~0.1 core-seconds (250k page-table entries), about as
much as copying it. When the kernel holds the file's pages as 2 MiB folios (ext4/xfs/btrfs with large
folios, transparent huge pages not ``never``), a mapping whose address and file offset agree modulo
2 MiB is mapped by PMD entries: 512x fewer entries, ~10x cheaper per token here.

Folio sizes are decided when pages enter the cache: pages faulted in through a ``MADV_HUGEPAGE``
mapping arrive as 2 MiB folios; pages read by ``read()`` (or written) arrive small. So
:func:`hugepage_coverage` tells how much of a mapping got PMD entries, and :func:`drop_cached`
evicts a byte range so that the next prefaulted mapping (which advises ``MADV_HUGEPAGE``) reads it
back as huge folios. Eviction only drops clean pages nobody maps: it costs one re-read, never data.

:func:`read_buffer` is the other side: anonymous memory in 2 MiB pages for ``O_DIRECT`` reads. The
block layer builds a request from physically contiguous runs of the destination's pages, at most
254 of them on a virtio disk: scattered 4 KiB pages cap a request at ~1 MiB, 2 MiB pages let it reach
the disk's limit (``max_sectors_kb``, 4 MiB there). On that disk every request costs ~10 ms whatever
its size, so the same 27 MB ``O_DIRECT`` read ran at 1.0 GB/s into ``torch.empty`` memory (0.53 MiB
per request) and at 2.4-2.6 GB/s into a :func:`read_buffer` (3.3 MiB per request; 0.01 CPU s/GB),
as fast as the page cache's readahead.
"""

from __future__ import annotations

import functools
import mmap
import os
from pathlib import Path

import torch

from .mapping import madvise

_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE = 2 << 20  # a PMD-mapped folio on x86-64 / arm64 with 4 KiB base pages


@functools.cache
def hugepages_available() -> bool:
    """Whether this kernel may back file mappings with 2 MiB pages (Linux THP not ``[never]``)."""
    try:
        return "[never]" not in _THP_ENABLED.read_text()
    except OSError:
        return False


def read_buffer(nbytes: int) -> torch.Tensor:
    """A CPU ``uint8`` tensor of `nbytes` for ``read_into`` (``O_DIRECT``), in 2 MiB pages where it can be.

    Private anonymous memory aligned to 2 MiB and advised ``MADV_HUGEPAGE``, so that ``O_DIRECT``
    reads into it reach the disk as few large requests (2.5x faster on a virtio disk; see the module
    docstring). Its pages are allocated now (zeroed), so the first read pays no page faults and RSS
    grows here, not mid-decode. It uses `nbytes` rounded up to 4 KiB of memory like ``torch.empty``
    (a tail short of 2 MiB is in 4 KiB pages). Elsewhere (not Linux, transparent huge pages
    ``never``, less than 2 MiB) it is a zeroed ``torch.empty``. Freed with the last tensor viewing it.
    """
    if nbytes < 0:
        raise ValueError(f"read_buffer: nbytes must be >= 0, got {nbytes}")
    if nbytes < HUGE or not hugepages_available() or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(nbytes, dtype=torch.uint8)
    # 2 MiB of address space to spare for the alignment: never touched, so never resident
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(mm, dtype=torch.uint8)  # writable; keeps `mm` alive
    start = -base.data_ptr() % HUGE
    buf = base[start : start + nbytes]
    try:
        madvise(mm, buf.data_ptr(), mmap.MADV_HUGEPAGE, nbytes)
    except OSError:
        pass  # small pages: slower O_DIRECT reads, same bytes
    buf[::4096].zero_()  # fault every page in now (as huge pages where it can); the kernel zero-fills them
    return buf


def _smaps_entry(addr: int) -> tuple[int, int, int, str, int] | None:
    """(start, end, file offset, path, FilePmdMapped bytes) of the mapping holding `addr`, from /proc/self/smaps."""
    try:
        with open("/proc/self/smaps") as f:
            entry: tuple[int, int, int, str] | None = None
            for line in f:
                fields = line.split()
                if entry is None:
                    if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
                        lo, _, hi = fields[0].partition("-")
                        try:
                            if int(lo, 16) <= addr < int(hi, 16):
                                path = " ".join(fields[5:]) if len(fields) > 5 else ""
                                entry = (int(lo, 16), int(hi, 16), int(fields[2], 16), path)
                        except ValueError:
                            continue
                elif fields and fields[0] == "FilePmdMapped:":
                    return (*entry, int(fields[1]) * 1024)
    except OSError:
        return None
    return None


def hugepage_coverage(tensor: torch.Tensor) -> float | None:
    """How much of what could be mapped by 2 MiB entries is: ``FilePmdMapped`` / PMD-mappable bytes.

    The mapping holding `tensor` can use a 2 MiB entry only for whole 2 MiB blocks of the file that
    lie inside it and below end of file; 1.0 means every such block is. ``None`` when unknown (not
    Linux, not a file mapping, no whole block inside). Reads /proc/self/smaps: a few milliseconds,
    meant for a one-time check per item, not per token.
    """
    entry = _smaps_entry(tensor.data_ptr())
    if entry is None:
        return None
    lo, hi, offset, path, pmd = entry
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    first = -(-offset // HUGE) * HUGE  # the first whole block inside the mapping
    last = min(offset + (hi - lo), size) // HUGE * HUGE
    mappable = max(0, last - first)
    return min(1.0, pmd / mappable) if mappable else None


def drop_cached(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Evict a file's clean, unmapped pages in ``[offset, offset + length)`` (0 = to the end) from the page cache.

    Best effort: an optimisation, so a file system that refuses (read-only, network) is left as it is.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fdatasync(fd)  # dirty pages (a file just written or copied) cannot be dropped until written back
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
