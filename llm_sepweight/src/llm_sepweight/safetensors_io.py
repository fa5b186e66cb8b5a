"""Read and write the safetensors format without holding a whole file in memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and then the raw little-endian tensor bytes, offsets relative to the end of the header.

We implement it here (instead of calling ``safetensors.torch``) for three reasons:
- writing streams tensor by tensor in bounded chunks, hashing the bytes as they go, so converting a
  layer never materialises the whole file in anonymous memory (``save_file`` needs every tensor);
- reading returns zero-copy views of a private (copy-on-write) memory map: pages stay file-backed and
  the kernel may drop them under pressure;
- every structural problem is reported with the file name and what is wrong.
Files written here are read by ``safetensors.safe_open`` and vice versa (tested).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import SepweightError
from .hugepages import hugepages_available

assert sys.byteorder == "little", "safetensors stores little-endian data; big-endian hosts are unsupported"

# safetensors dtype string <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library
_CHUNK_BYTES = 64 * 1024 * 1024  # bounded working memory per write step


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offset relative to the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def _fail(path: Path, what: str) -> SepweightError:
    return SepweightError(
        f"{path}: not a valid safetensors file ({what}). The file is truncated or corrupted: "
        "re-download it, or re-run the conversion that wrote it."
    )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header; checks that the file holds exactly the bytes it declares.

    Refuses what the safetensors package refuses: a header length beyond the file, a header that is
    not a JSON object of well-formed entries, a shape and dtype that do not fill their byte range,
    and byte ranges that overlap, leave gaps, or do not cover the data section exactly.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise _fail(path, f"header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise SepweightError(f"{path}: file not found") from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise _fail(path, f"key {e.args[0]!r} appears twice in the header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    bad_meta = [(k, v) for k, v in metadata.items() if not isinstance(v, str)] if isinstance(metadata, dict) else []
    if not isinstance(metadata, dict) or bad_meta:
        what = f"key {bad_meta[0][0]!r} holds {bad_meta[0][1]!r}" if bad_meta else f"it is {metadata!r}"
        raise _fail(path, f"__metadata__ must map strings to strings; {what}")
    tensors = {name: _entry(path, name, entry) for name, entry in obj.items()}
    data_start = 8 + n
    _check_coverage(path, tensors, size - data_start)
    return Header(tensors, metadata, data_start, size)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook: Python's json keeps the last of two equal keys, the safetensors package refuses."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, entry: object) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape, and offsets that hold exactly shape x dtype."""
    why = ""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        why = "it needs dtype, shape and data_offsets"
    elif not (isinstance(entry["shape"], list) and all(_is_count(d) for d in entry["shape"])):
        why = "shape must be a list of non-negative integers"
    elif not (isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2):
        why = "data_offsets must be two non-negative integers"
    elif not all(_is_count(o) for o in entry["data_offsets"]):
        why = "data_offsets must be two non-negative integers"
    if why:
        raise _fail(path, f"tensor {name!r} has a malformed entry {entry!r}: {why}")
    assert isinstance(entry, dict)
    dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if end < begin:
        raise _fail(path, f"tensor {name!r}: data_offsets {[begin, end]} end before they begin")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if need != end - begin:
        raise _fail(
            path,
            f"tensor {name!r}: offsets [{begin}, {end}) do not match shape {list(shape)} {dtype} "
            f"(it needs {need} bytes, they hold {end - begin})",
        )
    return TensorInfo(dtype, shape, begin, end)


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The byte ranges, sorted, must tile the data section: no overlap, no gap, nothing after the last."""
    at, last = 0, ""
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < at:
            prev = tensors[last]
            raise _fail(
                path, f"tensor {name!r}: bytes [{t.begin}, {t.end}) overlap tensor {last!r} [{prev.begin}, {prev.end})"
            )
        if t.begin > at:
            raise _fail(path, f"bytes [{at}, {t.begin}) before tensor {name!r} belong to no tensor")
        if t.end > data_len:
            raise _fail(
                path,
                f"data section truncated: tensor {name!r} at [{t.begin}, {t.end}) runs past its end, "
                f"the file holds {data_len} bytes of data",
            )
        at, last = t.end, name
    if at != data_len:
        after = f"the last tensor {last!r}" if last else "the header"
        raise _fail(path, f"data section has trailing bytes: {data_len - at} after {after} belong to no tensor")


_MADV_POPULATE_READ = 22  # Linux >= 5.14; Python < 3.13 has no constant for it


def _map(f: BinaryIO, length: int, offset: int, prefault: bool) -> mmap.mmap:
    if prefault and hasattr(mmap, "MAP_POPULATE"):
        # Read-only (a writable private mapping would copy every page), every page mapped now.
        # MADV_HUGEPAGE first: pages that must come from disk arrive as 2 MiB folios, which this and
        # later mappings map with PMD entries (see hugepages.py).
        mm = mmap.mmap(f.fileno(), length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=offset)
        try:
            if hasattr(mmap, "MADV_HUGEPAGE") and hugepages_available():
                mm.madvise(mmap.MADV_HUGEPAGE)
                # and no async readahead: it would continue in the folio size it found first (e.g. the
                # 4 KiB ones of a header read earlier); each missing 2 MiB block is then read as one folio
                mm.madvise(mmap.MADV_RANDOM)
            mm.madvise(_MADV_POPULATE_READ)
            return mm
        except OSError:  # an older kernel: populate at mmap time instead
            mm.close()
            flags = mmap.MAP_PRIVATE | mmap.MAP_POPULATE
            return mmap.mmap(f.fileno(), length, flags=flags, prot=mmap.PROT_READ, offset=offset)
    return mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=offset)


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
        base = _base(_map(f, 0, 0, prefault))
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
    t = header.tensors[name]
    begin, nbytes = row_span(path, header, name, start, stop)
    shape = (stop - start, *t.shape[1:])
    if nbytes == 0:
        return torch.empty(shape, dtype=t.torch_dtype)
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = _map(f, nbytes + (begin - aligned), aligned, prefault)
    sub = TensorInfo(t.dtype, shape, begin - aligned, begin - aligned + nbytes)
    return _view(_base(mm), 0, sub)


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
) -> dict[str, torch.Tensor]:
    """Read a file's tensors (or rows ``(name, start, stop)`` of one tensor) into `buffer`; return views of it.

    `buffer` is a contiguous CPU uint8 tensor (e.g. pinned, reused across calls) of at least the
    bytes read. No mapping is created, so nothing is unmapped later either. ``threads`` readers
    ``pread`` slices of the range concurrently.

    ``drop_cache``: leave the page cache as it was, so streaming a model bigger than RAM never grows
    it. Given :data:`READ_SLACK` spare bytes in `buffer`, the read bypasses the page cache
    (``O_DIRECT``: no copy, no cache pages; the views then start up to 8 KiB into the buffer, at the
    alignment the disk needs); otherwise, or where the file system refuses ``O_DIRECT``, each piece
    is read through the page cache and evicted right after.
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
    direct = bool(length) and drop_cache and buffer.numel() >= length + READ_SLACK
    at = 0  # where the first byte lands in `buffer`
    if direct:  # where its address agrees with its file offset modulo a page (O_DIRECT's alignment)
        at = (first - buffer.data_ptr()) % _PAGE
        at += _PAGE if at < first % _PAGE else 0
    if length and not (direct and _pread_direct(Path(path), buffer, at, first, length, threads)):
        # evicting while reading: one reader (concurrent evictions contend: 3x slower, 3x the CPU here)
        _pread(Path(path), _bytes_view(buffer[at : at + length]), first, 1 if drop_cache else threads, drop_cache)
    out = {}
    for k, offset, nbytes, dtype, shape in items:
        out[k] = buffer[at + offset - first : at + offset - first + nbytes].view(dtype).reshape(shape)
    return out


_PAGE = 4096
_PIECE = 16 << 20  # bytes a reader reads (and, with drop_cache, evicts) at a time
READ_SLACK = 3 * _PAGE  # spare buffer bytes that let read_into(drop_cache=True) read with O_DIRECT


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

        n = max(1, min(threads, -(-(hi - lo) // _PIECE)))
        cuts = [(hi - lo) * k // n // _PAGE * _PAGE for k in range(n)] + [hi - lo]
        try:
            if n == 1:
                work(0, hi - lo)
            else:
                with ThreadPoolExecutor(max_workers=n, thread_name_prefix="llm_sepweight-read") as pool:
                    for fut in [pool.submit(work, a, b) for a, b in zip(cuts, cuts[1:])]:
                        fut.result()
        except OSError as e:  # EINVAL: this file system's O_DIRECT wants another alignment
            if e.errno == errno.EINVAL:
                return False
            raise
    finally:
        os.close(fd)
    return True


def _pread(path: Path, view: memoryview, offset: int, threads: int, drop_cache: bool) -> None:
    """Fill `view` with the file's bytes from `offset`: `threads` readers over page-aligned slices."""
    length = len(view)
    fd = os.open(path, os.O_RDONLY)
    try:
        advise = drop_cache and hasattr(os, "posix_fadvise")
        if advise:  # read exactly what is asked: readahead would bring in pages nobody drops
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

        n = max(1, min(threads, -(-length // _PIECE)))
        # slice boundaries at absolute page multiples, so no page is shared by two readers
        cuts = [0] + [min(length, -(-(offset + length * k // n) // _PAGE) * _PAGE - offset) for k in range(1, n)]
        cuts.append(length)
        if n == 1:
            work(0, length)
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="llm_sepweight-read") as pool:
                for fut in [pool.submit(work, lo, hi) for lo, hi in zip(cuts, cuts[1:])]:
                    fut.result()
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


# ---------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, output dtype and the source it is read from."""

    name: str
    source: torch.Tensor  # any dtype/stride; converted to `dtype` chunk by chunk
    dtype: torch.dtype


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


def write_file(
    f: BinaryIO, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None
) -> tuple[str, dict[str, TensorInfo]]:
    """Write tensors to an open binary file; return (sha256 hex of the whole file, their infos).

    Tensors are written in the given order; each is converted to its dtype in chunks of at most
    64 MiB, so working memory is bounded whatever the tensor size.
    """
    specs = list(specs)
    infos: dict[str, TensorInfo] = {}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        if s.dtype not in DTYPE_NAMES:
            raise SepweightError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors")
        if s.name in infos:
            raise SepweightError(f"tensor {s.name!r} appears twice in one file")
        nbytes = s.source.numel() * torch.empty((), dtype=s.dtype).element_size()
        info = TensorInfo(DTYPE_NAMES[s.dtype], tuple(s.source.shape), offset, offset + nbytes)
        infos[s.name] = info
        header[s.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (_align(8 + len(raw)) - 8 - len(raw))  # data section starts 8-byte aligned
    digest = hashlib.sha256()
    for piece in (struct.pack("<Q", len(raw)), raw):
        f.write(piece)
        digest.update(piece)
    # hash chunk k on a helper thread while writing it (both release the GIL): ~1.5x faster on 2 cores
    with ThreadPoolExecutor(max_workers=1) as hasher:
        for s in specs:
            for chunk in _chunks(s.source, s.dtype):
                view = _bytes_view(chunk)
                hashed = hasher.submit(digest.update, view)
                f.write(view)
                hashed.result()  # before the next chunk: updates stay in order, `chunk` stays alive
    return digest.hexdigest(), infos


def _chunks(t: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Contiguous 1-D pieces of `t` converted to `dtype`, at most ~64 MiB each."""
    if t.device.type != "cpu":
        t = t.detach().to("cpu")
    flat = t.detach().reshape(-1)  # a view when t is contiguous (the common case)
    step = max(1, _CHUNK_BYTES // max(t.element_size(), torch.empty((), dtype=dtype).element_size()))
    for i in range(0, flat.numel(), step):
        yield flat[i : i + step].to(dtype).contiguous()


def sha256_file(path: str | os.PathLike[str], bufsize: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
