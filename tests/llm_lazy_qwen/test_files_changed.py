"""A lazy part whose folder changes underneath it: the next forward raises naming the file, never NaN.

Re-converting the folder in another dtype while a lazy part streams from it used to return NaN
logits silently (the part read the new bytes through the old headers). Unchanged folders, re-opened
in the same process or re-converted identically, keep working and equal the part held in RAM.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from lazy_helpers import token_ids

import llm_sepweight as sw
from llm_lazy_qwen import load_part

SMALL = {"head_chunk_size": 128, "max_context": 64}  # 3 head chunks
MODES = {
    "mmap": {"lazy": True, "stream_mode": "mmap"},
    "copy": {"lazy": True, "stream_mode": "copy"},
    "budget": {"memory_budget": "budget"},  # filled in by _kwargs: some items resident, some streamed
}


def _changed(path, detail: str = r".+") -> str:
    return re.escape(str(path)) + rf": changed on disk while in use \({detail}\).*reload the model"


@pytest.fixture
def folder(qwen_checkpoints, tmp_path):
    """A bf16 conversion of the tiny untied Qwen2 (3 layers) of its own: the tests change its files."""
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", dtype="bf16", progress=False, fsync=False)
    return tmp_path / "sep", ckpt


def _kwargs(path, mode: str, spec: str = "f") -> dict:
    if mode != "budget":
        return {**MODES[mode], **SMALL}
    everything = load_part(path, spec, memory_budget=10**12, **SMALL)
    plan = everything.memory_plan
    everything.close()
    return {"memory_budget": (plan.minimum + plan.peak) // 2, **SMALL}


@pytest.mark.parametrize(("spec", "first"), [("f", "begin"), ("1-3 e", "mid.00001")])
@pytest.mark.parametrize("mode", list(MODES))
def test_reconverted_in_another_dtype_raises_naming_the_file(folder, mode, spec, first):
    """bf16 -> fp32 doubles every file: read through the old headers, the new bytes were NaN logits.
    The first file the next forward reads is named: the embedding (pread per forward) or the first layer."""
    path, ckpt = folder
    part = load_part(path, spec, **_kwargs(path, mode, spec))
    x = token_ids(1, 5) if spec == "f" else torch.randn(1, 5, part.config.hidden_size, dtype=torch.bfloat16)
    assert torch.isfinite(part(x)).all()
    sw.convert(ckpt.path, path, dtype="fp32", progress=False, fsync=False)
    for _ in range(2):  # and again: a failed forward leaves nothing half-read behind to return
        with pytest.raises(
            sw.SepweightError, match=_changed(path / f"{first}.safetensors", "replaced by another file")
        ):
            part(x)
    part.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_layer_file_truncated_in_place_raises_naming_it(folder, mode):
    """A streamed layer's file truncated in place (``cp`` over it, a disk filling up during a rewrite)."""
    path, _ = folder
    part = load_part(path, **_kwargs(path, mode))
    ids = token_ids(1, 5)
    part(ids)
    name = path / "mid.00001.safetensors"
    os.truncate(name, os.stat(name).st_size // 2)
    with pytest.raises(sw.SepweightError, match=_changed(name, r"now \d+ bytes, was \d+")):
        part(ids)
    part.close()


@pytest.mark.parametrize("name", ["mid.00000", "end"])
def test_truncated_file_already_mapped_raises_instead_of_sigbus(folder, name):
    """mmap mode prefetches the next token's first layer (mapped, every page in) right after a forward,
    and the final norm was a mapped view of end.safetensors. Truncating such a file made touching those
    pages a SIGBUS that killed the process; now the part checks a prefetched item's file again when it
    hands it out, and holds the norm in memory. In a child process, so a crash fails only this test."""
    path, _ = folder
    script = textwrap.dedent(
        f"""
        import os, torch
        import llm_sepweight as sw
        from llm_lazy_qwen import load_part

        part = load_part({str(path)!r}, lazy=True, stream_mode="mmap", prefetch=1, head_chunk_size=128)
        ids = torch.tensor([[1, 2, 3]])
        part(ids)
        for prefetch in part._streamer._pending.values():  # wait until layer 0 of the next forward is mapped
            prefetch.result()
        os.truncate({str(path / f"{name}.safetensors")!r}, 4096)
        try:
            part(ids)
        except sw.SepweightError as e:
            print("ERROR:", e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"child died (rc {done.returncode}): {done.stderr[-2000:]}"
    assert re.search("ERROR: " + _changed(path / f"{name}.safetensors", r"now 4096 bytes, was \d+"), done.stdout)


@pytest.mark.parametrize("mode", list(MODES))
def test_unchanged_folder_keeps_running(folder, mode):
    """Several forwards, a second part on the same folder in the same process, and an identical
    re-conversion (files adopted, not rewritten) while both run: no false alarm, logits equal RAM's."""
    path, ckpt = folder
    ram = load_part(path, **SMALL)
    ids = token_ids(2, 7)
    want = ram(ids)
    first = load_part(path, **_kwargs(path, mode))
    for _ in range(2):
        torch.testing.assert_close(first(ids), want, atol=0, rtol=0)
    second = load_part(path, **_kwargs(path, mode))
    torch.testing.assert_close(second(ids), want, atol=0, rtol=0)
    sw.convert(ckpt.path, path, dtype="bf16", progress=False, fsync=False)  # same settings: nothing rewritten
    for part in (first, second, load_part(path, **_kwargs(path, mode))):
        torch.testing.assert_close(part(ids), want, atol=0, rtol=0)
        part.close()
