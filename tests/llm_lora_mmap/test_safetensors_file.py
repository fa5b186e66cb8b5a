"""Our numpy-free safetensors reader/writer against the safetensors package (the format's reference)."""

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_lora_mmap import LoraError, safetensors_file

read_safetensors, write_safetensors = safetensors_file.read_safetensors, safetensors_file.write_safetensors

TENSORS = {
    "bf16": torch.randn(3, 5).bfloat16(),
    "f32": torch.randn(7),
    "f16": torch.randn(2, 2, 2).half(),
    "i64": torch.arange(4),
    "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "strided": torch.randn(4, 6)[:, ::2],  # written contiguous
}


def test_written_files_read_back_with_safetensors(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", TENSORS, {"format": "pt"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(TENSORS)
        for k, v in TENSORS.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert all(torch.equal(read_safetensors(tmp_path / "a.safetensors")[k], v) for k, v in TENSORS.items())


def test_reads_what_safetensors_writes(tmp_path):
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, tmp_path / "b.safetensors", metadata={"x": "y"})
    got = read_safetensors(tmp_path / "b.safetensors")
    assert set(got) == set(TENSORS) and all(torch.equal(got[k], v) for k, v in TENSORS.items())


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00", r"2 bytes, shorter than the 8-byte header length"),
        (b"\xff\x00\x00\x00\x00\x00\x00\x00{}", r"header length 255 exceeds the file's 10 bytes"),
        (_file(b"[]"), r"header is not a JSON object"),
        (
            _file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"1234"),
            r"tensor 'a': data_offsets \[0, 8\] do not hold \[2\] F32",
        ),
        (
            _file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"12345678"),
            r"tensor 'a': data_offsets \[0, 8\] do not hold \[3\] F32",
        ),
        (_file(b'{"a":{"dtype":"Q9","shape":[],"data_offsets":[0,0]}}'), r"entry 'a' is malformed"),
    ],
)
def test_corrupt_files_are_refused(tmp_path, content, message):
    (tmp_path / "c.safetensors").write_bytes(content)
    with pytest.raises(LoraError, match=r"c.safetensors: not a valid safetensors file \(" + message):
        read_safetensors(tmp_path / "c.safetensors")
