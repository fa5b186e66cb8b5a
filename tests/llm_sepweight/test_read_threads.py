"""read_into with concurrent readers and page-cache eviction returns the same bytes as one reader."""

import pytest
import torch

import llm_sepweight as sw
from llm_sepweight import safetensors_io


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("drop_cache", [False, True])
def test_read_into_threads_and_drop_equal_one_reader(sep, monkeypatch, threads, drop_cache):
    """Small pieces force many slices per reader, cut at page boundaries inside tensors."""
    monkeypatch.setattr(safetensors_io, "_PIECE", 8192)
    path, _ = sep("qwen2")
    weights = sw.SepWeights(path)
    want = weights.layer(1)
    buf = torch.empty(weights.nbytes(1), dtype=torch.uint8)
    got = weights.read_into(1, buf, threads=threads, drop_cache=drop_cache)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rows = ("lm_head.weight", 37, 301)  # a row range starting mid-page
    buf = torch.empty(weights.nbytes("end", rows), dtype=torch.uint8)
    head = weights.read_into("end", buf, rows, threads=threads, drop_cache=drop_cache)["lm_head.weight"]
    assert torch.equal(head, weights.end()["lm_head.weight"][37:301])


def test_read_into_short_file_is_a_clear_error(sep, tmp_path):
    path, _ = sep("qwen2")
    weights = sw.SepWeights(path)
    header = weights._header("mid.00000.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes((path / "mid.00000.safetensors").read_bytes()[:-100])
    buf = torch.empty(weights.nbytes(0), dtype=torch.uint8)
    with pytest.raises(sw.SepweightError, match="short.safetensors: .*short read"):
        safetensors_io.read_into(short, header, buf, threads=2)
