"""Page-cache helpers: fraction of a mapping backed by 2 MiB entries, and dropping cached bytes."""

import torch

from llm_sepweight import SepWeights, hugepage_coverage, hugepages_available


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
