"""Page-cache huge pages for streamed weights (Linux; a no-op elsewhere).

A lazy runner maps each layer, uses it and unmaps it again, every token. With the page cache in
4 KiB pages, mapping and unmapping 1 GB costs ~0.1 core-seconds (250k page-table entries), about as
much as copying it. When the kernel holds the file's pages as 2 MiB folios (ext4/xfs/btrfs with large
folios, transparent huge pages not ``never``), a mapping whose address and file offset agree modulo
2 MiB is mapped by PMD entries: 512x fewer entries, ~10x cheaper per token here.

Folio sizes are decided when pages enter the cache: pages faulted in through a ``MADV_HUGEPAGE``
mapping arrive as 2 MiB folios; pages read by ``read()`` (or written) arrive small. So
:func:`hugepage_fraction` tells how much of a mapping got PMD entries, and :func:`drop_cached`
evicts a byte range so that the next prefaulted mapping (which advises ``MADV_HUGEPAGE``) reads it
back as huge folios. Eviction only drops clean pages nobody maps: it costs one re-read, never data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def hugepages_available() -> bool:
    """Whether this kernel may back file mappings with 2 MiB pages (Linux THP not ``[never]``)."""
    try:
        return "[never]" not in _THP_ENABLED.read_text()
    except OSError:
        return False


def hugepage_fraction(tensor: torch.Tensor) -> float | None:
    """Fraction of the mapping holding `tensor` that is mapped by 2 MiB entries (``FilePmdMapped``).

    ``None`` when unknown (not Linux, or the tensor is not in a file mapping). Reads /proc/self/smaps:
    a few milliseconds, meant for a one-time check per file, not per token.
    """
    addr = tensor.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            size = 0
            for line in f:
                if not inside:
                    head = line.split(" ", 1)[0]
                    if "-" in head and not head.endswith(":"):
                        lo, _, hi = head.partition("-")
                        try:
                            inside = int(lo, 16) <= addr < int(hi, 16)
                        except ValueError:
                            inside = False
                    continue
                key, _, value = line.partition(":")
                if key == "Size":
                    size = int(value.split()[0])
                elif key == "FilePmdMapped":
                    return int(value.split()[0]) / size if size else None
    except OSError:
        return None
    return None


def drop_cached(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Evict a file's clean, unmapped pages in ``[offset, offset + length)`` (0 = to the end) from the page cache."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages (a file just written or copied) cannot be dropped until written back
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
