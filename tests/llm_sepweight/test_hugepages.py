"""Huge-page helpers: fraction of a mapping backed by 2 MiB entries, dropping cached bytes, read buffers."""

import gc
import sys

import pytest
import torch

from llm_sepweight import SepWeights, hugepage_coverage, hugepages_available, read_buffer


def test_fraction_of_mapped_and_anonymous_tensors(sep):
    path, _ = sep("qwen2")
    sw = SepWeights(path)
    layer = sw.layer(0, prefault=True)
    frac = hugepage_coverage(next(iter(layer.values())))
    assert frac is None  # tiny files: no whole 2 MiB block to map
    assert isinstance(hugepages_available(), bool)
    assert hugepage_coverage(torch.zeros(10)) is None  # anonymous memory: not a file mapping


def test_drop_cached_keeps_the_data(sep):
    path, ckpt = sep("qwen2_tied")
    sw = SepWeights(path)
    before = {k: v.clone() for k, v in sw.layer(1).items()}
    sw.drop_cached(1)
    sw.drop_cached("end", ("lm_head.weight", 10, 50))  # the tied head: a byte range of the begin file
    sw.drop_cached("begin")
    for k, v in sw.layer(1, prefault=True).items():
        assert torch.equal(v, before[k])
    emb = ckpt.model.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(sw.rows("end", "lm_head.weight", 10, 50, prefault=True), emb[10:50])


def test_gather_rows_equals_indexing_and_names_bad_rows(sep):
    import pytest

    from llm_sepweight import SepweightError

    path, ckpt = sep("qwen2_tied")
    sw = SepWeights(path)
    emb = ckpt.model.state_dict()["model.embed_tokens.weight"]
    ids = torch.tensor([[5, 383, 5, 0], [7, 7, 1, 200]])
    assert torch.equal(sw.gather_rows("begin", "embed_tokens.weight", ids), emb[ids])
    assert torch.equal(sw.gather_rows("end", "lm_head.weight", ids[0]), emb[ids[0]])  # the tied head
    assert sw.gather_rows("begin", "embed_tokens.weight", torch.empty(0, dtype=torch.long)).shape == (0, 64)
    with pytest.raises(SepweightError, match="row 384 is outside tensor 'embed_tokens.weight'"):
        sw.gather_rows("begin", "embed_tokens.weight", torch.tensor([384]))
    with pytest.raises(SepweightError, match="must be integers"):
        sw.gather_rows("begin", "embed_tokens.weight", torch.tensor([1.0]))


def test_coverage_of_a_large_file(tmp_path):
    """A 9 MiB file holds 4 whole 2 MiB blocks; coverage is PMD-mapped bytes over those blocks."""
    import mmap

    path = tmp_path / "big.bin"
    path.write_bytes(bytes(9 << 20))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.frombuffer(mm, dtype=torch.uint8)
    cov = hugepage_coverage(t)
    assert cov is None or 0.0 <= cov <= 1.0


def test_prefault_falls_back_on_kernels_without_populate_read(sep, monkeypatch):
    """Before Linux 5.14 madvise(MADV_POPULATE_READ) fails with EINVAL: MAP_POPULATE is used instead."""
    from llm_sepweight import safetensors_read

    path, ckpt = sep("qwen2")
    monkeypatch.setattr(safetensors_read, "_MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    layer = SepWeights(path).layer(2, prefault=True)
    want = ckpt.model.state_dict()
    for k, v in layer.items():
        assert torch.equal(v, want[f"model.layers.2.{k}"])


def _vma(addr: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping holding `addr` (None: no mapping holds it)."""
    fields: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                if fields is not None:
                    return fields
                lo, _, hi = head[0].partition("-")
                if int(lo, 16) <= addr < int(hi, 16):
                    fields = {}
            elif fields is not None:
                fields[head[0].rstrip(":")] = head[1]
    return fields


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="2 MiB anonymous pages: Linux")
def test_read_buffer_is_zeroed_aligned_advised_and_unmapped_when_freed():
    n = (5 << 20) + 123
    buf = read_buffer(n)
    assert buf.dtype == torch.uint8 and buf.numel() == n and buf.is_contiguous()
    assert int(buf.count_nonzero()) == 0
    buf[-1] = 7  # writable, to its last byte
    addr = buf.data_ptr()
    if hugepages_available():
        assert addr % (2 << 20) == 0
        assert _vma(addr)["THPeligible"] == "1"  # advised MADV_HUGEPAGE (huge pages if the kernel has them)
        assert _vma(addr + n - 1)["THPeligible"] == "1"
    del buf
    gc.collect()
    assert _vma(addr) is None  # the mapping went with the last tensor viewing it


def test_read_buffer_small_and_bad_sizes():
    assert torch.equal(read_buffer(100), torch.zeros(100, dtype=torch.uint8))
    assert read_buffer(0).numel() == 0
    with pytest.raises(ValueError, match="nbytes"):
        read_buffer(-1)


@pytest.mark.parametrize("threads", [1, 4])
def test_o_direct_into_a_read_buffer_reads_the_file(sep, threads):
    """read_into with O_DIRECT (drop_cache, spare bytes) into huge-page memory, at an odd start inside it."""
    path, _ = sep("qwen2")
    weights = SepWeights(path)
    want = weights.layer(1)
    buf = read_buffer(4 << 20)[1:]
    got = weights.read_into(1, buf, threads=threads, drop_cache=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    head = weights.end()["lm_head.weight"]
    (t,) = weights.read_into("end", buf, ("lm_head.weight", 37, 301), threads=threads, drop_cache=True).values()
    assert torch.equal(t, head[37:301])
