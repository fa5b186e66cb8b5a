"""Malformed safetensors files, crafted by hand: what the safetensors package refuses, we refuse too.

Each case is checked twice: ``safetensors.safe_open`` (the format's reference) must reject it, and
our reader must reject it with a message naming the file and, where there is one, the tensor.
Well-formed files written by the safetensors package must read identically to ``safe_open``.
"""

import json
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import llm_sepweight as sw
from llm_sepweight import SepweightError


def _file(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# (case id, file bytes, what our message must say)
MALFORMED = [
    ("shorter-than-length-field", b"\x01\x00", r"file is 2 bytes, shorter than the 8-byte header length"),
    ("header-length-beyond-file", struct.pack("<Q", 1000) + b"{}", r"header length 1000 does not fit in a file of 10"),
    ("header-empty", struct.pack("<Q", 0), r"header is not valid JSON"),
    ("header-trailing-garbage", _file(b"{}xx"), r"header is not valid JSON"),
    ("header-not-an-object", _file(b"[]"), r"header is not a JSON object"),
    (
        "overlapping-ranges",
        _file({"a": _t("F32", [2], [0, 8]), "b": _t("F32", [2], [4, 12])}, bytes(12)),
        r"tensor 'b': bytes \[4, 12\) overlap tensor 'a' \[0, 8\)",
    ),
    (
        "identical-ranges",
        _file({"a": _t("F32", [2], [0, 8]), "b": _t("F32", [2], [0, 8])}, bytes(8)),
        r"tensor '[ab]': bytes \[0, 8\) overlap tensor '[ab]' \[0, 8\)",
    ),
    (
        "gap-between-tensors",
        _file({"a": _t("F32", [1], [0, 4]), "b": _t("F32", [1], [8, 12])}, bytes(12)),
        r"bytes \[4, 8\) before tensor 'b' belong to no tensor",
    ),
    (
        "data-not-starting-at-zero",
        _file({"a": _t("F32", [1], [4, 8])}, bytes(8)),
        r"bytes \[0, 4\) before tensor 'a' belong to no tensor",
    ),
    (
        "end-before-begin",
        _file({"a": _t("F32", [0], [8, 4]), "b": _t("F32", [2], [0, 8])}, bytes(8)),
        r"tensor 'a': data_offsets \[8, 4\] end before they begin",
    ),
    (
        "trailing-bytes-after-last-tensor",
        _file({"a": _t("F32", [1], [0, 4])}, bytes(8)),
        r"data section has trailing bytes: 4 after the last tensor 'a' belong to no tensor",
    ),
    (
        "data-truncated",
        _file({"a": _t("F32", [1], [0, 4]), "b": _t("F32", [2], [4, 12])}, bytes(8)),
        r"data section truncated: tensor 'b' at \[4, 12\) runs past its end, the file holds 8 bytes of data",
    ),
    (
        "shape-needs-more-bytes",
        _file({"a": _t("F32", [3], [0, 8])}, bytes(8)),
        r"tensor 'a': offsets \[0, 8\) do not match shape \[3\] F32 \(it needs 12 bytes, they hold 8\)",
    ),
    (
        "dtype-needs-other-bytes",
        _file({"a": _t("F16", [4], [0, 4])}, bytes(4)),
        r"tensor 'a': offsets \[0, 4\) do not match shape \[4\] F16 \(it needs 8 bytes, they hold 4\)",
    ),
    (
        "shape-overflows",
        _file({"a": _t("F32", [2**62, 4], [0, 4])}, bytes(4)),
        r"tensor 'a': offsets \[0, 4\) do not match shape \[4611686018427387904, 4\] F32 \(it needs \d+ bytes",
    ),
    (
        "negative-dims",
        _file({"a": _t("F32", [-1, -1], [0, 4])}, bytes(4)),
        r"tensor 'a' has a malformed entry .*shape must be a list of non-negative integers",
    ),
    (
        "boolean-dim",
        _file({"a": _t("F32", [True], [0, 4])}, bytes(4)),
        r"tensor 'a' has a malformed entry .*shape must be a list of non-negative integers",
    ),
    (
        "float-offsets",
        _file({"a": _t("F32", [1], [0.0, 4])}, bytes(4)),
        r"tensor 'a' has a malformed entry .*data_offsets must be two non-negative integers",
    ),
    (
        "unknown-dtype",
        _file({"a": _t("Q9", [1], [0, 4])}, bytes(4)),
        r"tensor 'a' has unsupported dtype 'Q9'",
    ),
    (
        "duplicate-name",
        _file(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            bytes(8),
        ),
        r"key 'a' appears twice in the header",
    ),
    (
        "metadata-not-strings",
        _file({"__metadata__": {"step": 1}}),
        r"__metadata__ must map strings to strings; key 'step' holds 1",
    ),
]


def _reference_rejects(path) -> None:
    with pytest.raises(SafetensorError):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_files_are_refused_like_safetensors(tmp_path, content, message, use_mmap):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _reference_rejects(path)
    with pytest.raises(SepweightError, match=r"bad.safetensors: not a valid safetensors file \(" + message):
        sw.load_safetensors(path, use_mmap=use_mmap)


def test_metadata_reader_refuses_malformed_files_too(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_file({"a": _t("F32", [2], [0, 8]), "b": _t("F32", [2], [4, 12])}, bytes(12)))
    with pytest.raises(SepweightError, match=r"bad.safetensors: .*tensor 'b': bytes \[4, 12\) overlap tensor 'a'"):
        sw.safetensors_metadata(path)


# valid layouts that a too-strict check would refuse: the safetensors package reads them
VALID = [
    (
        "header-key-order-differs-from-data-order",
        _file({"b": _t("F32", [1], [4, 8]), "a": _t("F32", [1], [0, 4])}, bytes(8)),
    ),
    (
        "empty-tensors-share-an-offset",
        _file({"e1": _t("F32", [0], [0, 0]), "e2": _t("I8", [0, 3], [0, 0]), "c": _t("F32", [1], [0, 4])}, bytes(4)),
    ),
    ("no-tensors-padded-header", _file(b"{}      ")),
    ("null-metadata", _file({"__metadata__": None})),
    ("extra-entry-fields", _file({"a": {**_t("F32", [1], [0, 4]), "note": 1}}, bytes(4))),
]


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("content", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_hand_made_layouts_read_like_safetensors(tmp_path, content, use_mmap):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(content)
    with safe_open(str(path), framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    got = sw.load_safetensors(path, use_mmap=use_mmap)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.randint(-9, 9, (2, 3), generator=g),
        "i8": torch.randint(-9, 9, (5,), generator=g).to(torch.int8),
        "u8": torch.randint(0, 255, (3,), generator=g).to(torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "read"])
def test_files_written_by_safetensors_read_identically(tmp_path, use_mmap):
    path = tmp_path / "ref.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt", "note": "x"})
    with safe_open(str(path), framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
        assert sw.safetensors_metadata(path) == f.metadata()
    got = sw.load_safetensors(path, use_mmap=use_mmap)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_save_safetensors_reads_back_in_safetensors(tmp_path):
    ts = {**_tensors(), "strided": torch.randn(4, 6)[:, ::2]}  # written contiguous
    path = sw.save_safetensors(tmp_path / "ours.safetensors", ts, metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    """A write killed halfway through the data leaves the old file, whole, and no temp file."""
    import llm_sepweight.safetensors_write as io_mod

    path = sw.save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(8)})
    before = path.read_bytes()
    real = io_mod._chunks

    def killed_after_one_chunk(t, dtype):
        yield next(real(t, dtype))
        raise KeyboardInterrupt

    monkeypatch.setattr(io_mod, "_chunks", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        sw.save_safetensors(path, {"w": torch.ones(8), "x": torch.ones(8)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_save_safetensors_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(SepweightError, match=r"tensor 'c': dtype torch.complex64 cannot be stored in safetensors"):
        sw.save_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(SepweightError, match=r"tensor 'x' is a list, not a torch.Tensor"):
        sw.save_safetensors(tmp_path / "c.safetensors", {"x": [1.0, 2.0]})  # type: ignore[dict-item]
    assert not (tmp_path / "c.safetensors").exists()
