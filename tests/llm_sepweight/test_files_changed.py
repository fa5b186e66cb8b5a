"""Part files changed underneath an open SepWeights: every read raises a clear error naming the file.

A folder re-converted (another dtype, re-quantized: atomic renames give new inodes), a part file
overwritten in place, truncated or removed while a reader holds its (cached) header used to read
garbage (NaN logits), a bare torch error or a SIGBUS. Unchanged folders must never be refused.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import llm_sepweight as sw

IDS = torch.tensor([[3, 17, 383], [0, 5, 5]])


def _readers(weights: sw.SepWeights) -> dict[str, tuple[str, object]]:
    """name -> (file it reads, a function reading it); every way SepWeights reads a part file."""
    slack = sw.SepWeights.READ_SLACK
    head = ("lm_head.weight", 0, 64)
    return {
        "layer mmap": ("mid.00001.safetensors", lambda: weights.layer(1)),
        "layer prefault": ("mid.00001.safetensors", lambda: weights.layer(1, prefault=True)),
        "layer copy": ("mid.00001.safetensors", lambda: weights.layer(1, mmap=False)),
        "read_into": ("mid.00001.safetensors", lambda: weights.read_into(1, _buf(weights.nbytes(1)))),
        "read_into O_DIRECT": (
            "mid.00001.safetensors",
            lambda: weights.read_into(1, _buf(weights.nbytes(1) + slack), threads=2, drop_cache=True),
        ),
        "read_into rows": (
            "end.safetensors",
            lambda: weights.read_into("end", _buf(weights.nbytes("end", head)), head),
        ),
        "rows": ("end.safetensors", lambda: weights.rows("end", "lm_head.weight", 0, 64, prefault=True)),
        "gather_rows": ("begin.safetensors", lambda: weights.gather_rows("begin", "embed_tokens.weight", IDS)),
        "drop_cached": ("mid.00001.safetensors", lambda: weights.drop_cached(1)),
    }


READERS = list(_readers(None))  # type: ignore[arg-type]
FILES = ("begin.safetensors", "mid.00001.safetensors", "end.safetensors")


def _buf(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _changed(path, detail: str = r".+") -> str:
    """The error for a changed file; `detail` (a regex) says how it changed."""
    return re.escape(str(path)) + rf": changed on disk while in use \({detail}\).*reload the model"


@pytest.fixture
def folder(qwen_checkpoints, tmp_path):
    """A bf16 conversion of the tiny untied Qwen2 of its own (the tests change its files)."""
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", dtype="bf16", progress=False, fsync=False)
    return tmp_path / "sep", ckpt


def _use_everything(weights: sw.SepWeights) -> None:
    for _, read in _readers(weights).values():
        read()


def _refused(weights: sw.SepWeights, detail: str, files: tuple[str, ...] = FILES) -> None:
    """Every reader of a changed file raises the clear error naming it (and again on a second try)."""
    wrong = []
    for reader, (name, read) in _readers(weights).items():
        if name not in files:
            continue
        for _ in range(2):  # nothing is cached from a refused read
            try:
                read()
                wrong.append(f"{reader}: no error")
            except sw.SepweightError as e:
                if not re.match(_changed(weights.root / name, detail), str(e)):
                    wrong.append(f"{reader}: {e}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("again", [{"dtype": "fp32"}, {"dtype": "bf16", "quant": "int8"}], ids=["fp32", "int8"])
def test_reconverted_folder_is_refused_naming_the_file(folder, again):
    """Re-converting replaces each file by rename (a new inode): fp32 doubles the sizes (the old header
    would read the first half of the new bytes as bf16: NaN), int8 changes the tensors altogether."""
    path, ckpt = folder
    weights = sw.SepWeights(path)
    _use_everything(weights)  # headers cached, files mapped and read once
    sw.convert(ckpt.path, path, progress=False, fsync=False, **again)
    _refused(weights, "replaced by another file")


def test_file_overwritten_in_place_is_refused(folder):
    """Same size, same inode, other bytes (a tool rewriting the file in place): the mtime tells."""
    path, _ = folder
    weights = sw.SepWeights(path)
    _use_everything(weights)
    for name in FILES:
        before = os.stat(path / name)
        with open(path / name, "r+b") as f:
            f.seek(before.st_size - 64)
            f.write(b"\x7f" * 64)  # bf16 NaNs over the last tensor's last values
        if os.stat(path / name).st_mtime_ns == before.st_mtime_ns:  # a coarse file-system clock: let it tick
            os.utime(path / name, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    _refused(weights, "modified in place")


def test_truncated_file_is_refused_naming_it(folder):
    """Mapping a truncated file used to give a bare torch error (shape invalid) or, for pages already
    mapped, a SIGBUS; reading one: a 'short read'. Now the size is checked before mapping / reading."""
    path, _ = folder
    weights = sw.SepWeights(path)
    _use_everything(weights)
    for name in FILES:
        os.truncate(path / name, os.stat(path / name).st_size // 2)
    _refused(weights, r"now \d+ bytes, was \d+")


def test_removed_file_is_refused(folder):
    path, _ = folder
    weights = sw.SepWeights(path)
    _use_everything(weights)
    (path / "mid.00001.safetensors").unlink()
    _refused(weights, "removed", ("mid.00001.safetensors",))
    weights.end()  # the other files are fine


def test_change_before_the_first_read_is_refused(folder):
    """The files are recorded when the folder is opened, not when first read: a conversion in between
    (here re-quantized to int8: same file names, other tensors) is caught too."""
    path, ckpt = folder
    unread = {reader: sw.SepWeights(path) for reader in READERS}  # one each: nothing read before the change
    sw.convert(ckpt.path, path, progress=False, fsync=False, dtype="bf16", quant="int8")
    wrong = []
    for reader, weights in unread.items():
        name, read = _readers(weights)[reader]
        with pytest.raises(sw.SepweightError) as e:
            read()
        if not re.match(_changed(path / name, "replaced by another file"), str(e.value)):
            wrong.append(f"{reader}: {e.value}")
    assert not wrong, "\n".join(wrong)


def test_unchanged_folder_is_never_refused(folder):
    """Reads of every kind, again and again, a second SepWeights on the same folder in the same process,
    and an identical re-conversion (files adopted, not rewritten) while both are open: all accepted."""
    path, ckpt = folder
    first = sw.SepWeights(path)
    want = first.layer(1, mmap=False)
    for _ in range(3):
        _use_everything(first)
    second = sw.SepWeights(path)
    _use_everything(second)
    sw.convert(ckpt.path, path, dtype="bf16", progress=False, fsync=False)  # same settings: nothing rewritten
    for weights in (first, second, sw.SepWeights(path)):
        _use_everything(weights)
        got = weights.read_into(1, _buf(weights.nbytes(1)))
        assert all(torch.equal(got[k], want[k]) for k in want)
