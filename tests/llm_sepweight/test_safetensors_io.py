"""Our streaming safetensors reader/writer against the safetensors library itself."""

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_sepweight import SepweightError
from llm_sepweight.safetensors_io import TensorSpec, open_tensors, read_header, write_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c": torch.randint(-5, 5, (2, 3, 4), generator=g),
        "d.half": torch.randn(9, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "flag": torch.tensor([True, False, True]),
    }


def test_our_files_read_by_safetensors(tmp_path):
    ts = _tensors()
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        write_file(f, [TensorSpec(k, v, v.dtype) for k, v in ts.items()])
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


@pytest.mark.parametrize("use_mmap", [True, False])
def test_safetensors_files_read_by_us(tmp_path, use_mmap):
    ts = _tensors()
    path = tmp_path / "y.safetensors"
    save_file(ts, str(path))
    got = open_tensors(path, use_mmap=use_mmap)
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_mmap_views_are_copy_on_write(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    before = path.read_bytes()
    t = open_tensors(path)["w"]
    t.add_(1)  # private mapping: the file must not change
    assert path.read_bytes() == before
    assert torch.equal(open_tensors(path)["w"], torch.ones(4))


def test_dtype_conversion_in_chunks_is_exact(monkeypatch):
    import llm_sepweight.safetensors_write as io_mod

    monkeypatch.setattr(io_mod, "_CHUNK_BYTES", 64)  # force many chunks
    src = torch.randn(1000)
    buf = io.BytesIO()
    sha, infos = write_file(buf, [TensorSpec("x", src, torch.bfloat16)])
    raw = buf.getvalue()
    assert infos["x"].dtype == "BF16"
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == sha
    n = int.from_bytes(raw[:8], "little")
    data = torch.frombuffer(bytearray(raw[8 + n :]), dtype=torch.bfloat16)
    assert torch.equal(data, src.to(torch.bfloat16))


def _good_file(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    return path


def test_truncated_data(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SepweightError, match=r"g\.safetensors: not a valid safetensors file \(data section truncated"):
        read_header(path)


def test_truncated_header(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(SepweightError, match=r"g\.safetensors.*header length \d+ does not fit"):
        read_header(path)


def test_corrupted_header_json(tmp_path):
    path = _good_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[10:14] = b"\xff\xfe{{"
    path.write_bytes(bytes(raw))
    with pytest.raises(SepweightError, match=r"g\.safetensors.*header is not valid JSON"):
        read_header(path)


def test_tiny_file(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(SepweightError, match="shorter than the 8-byte header"):
        read_header(path)


def test_offsets_inconsistent_with_shape(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "o.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SepweightError, match=r"tensor 'w': offsets \[0, 8\) do not match shape \[4\] F32"):
        read_header(path)
