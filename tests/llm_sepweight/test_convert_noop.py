"""Re-running a finished conversion is a stat-only no-op; hub ids work offline (issue 15 item 9)."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import llm_sepweight as sw
import llm_sepweight.checkpoint as checkpoint
import llm_sepweight.reader as reader
import llm_sepweight.sources as sources
import llm_sepweight.writer as writer

REPO = "acme/tiny-qwen"


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every entry, hidden ones included: any rewrite or replace changes it."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.iterdir())}


def _forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing, writing and reading weights all fail: a no-op must need none of them."""

    def boom(*args, **kwargs):
        raise AssertionError("a finished conversion must not hash, write or read weights")

    monkeypatch.setattr(writer, "sha256_file", boom)
    monkeypatch.setattr(writer, "write_file", boom)
    monkeypatch.setattr(writer.SepweightWriter, "__init__", boom)
    monkeypatch.setattr(checkpoint, "open_tensors", boom)
    monkeypatch.setattr(reader, "open_tensors", boom)
    monkeypatch.setattr(sources.HFSource, "tensors", boom)
    monkeypatch.setattr(sources.SepweightSource, "tensors", boom)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("qwen2", {}),
        ("qwen3_tied_sharded", {"parts": "1-3 e", "dtype": "bf16"}),
        ("qwen2", {"quant": "int8", "parts": "b 0-2"}),
    ],
)
def test_second_convert_touches_nothing(qwen_checkpoints, tmp_path, monkeypatch, name, kwargs):
    src = qwen_checkpoints(name).path
    first = sw.convert(src, tmp_path / "sep", progress=False, **kwargs)
    before = _stats(tmp_path / "sep")
    with monkeypatch.context() as m:
        _forbid_work(m)
        again = sw.convert(src, tmp_path / "sep", progress=False, **kwargs)
    assert again == first
    assert _stats(tmp_path / "sep") == before


def test_sepweight_source_noop(sep, tmp_path, monkeypatch):
    path, _ = sep("qwen2")
    first = sw.convert(path, tmp_path / "int8", quant="int8", progress=False)
    before = _stats(tmp_path / "int8")
    with monkeypatch.context() as m:
        _forbid_work(m)
        assert sw.convert(path, tmp_path / "int8", quant="int8", progress=False) == first
    assert _stats(tmp_path / "int8") == before


def test_other_options_or_a_missing_file_still_convert(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    (tmp_path / "sep" / "mid.00001.safetensors").unlink()
    kept = _stats(tmp_path / "sep")["mid.00002.safetensors"]
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)  # resumes: only the missing layer is written
    assert (tmp_path / "sep" / "mid.00001.safetensors").is_file()
    assert _stats(tmp_path / "sep")["mid.00002.safetensors"] == kept
    m = sw.convert(ckpt.path, tmp_path / "sep", dtype="bf16", progress=False)  # other options: a new conversion
    assert m.dtype == "bfloat16" and sw.verify(tmp_path / "sep").ok


def test_convert_waits_for_another_writer(qwen_checkpoints, tmp_path):
    """A second converter into a folder being written waits for the lock instead of failing."""
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "sep"
    busy = sw.SepweightWriter(dst, ckpt.config)  # holds the folder's lock (another process, in effect)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(sw.convert(ckpt.path, dst, progress=False)))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not result  # it cannot have written anything while the lock is held
    busy.finish()
    t.join(60)
    assert isinstance(result[0], sw.Manifest) and sw.verify(dst).ok
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(sw.load(dst).hf_state_dict()[k], v)


def hub_cache(root: Path, src: Path, files: list[str] | None = None) -> Path:
    """A huggingface_hub cache (HF_HUB_CACHE layout) holding `src` as REPO at main; returns the cache root."""
    commit = "1234567890abcdef1234567890abcdef12345678"
    repo = root / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if files is None or f.name in files:
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def run_offline(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with HF_HUB_OFFLINE=1, the hub cache in `hf_home`, no sockets."""
    script = textwrap.dedent(
        """
        import socket
        def _no_network(*a, **k):
            raise OSError("network disabled in this test")
        socket.socket.connect = _no_network
        socket.create_connection = _no_network
        """
    ) + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_offline(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2_sharded")
    hf_home = tmp_path / "hf"
    hub_cache(hf_home / "hub", ckpt.path)
    dst = tmp_path / "sep"
    code = f"""
        import llm_sepweight as sw
        m = sw.convert({REPO!r}, {str(dst)!r}, parts="b 0", progress=False)
        print("parts", m.source["parts"])
        """
    proc = run_offline(code, hf_home)  # converted from the local cache alone
    assert proc.returncode == 0, proc.stderr
    assert "parts b 0" in proc.stdout
    sd = ckpt.model.state_dict()
    for k, v in sw.load(dst, "b 0").hf_state_dict().items():
        assert torch.equal(v, sd[k])
    before = _stats(dst)
    proc = run_offline(code, hf_home)  # again: a no-op
    assert proc.returncode == 0, proc.stderr
    assert _stats(dst) == before
    shutil.rmtree(hf_home / "hub")
    proc = run_offline(code, hf_home)  # the hub cache gone: the finished folder still serves
    assert proc.returncode == 0, proc.stderr
    assert _stats(dst) == before
    other = code.replace('parts="b 0"', 'parts="b 0-2"')  # ... but only for what it holds
    proc = run_offline(other, hf_home)
    assert proc.returncode != 0
    assert f"cannot download config.json from hub repo {REPO!r}" in proc.stderr


def test_offline_without_cache_names_the_repo(tmp_path):
    code = f"""
        import llm_sepweight as sw
        sw.convert({REPO!r}, {str(tmp_path / "sep")!r}, progress=False)
        """
    proc = run_offline(code, tmp_path / "hf")
    assert proc.returncode != 0
    assert f"SepweightError: cannot download config.json from hub repo {REPO!r}" in proc.stderr
