"""One writer per folder: convert and convert_gguf wait for another process alike, a killed writer never
blocks, and a writer that would wait for itself is refused (folder_lock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf_fixtures import T, linears, tiny_model, write_gguf

import llm_sepweight as sw
import llm_sepweight.folder_lock as folder_lock
import llm_sepweight.writer as writer
from llm_sepweight.folder_lock import FolderBusy, wait_for_writer
from llm_sepweight.gguf_import import convert_gguf

CFG = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 1, "hidden_size": 4, "vocab_size": 4}
WAITING = "is converting into this folder; waiting for it"


def _until(check: Callable[[], bool], what: str, procs: list[subprocess.Popen], limit: float = 120.0) -> None:
    """Poll `check` (a test never sleeps a fixed time to 'let something happen'); fail naming `what`."""
    end = time.monotonic() + limit
    while not check():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > end:
            for p in procs:
                p.kill()
            exited = [Path(p.err.name).read_text()[-2000:] if hasattr(p, "err") else p.returncode for p in dead]
            pytest.fail(f"{what}: not seen; exited: {exited}")
        time.sleep(0.02)


def _converter(tmp_path: Path, name: str, src: Path, dst: Path, block_at: int | None) -> subprocess.Popen:
    """A process converting `src` into `dst` that logs every part it writes to tmp_path/'written' and, with
    `block_at`, stops before writing its part number `block_at` (0-based) until tmp_path/'go' exists."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        import llm_sepweight as sw
        import llm_sepweight.writer as w
        log, ready, go = Path({str(tmp_path / "written")!r}), Path({str(tmp_path / name)!r}), Path({str(tmp_path / "go")!r})
        real, calls = w.write_part_file, []
        def spy(root, part, *args, **kwargs):
            with log.open("a") as f:
                f.write(f"{{os.getpid()}} {{part}}\\n")
            if len(calls) == {block_at!r}:
                ready.touch()
                while not go.exists():
                    time.sleep(0.01)
            calls.append(part)
            return real(root, part, *args, **kwargs)
        w.write_part_file = spy
        m = sw.convert({str(src)!r}, {str(dst)!r}, progress=True)
        print("files", sorted(m.files))
        """
    )
    err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
    proc.err = err  # type: ignore[attr-defined]
    return proc


def _written(tmp_path: Path) -> list[tuple[int, str]]:
    lines = (tmp_path / "written").read_text().split("\n")
    return [(int(pid), part) for pid, part in (line.split() for line in lines if line)]


def test_two_processes_convert_one_gguf_into_one_folder(tmp_path):
    """Started together: one writes (held at its first part until the other waits), the other waits for it,
    finds the same conversion finished and writes nothing."""
    model = tiny_model("qwen2", seed=3)
    src = write_gguf(model, tmp_path / "m.gguf", linears(T.Q4_0))
    dst = tmp_path / "sep"
    procs = [_converter(tmp_path, name, src, dst, block_at=0) for name in ("a", "b")]
    waits = lambda name: WAITING in (tmp_path / f"{name}.err").read_text()  # noqa: E731
    _until(lambda: waits("a") or waits("b"), "one converter waiting for the other", procs)
    writing, waiting = (procs[1], procs[0]) if waits("a") else (procs[0], procs[1])
    assert not waits("a") or not waits("b")
    (tmp_path / "go").touch()
    out = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], (tmp_path / "a.err").read_text() + (tmp_path / "b.err").read_text()
    assert out[0] == out[1] and "'begin.safetensors'" in out[0]  # the same manifest
    written = _written(tmp_path)
    assert {pid for pid, _ in written} == {writing.pid} != {waiting.pid}  # every file written once, by one
    assert [part for _, part in written] == ["begin", "0", "1", "end"]
    assert sw.verify(dst).ok
    assert convert_gguf(src, dst, progress=False).source["resume_key"] == sw.Manifest.read(dst).source["resume_key"]


def test_a_killed_writer_does_not_block_the_waiting_one(qwen_checkpoints, tmp_path):
    """SIGKILL the writer mid-conversion while another process waits: the kernel drops the lock, the waiter
    takes the folder over, keeps the part the killed one finished and writes the rest."""
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "sep"
    first = _converter(tmp_path, "first", ckpt.path, dst, block_at=1)  # stops inside its second part
    _until(lambda: (tmp_path / "first").exists(), "the first converter at its second part", [first])
    second = _converter(tmp_path, "second", ckpt.path, dst, block_at=None)
    _until(lambda: WAITING in (tmp_path / "second.err").read_text(), "the second converter waiting", [first, second])
    first.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    second.communicate(timeout=300)
    assert second.returncode == 0, (tmp_path / "second.err").read_text()
    by_second = [part for pid, part in _written(tmp_path) if pid == second.pid]
    layers = [str(i) for i in range(sw.Manifest.read(dst).num_layers)]
    assert by_second == [*layers, "end"]  # begin, finished before the kill, was kept
    assert sw.verify(dst).ok
    got = sw.load(dst).hf_state_dict()
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(got[k], v), k


def _in_thread(fn: Callable[[], object]) -> object:
    """Run `fn` in a fresh thread, failing (instead of hanging the suite) if it has not returned in 60 s."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the test
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "it waited for a lock this same thread holds"
    return result[0]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_convert_into_a_folder_this_thread_writes_is_refused(qwen_checkpoints, tmp_path, kind):
    if kind == "hf":
        src = qwen_checkpoints("qwen2").path
    else:
        src = write_gguf(tiny_model("qwen2", seed=4), tmp_path / "m.gguf", linears(T.Q4_1))
    dst = tmp_path / "sep"

    def hold_then_convert() -> object:
        held = sw.SepweightWriter(dst, CFG)
        try:
            sw.convert(src, dst, progress=False)
        except sw.SepweightError as e:
            error = e
        held.close()  # released: the conversion now proceeds
        return error, sw.convert(src, dst, progress=False)

    got = _in_thread(hold_then_convert)
    assert not isinstance(got, BaseException), got
    error, manifest = got
    assert type(error) is sw.SepweightError
    assert str(error) == (
        f"{dst}: this thread already has an unfinished SepweightWriter on this folder; call its finish() "
        "(or close()) before writing into the folder again (waiting for it here would never end)"
    )
    assert isinstance(manifest, sw.Manifest) and sw.verify(dst).ok


def test_a_failed_convert_releases_the_folder(qwen_checkpoints, tmp_path, monkeypatch):
    """A conversion that raises midway releases its lock at once (not when its traceback is collected):
    the same thread converts again, resuming."""
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "sep"
    real = writer.write_part_file

    def broken(root, part, *args, **kwargs):
        if part == 2:
            raise OSError("disk full")
        return real(root, part, *args, **kwargs)

    monkeypatch.setattr(writer, "write_part_file", broken)
    with pytest.raises(OSError, match="disk full") as failed:
        sw.convert(ckpt.path, dst, progress=False)
    monkeypatch.setattr(writer, "write_part_file", real)
    assert failed.traceback  # the failed call's frames (and its writer) are still alive here
    assert isinstance(sw.convert(ckpt.path, dst, progress=False), sw.Manifest)
    assert sw.verify(dst).ok


def test_writer_context_releases_on_leaving(tmp_path):
    with sw.SepweightWriter(tmp_path / "sep", CFG) as w:
        w.write("begin", {"embed_tokens.weight": torch.zeros(4, 4)})
    with sw.SepweightWriter(tmp_path / "sep", CFG) as w:  # the first released the lock
        w.write(0, {"mlp.up_proj.weight": torch.zeros(4, 4)})
        w.finish()
    assert sw.Manifest.read(tmp_path / "sep").num_layers == 1


def test_a_writer_that_fails_to_start_holds_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(writer, "atomic_write_bytes", full)  # the journal cannot be written
        with pytest.raises(OSError, match="disk full") as failed:
            sw.SepweightWriter(tmp_path / "sep", CFG)
    assert failed.traceback  # its frames are still alive
    sw.SepweightWriter(tmp_path / "sep", CFG).finish()


def test_another_process_is_named_and_waited_for_with_a_timeout(tmp_path):
    dst = tmp_path / "sep"
    script = f"""
import sys
import llm_sepweight as sw
w = sw.SepweightWriter({str(dst)!r}, {CFG!r})
print("holding", flush=True)
sys.stdin.read()
"""
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(FolderBusy, match=rf"sep: another process \(pid {holder.pid}\) is writing into this folder"):
            sw.SepweightWriter(dst, CFG)
        with pytest.raises(
            FolderBusy, match=rf"another process \(pid {holder.pid}\) still holds the writer lock after"
        ):
            wait_for_writer(dst, timeout=0.1)
    finally:
        holder.stdin.close()  # it exits, which releases the lock
        holder.wait(60)
    wait_for_writer(dst, timeout=60)
    sw.SepweightWriter(dst, CFG).finish()


def test_waiting_notes_name_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_lock, "NOTE_EVERY", 0.02)
    held = sw.SepweightWriter(tmp_path / "sep", CFG)
    notes: list[str] = []
    waiter = threading.Thread(target=lambda: wait_for_writer(tmp_path / "sep", say=notes.append))
    waiter.start()
    _until(lambda: len(notes) >= 2, "two waiting notes", [])
    held.close()
    waiter.join(60)
    assert not waiter.is_alive()
    assert notes[0].startswith(f"{tmp_path / 'sep'}: still waiting for another thread of this process to finish")


def test_a_lock_outliving_its_writer_is_described(tmp_path):
    """The pid in the lock file is not running (a forked child, or another host, holds the lock)."""
    dst = tmp_path / "sep"
    dst.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dst / folder_lock.LOCK).write_text(proc.stdout)
    assert folder_lock.holder(dst) == (
        f"another process (the lock file names process {int(proc.stdout)}, which is not running here)"
    )
    assert os.path.getsize(dst / folder_lock.LOCK)
    sw.SepweightWriter(dst, CFG).finish()  # not locked: the stale pid alone blocks nothing
