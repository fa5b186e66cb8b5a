"""The lock taken just after another process finished the same conversion (outside review).

claim_folder checks for a finished conversion, then takes the writer lock. When the process holding
the lock writes its manifest and exits between the two, the new writer used to delete manifest.json
(loaders in other processes then failed: "not a complete sepweight folder") and re-hash every file
before writing the same manifest again.
"""

import importlib

import llm_sepweight as sw
import llm_sepweight.folder_lock as folder_lock
import llm_sepweight.writer as writer

convert_mod = importlib.import_module("llm_sepweight.convert")  # the attribute is the function


def test_finished_between_the_check_and_the_lock(qwen_checkpoints, tmp_path, monkeypatch):
    src = qwen_checkpoints("qwen2").path
    dst = tmp_path / "sep"
    first = sw.convert(src, dst, progress=False)
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.glob("*.safetensors")}

    real = folder_lock.finished_conversion
    calls = []

    def not_yet_once(root, key):
        """The first check in claim_folder runs just before the other process wrote its manifest."""
        calls.append(key)
        return None if len(calls) == 1 else real(root, key)

    monkeypatch.setattr(convert_mod, "finished_conversion", lambda root, key: None)  # the same moment, earlier
    monkeypatch.setattr(folder_lock, "finished_conversion", not_yet_once)
    seen = []
    hashed = writer.sha256_file

    def watch(path, *args, **kwargs):  # a reader in another process looking at the folder meanwhile
        seen.append((dst / "manifest.json").is_file())
        return hashed(path, *args, **kwargs)

    monkeypatch.setattr(writer, "sha256_file", watch)

    again = sw.convert(src, dst, progress=False)
    assert again == first
    assert (dst / "manifest.json").is_file()
    assert seen == []  # nothing re-hashed, so nothing a reader could catch without its manifest
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.glob("*.safetensors")} == stats
    assert sw.SepWeights(dst).num_layers == first.num_layers
    assert not (dst / ".sepweight-journal.json").exists()  # nothing left that a later resume would trust
