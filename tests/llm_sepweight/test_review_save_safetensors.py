"""save_safetensors / load_safetensors against the safetensors package, every dtype and odd shape (outside review)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llm_sepweight as sw
from llm_sepweight.safetensors_io import DTYPES


def _all_kinds() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        x = torch.randn(4, 6, generator=g) * 8
        t = x > 0 if dtype == torch.bool else x.to(dtype)
        out[name] = t
        out[f"{name}.0d"] = t[1, 2].clone()  # shape ()
        out[f"{name}.empty"] = t[:0]  # shape (0, 6)
        out[f"{name}.T"] = t.t()  # not contiguous
        out[f"{name}.slice"] = t[1:, 3:]  # a view with an offset
    out["I64.big"] = torch.tensor([2**62 + 1, -(2**62) - 3])
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, same dtype and shape (fp8 has no torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.contiguous().view(torch.uint8)
    return torch.equal(a, b)


def test_every_dtype_and_shape_reads_back_in_safe_open(tmp_path):
    ts = _all_kinds()
    sw.save_safetensors(tmp_path / "a.safetensors", ts, metadata={"format": "pt"})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            assert _same(f.get_tensor(k), v), k


@pytest.mark.parametrize("use_mmap", [True, False])
def test_safetensors_files_of_every_dtype_load(tmp_path, use_mmap):
    ts = {k: v.contiguous() for k, v in _all_kinds().items()}
    save_file(ts, str(tmp_path / "b.safetensors"), metadata={"x": "y"})
    got = sw.load_safetensors(tmp_path / "b.safetensors", use_mmap=use_mmap)
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert _same(got[k], v), k
    assert sw.safetensors_metadata(tmp_path / "b.safetensors") == {"x": "y"}


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({1: torch.ones(2)}, r"tensor name 1 is a int, not a string"),
        ({"m": torch.empty(2, device="meta")}, r"tensor 'm' is on the meta device"),
        ({"s": torch.eye(2).to_sparse()}, r"tensor 's' is sparse \(layout torch.sparse_coo\)"),
    ],
)
def test_bad_tensors_are_named_and_leave_no_file(tmp_path, tensors, match):
    path = tmp_path / "c.safetensors"
    with pytest.raises(sw.SepweightError, match=rf"c.safetensors: {match}"):
        sw.save_safetensors(path, tensors)
    assert list(tmp_path.iterdir()) == []
