"""Read safetensors files: zero-copy views of private memory maps, or ``pread`` into fresh or caller's memory.

Mapped views are copy-on-write: pages stay file-backed and the kernel may drop them under pressure.
``read_into`` fills a reusable buffer with concurrent readers and can leave the page cache as it was
(``O_DIRECT``, or evicting as it reads), for streaming a model bigger than RAM.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import SepweightError
from .hugepages import hugepages_available
from .mapping import MADV_POPULATE_READ, madvise
from .safetensors_header import Header, TensorInfo, _fail, read_header

_MADV_POPULATE_READ = MADV_POPULATE_READ  # (tests set an advice no kernel knows)
_cpu = [0.0]  # CPU seconds spent in read_into's readers so far (all threads)
_cpu_lock = threading.Lock()


def read_cpu_seconds() -> float:
    """CPU seconds :func:`read_into`'s readers have spent in this process so far, all reader threads
    together: copying out of the page cache costs CPU time that ``O_DIRECT`` (DMA into the buffer)
    does not. The difference over one read is its CPU cost (when no other read ran meanwhile).

    Example::

        before = read_cpu_seconds()
        weights.read_into(3, buf, drop_cache=True, direct=False)
        read_cpu_seconds() - before   # e.g. 0.012 s for 27 MB through the page cache
    """
    return _cpu[0]


def _timed(work: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """`work` with its thread's CPU time added to :func:`read_cpu_seconds`."""

    def run(a: int, b: int) -> None:
        t0 = time.thread_time()
        try:
            work(a, b)
        finally:
            spent = time.thread_time() - t0
            with _cpu_lock:
                _cpu[0] += spent

    return run


def _advised(f: BinaryIO, length: int, offset: int) -> mmap.mmap:
    """A read-only mapping (a writable private one would copy every page) advised for streaming.

    MADV_HUGEPAGE: pages that must come from disk arrive as 2 MiB folios, which this and later
    mappings map with PMD entries (see hugepages.py). MADV_RANDOM: no async readahead, which would
    continue in the folio size it found first (e.g. the 4 KiB ones of a header read earlier); each
    missing 2 MiB block is then read as one folio.
    """
    mm = mmap.mmap(f.fileno(), length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=offset)
    if hasattr(mmap, "MADV_HUGEPAGE") and hugepages_available():
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:
            mm.close()
            raise
    return mm


def _map(f: BinaryIO, length: int, offset: int, prefault: bool) -> torch.Tensor:
    """The mapping as one uint8 tensor (see :func:`_base`); ``prefault``: read-only, every page mapped now."""
    if prefault and hasattr(mmap, "MAP_POPULATE"):
        try:
            mm = _advised(f, length, offset)
        except OSError:
            mm = None
        if mm is not None:
            base = _base(mm)
            try:
                madvise(mm, base.data_ptr(), _MADV_POPULATE_READ)
                return base
            except OSError:
                del base, mm  # unmapped as the last reference goes
        # an older kernel: populate at mmap time instead
        flags = mmap.MAP_PRIVATE | mmap.MAP_POPULATE
        return _base(mmap.mmap(f.fileno(), length, flags=flags, prot=mmap.PROT_READ, offset=offset))
    return _base(mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=offset))


def map_unpopulated(
    path: str | os.PathLike[str], header: Header, rows: tuple[str, int, int] | None = None
) -> tuple[mmap.mmap | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A read-only mapping advised for streaming with nothing mapped yet: the ``mmap``, all of it as
    one uint8 tensor, and READ-ONLY views of the tensors in it.

    Of the whole file (views of all its tensors) or of ``rows=(key, start, stop)`` of one tensor
    (its view under `key`). ``None`` for the mapping when there are no bytes to map.
    """
    if rows is not None:
        offset, length, sub = _rows_mapping(path, header, *rows)
        if length == 0:
            return None, None, {rows[0]: torch.empty(sub.shape, dtype=sub.torch_dtype)}
        with open(path, "rb") as f:
            mm = _advised(f, length, offset)
        base = _base(mm)
        return mm, base, {rows[0]: _view(base, 0, sub)}
    if header.file_size == header.data_start:
        return None, None, {k: torch.empty(t.shape, dtype=t.torch_dtype) for k, t in header.tensors.items()}
    with open(path, "rb") as f:
        mm = _advised(f, 0, 0)
    base = _base(mm)
    return mm, base, {name: _view(base, header.data_start, t) for name, t in header.tensors.items()}


def open_tensors(
    path: str | os.PathLike[str], *, use_mmap: bool = True, header: Header | None = None, prefault: bool = False
) -> dict[str, torch.Tensor]:
    """All tensors of a file on CPU.

    With ``use_mmap`` they are zero-copy views of a private memory map (copy-on-write: writing to a
    tensor never touches the file); otherwise they are read into fresh anonymous memory. A `header`
    parsed earlier by :func:`read_header` may be passed to skip re-reading it. ``prefault`` maps
    every page up front in one system call (for streaming consumers); such views are READ-ONLY:
    writing to them is a segmentation fault.
    """
    path = Path(path)
    header = header or read_header(path)
    if not use_mmap:
        return _read_into_memory(path, header)
    if header.file_size == header.data_start:  # nothing to map (no tensors or all empty)
        return {k: torch.empty(t.shape, dtype=t.torch_dtype) for k, t in header.tensors.items()}
    with open(path, "rb") as f:
        base = _map(f, 0, 0, prefault)
    out: dict[str, torch.Tensor] = {}
    for name, t in header.tensors.items():
        out[name] = _view(base, header.data_start, t)
    return out  # each tensor keeps the mapping alive through its storage


def open_rows(
    path: str | os.PathLike[str], header: Header, name: str, start: int, stop: int, prefault: bool = False
) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor (along dim 0) as a view of a mapping of just those bytes.

    Only that byte range is mapped, so reading it (e.g. one vocabulary chunk of a head) adds at
    most its own pages to RSS, and they leave when the tensor is dropped.
    """
    offset, length, sub = _rows_mapping(path, header, name, start, stop)
    if length == 0:
        return torch.empty(sub.shape, dtype=sub.torch_dtype)
    with open(path, "rb") as f:
        base = _map(f, length, offset, prefault)
    return _view(base, 0, sub)


def _rows_mapping(
    path: str | os.PathLike[str], header: Header, name: str, start: int, stop: int
) -> tuple[int, int, TensorInfo]:
    """(file offset, length) of the mapping holding rows ``start:stop`` of a tensor (the offset aligned
    as mmap wants it; length 0: no rows), and where the rows lie in it."""
    t = header.tensors[name]
    begin, nbytes = row_span(path, header, name, start, stop)
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    shape = (stop - start, *t.shape[1:])
    return (
        aligned,
        nbytes and nbytes + (begin - aligned),
        TensorInfo(t.dtype, shape, begin - aligned, begin - aligned + nbytes),
    )


def row_span(path: str | os.PathLike[str], header: Header, name: str, start: int, stop: int) -> tuple[int, int]:
    """(offset in the file, byte count) of rows ``start:stop`` of a tensor along dim 0; checks the range."""
    t = header.tensors[name]
    if not t.shape or not 0 <= start <= stop <= t.shape[0]:
        raise SepweightError(f"{path}: rows {start}:{stop} are outside tensor {name!r} of shape {list(t.shape)}")
    row = t.nbytes // t.shape[0] if t.shape[0] else 0
    return header.data_start + t.begin + start * row, (stop - start) * row


def gather_rows(path: str | os.PathLike[str], header: Header, name: str, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` along dim 0, read with ``pread`` (one call per distinct row): nothing is mapped.

    For an embedding lookup in a streaming runner: only the rows asked for are read, into fresh
    memory, and the page cache's page size (see hugepages.py) cannot inflate RSS as a mapping would.
    """
    t = header.tensors[name]
    if not t.shape:
        raise SepweightError(f"{path}: tensor {name!r} is a scalar; it has no rows")
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise SepweightError(f"{path}: row indices for {name!r} must be integers, got {index.dtype}")
    flat = index.reshape(-1).to("cpu", torch.int64)
    shape = (*index.shape, *t.shape[1:])
    if flat.numel() == 0:
        return torch.empty(shape, dtype=t.torch_dtype)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= t.shape[0]:
        bad = lo if lo < 0 else hi
        raise SepweightError(f"{path}: row {bad} is outside tensor {name!r} with {t.shape[0]} rows")
    rows, inverse = torch.unique(flat, return_inverse=True)  # sorted distinct rows
    row = t.nbytes // t.shape[0]
    out = torch.empty((rows.numel(), *t.shape[1:]), dtype=t.torch_dtype)
    view = _bytes_view(out.view(-1).view(torch.uint8)) if row else memoryview(b"")
    base = header.data_start + t.begin
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            if row and os.preadv(fd, [view[i * row : (i + 1) * row]], base + r * row) != row:
                raise _fail(Path(path), "short read")
    finally:
        os.close(fd)
    return out[inverse].reshape(shape)


def read_into(
    path: str | os.PathLike[str],
    header: Header,
    buffer: torch.Tensor,
    rows: tuple[str, int, int] | None = None,
    *,
    threads: int = 1,
    drop_cache: bool = False,
    direct: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read a file's tensors (or rows ``(name, start, stop)`` of one tensor) into `buffer`; return views of it.

    `buffer` is a contiguous CPU uint8 tensor (e.g. pinned, reused across calls) of at least the
    bytes read. No mapping is created, so nothing is unmapped later either. ``threads`` readers
    ``pread`` slices of the range concurrently.

    ``drop_cache``: leave the page cache as it was, so streaming a model bigger than RAM never grows
    it. Given :data:`READ_SLACK` spare bytes in `buffer`, the read bypasses the page cache
    (``O_DIRECT``: no copy, no cache pages; the views then start up to 8 KiB into the buffer, at the
    alignment the disk needs); otherwise, or where the file system refuses ``O_DIRECT``, each piece
    is read through the page cache and evicted right after. ``O_DIRECT`` moves the bytes straight
    into the buffer's pages, one request per run of physically contiguous pages: give it a
    :func:`~llm_sepweight.read_buffer` (2 MiB pages; 2.3-2.6 against 1.0-1.2 GB/s into 4 KiB pages
    on a virtio disk).

    ``direct`` (with ``drop_cache``): None as above; False reads through the page cache with the
    kernel's readahead and ``threads`` readers, each piece evicted right after it is read and the
    readahead past the end evicted at the end (it can be faster than ``O_DIRECT`` into 4 KiB pages:
    2.0 vs 1.2 GB/s on a virtio disk with 8 MiB readahead, but costs CPU for the copy and the cache;
    a caller may time both); True is ``O_DIRECT`` where it can, as None.
    """
    if buffer.dtype != torch.uint8 or not buffer.is_contiguous() or buffer.device.type != "cpu":
        raise SepweightError("read_into needs a contiguous CPU uint8 buffer")
    if rows is None:
        items = [(k, header.data_start + t.begin, t.nbytes, t.torch_dtype, t.shape) for k, t in header.tensors.items()]
        first = min((o for _, o, _, _, _ in items), default=header.data_start)
        length = header.file_size - first
    else:
        name, start, stop = rows
        t = header.tensors[name]
        first, length = row_span(path, header, name, start, stop)
        items = [(name, first, length, t.torch_dtype, (stop - start, *t.shape[1:]))]
    if length > buffer.numel():
        raise SepweightError(f"{path}: needs a buffer of {length} bytes, got {buffer.numel()}")
    cached = drop_cache and direct is False  # through the page cache, readahead on
    direct = bool(length) and drop_cache and not cached and buffer.numel() >= length + READ_SLACK
    at = 0  # where the first byte lands in `buffer`
    if direct:  # where its address agrees with its file offset modulo a page (O_DIRECT's alignment)
        at = (first - buffer.data_ptr()) % _PAGE
        at += _PAGE if at < first % _PAGE else 0
    if length and not (direct and _pread_direct(Path(path), buffer, at, first, length, threads)):
        # evicting while reading without readahead: one reader (concurrent evictions contend: 3x slower,
        # 3x the CPU here); with readahead (direct=False) the readers overlap
        readers = threads if cached or not drop_cache else 1
        _pread(Path(path), _bytes_view(buffer[at : at + length]), first, readers, drop_cache, readahead=cached)
    out = {}
    for k, offset, nbytes, dtype, shape in items:
        out[k] = buffer[at + offset - first : at + offset - first + nbytes].view(dtype).reshape(shape)
    return out


_PAGE = 4096
_PIECE = 16 << 20  # bytes a reader reads (and, with drop_cache, evicts) at a time
READ_SLACK = 3 * _PAGE  # spare buffer bytes that let read_into(drop_cache=True) read with O_DIRECT
_READAHEAD_TAIL = 32 << 20  # evicted past a range read with readahead (Linux windows: up to 2 x read_ahead_kb)


def _pread_direct(path: Path, buffer: torch.Tensor, at: int, first: int, length: int, threads: int) -> bool:
    """Read file bytes ``[first, first + length)`` with O_DIRECT into ``buffer[at:]``.

    O_DIRECT moves whole aligned blocks between the disk and aligned memory: the blocks covering the
    range land around ``buffer[at:]`` (address == file offset modulo a page; READ_SLACK spare bytes).
    False when the file system refuses O_DIRECT (tmpfs, some network file systems).
    """
    if not hasattr(os, "O_DIRECT"):
        return False
    lo, hi = first // _PAGE * _PAGE, -(-(first + length) // _PAGE) * _PAGE  # aligned file range
    dest = at - (first - lo)  # where file offset `lo` lands: an aligned address
    view = _bytes_view(buffer[dest : dest + hi - lo])
    need = first + length - lo  # bytes from `lo` that must arrive (the last block may pass end of file)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:

        def work(a: int, b: int) -> None:  # view[a:b], a and b multiples of the page size
            while a < b:
                stop = min(b, a + _PIECE)
                n = os.preadv(fd, [view[a:stop]], lo + a)
                if n < stop - a:  # O_DIRECT reads fewer bytes only at end of file
                    if a + n >= need:
                        return
                    raise _fail(path, "short read")
                a += n

        timed = _timed(work)
        n = max(1, min(threads, -(-(hi - lo) // _PIECE)))
        cuts = [(hi - lo) * k // n // _PAGE * _PAGE for k in range(n)] + [hi - lo]
        try:
            if n == 1:
                timed(0, hi - lo)
            else:
                with ThreadPoolExecutor(max_workers=n, thread_name_prefix="llm_sepweight-read") as pool:
                    for fut in [pool.submit(timed, a, b) for a, b in zip(cuts, cuts[1:])]:
                        fut.result()
        except OSError as e:  # EINVAL: this file system's O_DIRECT wants another alignment
            if e.errno == errno.EINVAL:
                return False
            raise
    finally:
        os.close(fd)
    return True


def _pread(path: Path, view: memoryview, offset: int, threads: int, drop_cache: bool, readahead: bool = False) -> None:
    """Fill `view` with the file's bytes from `offset`: `threads` readers over page-aligned slices.

    ``drop_cache``: evict each piece once read; without ``readahead`` read exactly what is asked
    (readahead would bring in pages nobody drops), with it evict the readahead past the end at the end.
    """
    length = len(view)
    fd = os.open(path, os.O_RDONLY)
    try:
        advise = drop_cache and hasattr(os, "posix_fadvise")
        if advise and not readahead:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_RANDOM)

        def work(lo: int, hi: int) -> None:  # view[lo:hi], in pieces
            while lo < hi:
                stop = min(hi, (offset + lo) // _PIECE * _PIECE + _PIECE - offset)
                n = os.preadv(fd, [view[lo:stop]], offset + lo)
                if n <= 0:
                    raise _fail(path, "short read")
                if advise:  # whole pages touched by this piece (pieces meet at page boundaries)
                    a = (offset + lo) // _PAGE * _PAGE
                    os.posix_fadvise(fd, a, -(-(offset + lo + n) // _PAGE) * _PAGE - a, os.POSIX_FADV_DONTNEED)
                lo += n

        timed = _timed(work)
        n = max(1, min(threads, -(-length // _PIECE)))
        # slice boundaries at absolute page multiples, so no page is shared by two readers
        cuts = [0] + [min(length, -(-(offset + length * k // n) // _PAGE) * _PAGE - offset) for k in range(1, n)]
        cuts.append(length)
        if n == 1:
            timed(0, length)
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="llm_sepweight-read") as pool:
                for fut in [pool.submit(timed, lo, hi) for lo, hi in zip(cuts, cuts[1:])]:
                    fut.result()
        if advise and readahead:  # what readahead brought in past the range (or a reader's slice)
            a = offset // _PAGE * _PAGE
            os.posix_fadvise(fd, a, offset + length + _READAHEAD_TAIL - a, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _base(mm: mmap.mmap) -> torch.Tensor:
    """The whole mapping as one uint8 tensor; tensors are views of it (it keeps `mm` alive)."""
    with warnings.catch_warnings():  # a prefaulted mapping is read-only; documented at open_tensors
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mm, dtype=torch.uint8)


def _view(base: torch.Tensor, data_start: int, t: TensorInfo) -> torch.Tensor:
    dtype = t.torch_dtype
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    offset = data_start + t.begin
    raw = base[offset : offset + t.nbytes]
    if offset % dtype.itemsize:  # misaligned (not written by us or safetensors): copy instead of a view
        return raw.clone().view(dtype).reshape(t.shape)
    return raw.view(dtype).reshape(t.shape)


def _read_into_memory(path: Path, header: Header) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, t in header.tensors.items():
            buf = torch.empty(t.nbytes, dtype=torch.uint8)
            f.seek(header.data_start + t.begin)
            if t.nbytes and f.readinto(_bytes_view(buf)) != t.nbytes:
                raise _fail(path, f"short read of tensor {name!r}")
            out[name] = buf.view(t.torch_dtype).reshape(t.shape)
    return out


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy needed)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")
