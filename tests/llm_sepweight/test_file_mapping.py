"""SepWeights.mapping: a long-lived mapping populated before each use and released after it.

Oracle: the same tensors read by ``layer()`` / ``rows()`` (fresh mappings) and the checkpoint's own
state dict. RSS is read from /proc/self/smaps for the mapping's own address range (Linux only).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from smaps import rss_kb

import llm_sepweight as sw
from llm_sepweight import mapping as mapping_mod

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def folder(qwen_checkpoints, tmp_path):
    """A conversion of the tiny tied Qwen2 of its own: the tests change its files."""
    ckpt = qwen_checkpoints("qwen2_tied")
    sw.convert(ckpt.path, tmp_path / "sep", progress=False, fsync=False)
    return tmp_path / "sep", ckpt


def test_views_equal_fresh_reads_across_populate_and_release(folder):
    path, ckpt = folder
    weights = sw.SepWeights(path)
    want = ckpt.model.state_dict()
    layer = weights.mapping(1)
    head = weights.mapping("end", ("lm_head.weight", 100, 300))  # tied: rows of the embedding
    assert set(layer.tensors) == set(weights.layer(1)) and list(head.tensors) == ["lm_head.weight"]
    for _ in range(3):
        layer.populate()
        head.populate()
        for k, t in layer.tensors.items():
            assert torch.equal(t, want[f"model.layers.1.{k}"])
        assert torch.equal(head.tensors["lm_head.weight"], want["model.embed_tokens.weight"][100:300])
        layer.release()
        head.release()
    # views kept past a release read the file again when touched
    assert torch.equal(layer.tensors["mlp.up_proj.weight"], want["model.layers.1.mlp.up_proj.weight"])
    row = want["model.embed_tokens.weight"][0].nbytes
    assert head.nbytes >= 200 * row and layer.nbytes == os.path.getsize(path / "mid.00001.safetensors")


@pytest.mark.skipif(not LINUX, reason="MADV_DONTNEED drops the pages from RSS on Linux")
def test_release_takes_the_pages_out_of_rss(folder):
    path, _ = folder
    layer = sw.SepWeights(path).mapping(0)
    t = next(iter(layer.tensors.values()))
    assert rss_kb([t.data_ptr()]) == 0  # made, nothing mapped yet
    for _ in range(2):
        layer.populate()
        assert rss_kb([t.data_ptr()]) * 1024 >= layer.nbytes - 4096  # every page (the last one may be partial)
        layer.release()
        assert rss_kb([t.data_ptr()]) == 0


def test_file_truncated_under_the_mapping_raises_naming_it(folder):
    """Touching a mapping past a truncated file's end is a SIGBUS: populate refuses first."""
    path, _ = folder
    layer = sw.SepWeights(path).mapping(2)
    layer.populate()
    layer.release()
    name = path / "mid.00002.safetensors"
    os.truncate(name, os.path.getsize(name) // 2)
    with pytest.raises(sw.SepweightError, match=rf"{name}: changed on disk while in use \(now \d+ bytes"):
        layer.populate()


@pytest.mark.skipif(not LINUX, reason="MADV_POPULATE_READ is Linux's")
def test_file_truncated_while_populating_raises_naming_it(folder, monkeypatch):
    """Truncated between the check and the madvise: the kernel fails MADV_POPULATE_READ (EFAULT) where a
    touch would be a SIGBUS, and the error names the change."""
    path, _ = folder
    layer = sw.SepWeights(path).mapping(2)
    name = path / "mid.00002.safetensors"
    real_check, checks = layer._check, []

    def check_then_truncate() -> None:
        real_check()
        if not checks:
            os.truncate(name, 4096)
        checks.append(1)

    monkeypatch.setattr(layer, "_check", check_then_truncate)
    with pytest.raises(sw.SepweightError, match=rf"{name}: changed on disk while in use \(now 4096 bytes"):
        layer.populate()
    assert len(checks) == 1  # the second check raised


def test_file_replaced_under_the_mapping_raises_naming_it(folder):
    path, ckpt = folder
    weights = sw.SepWeights(path)
    head = weights.mapping("end", ("lm_head.weight", 0, 64))
    sw.convert(ckpt.path, path, dtype="fp32", progress=False, fsync=False)  # every file renamed over
    with pytest.raises(sw.SepweightError, match=r"begin.safetensors: changed on disk while in use \(replaced"):
        head.populate()


def test_kernels_without_populate_read_fall_back_to_readahead(folder, monkeypatch):
    """Before Linux 5.14 MADV_POPULATE_READ is EINVAL: pages are then faulted in by their first use."""
    path, ckpt = folder
    monkeypatch.setattr(mapping_mod, "MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    monkeypatch.setattr(mapping_mod, "_populate_works", True)
    layer = sw.SepWeights(path).mapping(0)
    layer.populate()
    assert not mapping_mod._populate_works
    layer.populate()
    want = ckpt.model.state_dict()
    for k, t in layer.tensors.items():
        assert torch.equal(t, want[f"model.layers.0.{k}"])
    layer.release()


def test_bad_rows_are_refused_naming_the_tensor(folder):
    path, _ = folder
    weights = sw.SepWeights(path)
    with pytest.raises(sw.SepweightError, match=r"rows 0:100000 are outside tensor 'embed_tokens.weight'"):
        weights.mapping("end", ("lm_head.weight", 0, 100000))
    with pytest.raises(sw.SepweightError, match=r"no tensor 'nope'"):
        weights.mapping(0, ("nope", 0, 1))
