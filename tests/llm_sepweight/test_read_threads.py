"""read_into with concurrent readers, page-cache eviction and O_DIRECT returns the same bytes as one reader."""

import errno
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
