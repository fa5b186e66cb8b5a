"""from_pretrained converts once: later calls, other processes and offline runs reuse the folder (issue 15 item 9)."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from cache_workers import load_and_run
from lazy_helpers import FP32

import llm_sepweight.writer as writer
from llm_lazy_qwen import from_pretrained


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.iterdir())}


def _want(ckpt) -> torch.Tensor:
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return ckpt.model(ids).logits


def test_second_call_reads_and_writes_nothing(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    from_pretrained(ckpt.path, "f", cache_dir=tmp_path / "sep")
    before = _stats(tmp_path / "sep")

    def boom(*args, **kwargs):
        raise AssertionError("a finished conversion must not hash or write")

    monkeypatch.setattr(writer, "sha256_file", boom)
    monkeypatch.setattr(writer.SepweightWriter, "__init__", boom)
    part = from_pretrained(ckpt.path, "f", cache_dir=tmp_path / "sep")
    assert _stats(tmp_path / "sep") == before
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(part(ids), _want(ckpt), **FP32)


def test_three_processes_at_once(qwen_checkpoints, tmp_path):
    """Three processes on a fresh folder (one converts, the others wait), then three on the finished one."""
    ckpt = qwen_checkpoints("qwen2_tied")
    dst = str(tmp_path / "sep")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        fresh = pool.starmap(load_and_run, [(str(ckpt.path), dst, False)] * 3, chunksize=1)
        before = _stats(tmp_path / "sep")
        finished = pool.starmap(load_and_run, [(str(ckpt.path), dst, True)] * 3, chunksize=1)
    assert _stats(tmp_path / "sep") == before
    for logits in fresh + finished:
        torch.testing.assert_close(torch.tensor(logits), _want(ckpt), **FP32)


def test_hub_id_offline_once_converted(qwen_checkpoints, tmp_path):
    """HF_HUB_OFFLINE=1 with the model in the hub cache (HF_HUB_CACHE layout), no network at all."""
    ckpt = qwen_checkpoints("qwen2_sharded")
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-qwen"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in ckpt.path.iterdir():
        os.link(f, repo / "snapshots" / commit / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent(
        """
        import socket
        def no_network(*a, **k):
            raise OSError("network disabled in this test")
        socket.socket.connect = no_network
        from llm_lazy_qwen import from_pretrained
        from llm_lazy_qwen.loading import default_cache_dir
        part = from_pretrained("acme/tiny-qwen", "b 0-2", dtype="fp32")
        print(sorted(p.name for p in default_cache_dir().iterdir()))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "LLM_MICROLIBS_CACHE": str(tmp_path / "ours"),
    }
    stats = []
    for _ in range(2):  # converts from the hub cache, then finds the finished folder
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (folder,) = (tmp_path / "ours" / "sepweight").iterdir()
        assert folder.name.startswith("tiny-qwen-") and folder.name in proc.stdout
        stats.append(_stats(folder))
    assert stats[0] == stats[1]
