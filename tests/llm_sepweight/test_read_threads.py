"""read_into with concurrent readers, page-cache eviction and O_DIRECT returns the same bytes as one reader."""

import errno
import gc
import os

import pytest
import torch

import llm_sepweight as sw
from llm_sepweight import safetensors_io, safetensors_read


def _check(weights, threads, drop_cache, slack):
    want = weights.layer(1)
    buf = torch.empty(weights.nbytes(1) + slack, dtype=torch.uint8)
    got = weights.read_into(1, buf, threads=threads, drop_cache=drop_cache)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    head = weights.end()["lm_head.weight"]
    for rows in (("lm_head.weight", 37, 301), ("lm_head.weight", 0, 384), ("lm_head.weight", 383, 384)):
        buf = torch.empty(weights.nbytes("end", rows) + slack + 1, dtype=torch.uint8)
        buf = buf[1:] if slack else buf[:-1]  # O_DIRECT places the bytes aligned in any buffer
        (t,) = weights.read_into("end", buf, rows, threads=threads, drop_cache=drop_cache).values()
        assert torch.equal(t, head[rows[1] : rows[2]]), rows  # the last rows end at the end of the file


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize(("drop_cache", "slack"), [(False, 0), (True, 0), (True, sw.SepWeights.READ_SLACK)])
def test_read_into_threads_drop_and_direct_equal_one_reader(sep, monkeypatch, threads, drop_cache, slack):
    """Small pieces force many slices per reader, cut at page boundaries inside tensors."""
    monkeypatch.setattr(safetensors_read, "_PIECE", 8192)
    path, _ = sep("qwen2")
    _check(sw.SepWeights(path), threads, drop_cache, slack)


def test_read_into_falls_back_when_o_direct_is_refused(sep, monkeypatch):
    """tmpfs and some network file systems refuse O_DIRECT at open or at read: read through the cache."""
    path, _ = sep("qwen2")
    real_open, real_preadv = os.open, os.preadv
    calls = []

    def refuse_open(p, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            calls.append("open")
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", refuse_open)
    _check(sw.SepWeights(path), 2, True, sw.SepWeights.READ_SLACK)
    monkeypatch.setattr(os, "open", real_open)

    def refuse_read(fd, views, offset):
        if os.get_blocking(fd) and fcntl_direct(fd):
            calls.append("read")
            raise OSError(errno.EINVAL, "bad alignment")
        return real_preadv(fd, views, offset)

    def fcntl_direct(fd):
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    monkeypatch.setattr(os, "preadv", refuse_read)
    _check(sw.SepWeights(path), 2, True, sw.SepWeights.READ_SLACK)
    assert "open" in calls and ("read" in calls or not hasattr(os, "O_DIRECT"))


@pytest.mark.parametrize("slack", [0, sw.SepWeights.READ_SLACK])
def test_read_into_short_file_is_a_clear_error(sep, tmp_path, slack):
    path, _ = sep("qwen2")
    weights = sw.SepWeights(path)
    header = weights._header("mid.00000.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes((path / "mid.00000.safetensors").read_bytes()[:-5000])
    buf = torch.empty(weights.nbytes(0) + slack, dtype=torch.uint8)
    with pytest.raises(sw.SepweightError, match="short.safetensors: .*short read"):
        safetensors_io.read_into(short, header, buf, threads=2, drop_cache=True)


def _cached_pages(path, start=0):
    """Pages of the file from `start` that sit in the page cache (mincore on a fresh mapping; Linux)."""
    import ctypes

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        pages = -(-size // 4096)
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec[start // 4096 :])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
@pytest.mark.parametrize("threads", [1, 3])
def test_read_into_through_the_cache_with_readahead_leaves_it_empty(sep, monkeypatch, threads):
    """direct=False: readahead on, several readers; every page read (and read ahead) is evicted after."""
    monkeypatch.setattr(safetensors_read, "_PIECE", 8192)
    path, _ = sep("qwen2")
    weights = sw.SepWeights(path)
    _check(weights, threads, True, 0)  # same bytes
    want = {k: v.clone() for k, v in weights.layer(1).items()}  # (a mapping would pin its pages)
    gc.collect()
    for part, rows in ((1, None), ("end", ("lm_head.weight", 37, 301))):
        name = "mid.00001.safetensors" if part == 1 else "end.safetensors"
        header = weights._header(name)
        start = header.data_start if rows is None else safetensors_read.row_span(path / name, header, *rows)[0]
        weights.drop_cached(part)
        buf = torch.empty(weights.nbytes(part, rows) + sw.SepWeights.READ_SLACK, dtype=torch.uint8)
        got = weights.read_into(part, buf, rows, threads=threads, drop_cache=True, direct=False)
        if rows is None:
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert _cached_pages(path / name, start // 4096 * 4096) == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_read_cpu_seconds_counts_the_readers_cpu_time(sep, threads):
    """Every reader thread's CPU time is added up (the read choice weighs the page cache's copies)."""
    path, _ = sep("qwen2")
    weights = sw.SepWeights(path)
    buf = torch.empty(weights.nbytes(1) + sw.SepWeights.READ_SLACK, dtype=torch.uint8)
    before = sw.read_cpu_seconds()
    for _ in range(20):
        weights.read_into(1, buf, threads=threads, drop_cache=True, direct=False)
    assert sw.read_cpu_seconds() > before  # copying out of the page cache takes CPU time
    assert sw.read_cpu_seconds() == safetensors_io.read_cpu_seconds()  # one counter, exported twice
