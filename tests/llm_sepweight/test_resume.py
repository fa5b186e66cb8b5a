"""Atomic writes and resumable conversion: nothing half-written is ever accepted as complete."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import llm_sepweight as sw
import llm_sepweight.writer as writer_mod


class Crash(Exception):
    pass


def _count_writes(monkeypatch, crash_after: int | None = None) -> list:
    written: list = []
    real = writer_mod.write_part_file

    def spy(root, part, *args, **kwargs):
        if crash_after is not None and len(written) == crash_after:
            raise Crash(f"simulated crash before writing {part!r}")
        written.append(part)
        return real(root, part, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "write_part_file", spy)
    return written


def test_interrupted_conversion_resumes(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2_sharded")
    dst = tmp_path / "sep"
    with pytest.raises(Crash):
        with monkeypatch.context() as m:
            _count_writes(m, crash_after=2)
            sw.convert(ckpt.path, dst, progress=False)
    # incomplete: no manifest, loaders refuse and say how to fix it
    assert not (dst / "manifest.json").exists()
    with pytest.raises(sw.SepweightError, match="interrupted; re-run the same convert command to resume"):
        sw.SepWeights(dst)
    assert not list(dst.glob(".*.tmp-*"))  # no temp file left behind

    written = _count_writes(monkeypatch)
    sw.convert(ckpt.path, dst, progress=False)
    assert written == [1, 2, "end"]  # begin and layer 0 were kept
    part = sw.load(dst)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(part.hf_state_dict()[k], v)


def test_damaged_file_is_rewritten_on_resume(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "sep"
    with pytest.raises(Crash):
        with monkeypatch.context() as m:
            _count_writes(m, crash_after=3)
            sw.convert(ckpt.path, dst, progress=False)
    f = dst / "mid.00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    written = _count_writes(monkeypatch)
    sw.convert(ckpt.path, dst, progress=False)
    assert written == [0, 2, "end"]
    assert sw.verify(dst).ok


def test_rerun_of_complete_conversion_writes_nothing(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    written = _count_writes(monkeypatch)
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    assert written == []
    assert sw.verify(tmp_path / "sep").ok


def test_different_arguments_start_over(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    written = _count_writes(monkeypatch)
    m = sw.convert(ckpt.path, tmp_path / "sep", dtype="bf16", progress=False)
    assert written == ["begin", 0, 1, 2, "end"]
    assert m.dtype == "bfloat16"


def test_sigkill_mid_conversion_then_resume(qwen_checkpoints, tmp_path):
    """A real SIGKILL (no cleanup handlers run) while the 3rd part file is being written."""
    ckpt = qwen_checkpoints("qwen2_sharded")
    dst = tmp_path / "sep"
    script = textwrap.dedent(
        f"""
        import os, signal
        import llm_sepweight as sw
        import llm_sepweight.safetensors_write as io
        calls = 0
        real = io._bytes_view
        def view(t):
            global calls
            calls += 1
            if calls == 30:  # somewhere inside the third file
                os.kill(os.getpid(), signal.SIGKILL)
            return real(t)
        io._bytes_view = view
        sw.convert({str(ckpt.path)!r}, {str(dst)!r}, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (dst / "manifest.json").exists()
    journal = json.loads((dst / ".sepweight-journal.json").read_text())
    done_before = set(journal["files"])
    assert done_before  # some parts had finished
    sw.convert(ckpt.path, dst, progress=False)
    assert sw.verify(dst).ok
    assert not list(dst.glob(".*.tmp-*"))
    part = sw.load(dst)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(part.hf_state_dict()[k], v)


def test_two_writers_on_one_folder(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 1, "hidden_size": 4, "vocab_size": 4}
    first = sw.SepweightWriter(tmp_path / "sep", cfg)
    with pytest.raises(sw.SepweightError, match="this thread already has an unfinished SepweightWriter on this folder"):
        sw.SepweightWriter(tmp_path / "sep", cfg)  # another process's is FolderBusy (test_folder_lock.py)
    first.finish()
    sw.SepweightWriter(tmp_path / "sep", cfg).finish()  # the lock is released by finish()
