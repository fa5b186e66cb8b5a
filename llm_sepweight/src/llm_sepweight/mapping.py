"""Long-lived read-only mappings whose pages are mapped before each use and dropped after it.

A lazy runner uses every layer once per token. Mapping and unmapping a layer file each time costs a
syscall pair, a fresh set of tensor views (Python work, holding the GIL against the compute thread)
and a TLB shootdown per unmap. A :class:`FileMapping` is made once: its tensors stay valid views
for the object's life; :meth:`~FileMapping.populate` maps every page (reading from disk what is not
cached) in one ``madvise(MADV_POPULATE_READ)``, and :meth:`~FileMapping.release` drops them from
the page tables again (``MADV_DONTNEED``): the process's RSS falls back as after an unmap, the
address range stays reserved, and the next use maps the page-cache pages again.

``MADV_DONTNEED`` on a private file mapping that was never written (the views are read-only) only
zaps page-table entries: what the views read afterwards is still the file's bytes, so a release
racing with a reader costs re-faults, never wrong data.

:func:`madvise` calls the C library with the GIL released: Python's ``mmap.madvise`` holds it, so a
populate reading from disk stalled every other Python thread (the compute thread of a lazy runner).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Callable

import torch

from .errors import SepweightError

MADV_POPULATE_READ = 22  # Linux >= 5.14; Python < 3.13 has no constant for it
_EINVAL = 22

if sys.platform.startswith("linux"):
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)  # ctypes releases the GIL around the call
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
else:
    _libc = None


def madvise(mm: mmap.mmap, address: int, advice: int, length: int | None = None) -> None:
    """``madvise`` over `length` bytes at `address` inside `mm` (default: all of `mm`, mapped at
    `address`) without holding the GIL; OSError on failure."""
    if _libc is None:
        if length is not None:
            raise OSError(errno.ENOSYS, "madvise of part of a mapping needs Linux")
        mm.madvise(advice)
        return
    if _libc.madvise(address, len(mm) if length is None else length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_populate_works = True  # until a kernel says EINVAL: then MADV_WILLNEED (readahead, no page tables)


class FileMapping:
    """A read-only mapping of a part file (or of some rows of one of its tensors) made once and reused.

    Made by :meth:`llm_sepweight.SepWeights.mapping`. ``tensors`` are views of it; touch them only
    between :meth:`populate` (which checks the file is unchanged first) and the matching
    :meth:`release`. Views may be kept past a release: they read the file again when touched.
    ``RELEASES_RSS``: whether :meth:`release` takes the pages out of RSS on this platform (Linux).

    Example::

        layer = SepWeights("qwen-sep").mapping(3)   # nothing in RSS yet
        layer.populate()                            # every page mapped (read from disk if needed)
        y = x @ layer.tensors["mlp.up_proj.weight"].T
        layer.release()                             # out of RSS again; layer.tensors stay valid
    """

    RELEASES_RSS = _libc is not None

    def __init__(
        self,
        mm: mmap.mmap | None,
        base: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        path: str,
        check: Callable[[], object],
    ) -> None:
        # `base`: all of `mm` as one tensor (its address; it keeps `mm` mapped while we live);
        # `check`: raises SepweightError if the file changed since its folder was opened (one stat)
        self._mm, self._base, self.tensors, self.path, self._check = mm, base, tensors, path, check
        self.nbytes = len(mm) if mm is not None else 0  # bytes mapped (its RSS when populated)

    def populate(self) -> None:
        """Map every page now, after checking the file is the one the folder was opened with.

        A file truncated or replaced since is a :class:`SepweightError` naming it, before any page is
        touched (touching a page past the end of a truncated file is a SIGBUS); so is one truncated
        while populating (the kernel then fails the call instead of signalling).
        """
        global _populate_works
        if self._mm is None or self._base is None:  # nothing to map
            return
        self._check()  # a truncated file is never touched (past its end: SIGBUS); after this, EFAULT
        try:
            if _populate_works:
                try:
                    madvise(self._mm, self._base.data_ptr(), MADV_POPULATE_READ)
                    return
                except OSError as e:
                    if e.errno != _EINVAL:  # EINVAL: a kernel before 5.14; anything else is the file's
                        raise
                    _populate_works = False
            madvise(self._mm, self._base.data_ptr(), mmap.MADV_WILLNEED)
        except OSError as e:
            self._check()  # a file changed meanwhile is reported as that change
            raise SepweightError(f"{self.path}: mapping its pages failed ({e}); run `llm-sepweight verify`") from e

    def release(self) -> None:
        """Drop the pages from this process's page tables (its RSS); the page cache keeps them."""
        if self.RELEASES_RSS and self._mm is not None and self._base is not None:
            madvise(self._mm, self._base.data_ptr(), mmap.MADV_DONTNEED)
