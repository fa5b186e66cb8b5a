"""Training checkpoints that survive SIGKILL: written into a temp folder, then renamed into place.

A checkpoint is a folder ``step-00000042/`` holding

- ``state.pt``: trainable parameters by name, optimizer and scheduler state, every rank's RNG
  state (tensors and plain containers only: read back with ``torch.load(weights_only=True)``);
- ``progress.json``: data position (epoch, batches done in it), global step, the settings that
  must not change on resume, and the loss log so far;
- ``adapter/``: the adapter in PEFT's format (when the model has LoRA layers), for use as is.

A rename of a complete folder is atomic, so a folder named ``step-*`` is always complete: a run
killed while writing leaves a ``tmp-*`` folder that the next save removes, and resuming picks the
highest step. Older checkpoints are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import atomic_write_bytes

STATE, PROGRESS, ADAPTER = "state.pt", "progress.json", "adapter"
_STEP = re.compile(r"step-(\d{8})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (llm_sepweight's writer): readers see the old or the new file."""
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def _fsync_tree(root: Path) -> None:
    """Files first, then their folders: after this the whole tree is on disk."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        _fsync_dir(path)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``checkpoint_dir``, or None.

    Example::

        ckpt = latest_checkpoint("out/checkpoints")     # .../step-00000300
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    state: dict[str, Any],
    progress: dict[str, Any],
    write_adapter: Any = None,
    keep: int = 1,
) -> Path:
    """Write ``state`` (tensors) and ``progress`` (JSON) as checkpoint ``step``, atomically.

    Args:
        write_adapter: optional ``f(folder)`` writing the PEFT adapter into ``folder``.
        keep: how many checkpoints to keep (the newest ones).
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"tmp-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    (tmp / PROGRESS).write_text(json.dumps(progress, indent=1) + "\n")
    if write_adapter is not None:
        write_adapter(tmp / ADAPTER)
    _fsync_tree(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)  # make the rename itself durable
    # keep the newest `keep - 1` earlier ones; later steps can only be left by an abandoned run
    old = sorted(p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.name < final.name)
    doomed = old[: max(0, len(old) - (keep - 1))] + [
        p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.name > final.name
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return final


def remove_checkpoints(checkpoint_dir: str | Path) -> int:
    """Delete the checkpoints (and half-written ones) in ``checkpoint_dir``; how many there were."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return 0
    found = [p for p in root.iterdir() if p.is_dir() and (_STEP.fullmatch(p.name) or p.name.startswith("tmp-"))]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return len(found)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, progress)`` of a checkpoint folder; tensors are loaded with ``weights_only=True``."""
    path = Path(path)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    progress = json.loads((path / PROGRESS).read_text())
    return state, progress


def restore_checkpoint(
    ckpt: Path,
    settings: dict[str, Any],
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    rank: int,
    device: torch.device,
) -> dict[str, Any]:
    """Load a checkpoint into the trainable parameters, optimizer, scheduler and RNG; return its progress.

    ``settings`` (batch size, ranks, seed, the examples' hash, LoRA settings, the caller's
    ``resume_settings``, ...) must equal the ones the checkpoint was written with; a key an older
    checkpoint did not record is not compared.
    """
    state, progress = load_checkpoint(ckpt)
    saved_settings = progress["settings"]
    changed = {k: (saved_settings[k], v) for k, v in settings.items() if k in saved_settings and saved_settings[k] != v}
    if changed:
        diff = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{ckpt} was written with other settings ({diff}); resume with the same ones, or pass resume=False (--no-resume) / another checkpoint_dir (--checkpoint-dir)"
        )
    saved = state["trainable"]
    if set(saved) != set(trainable):
        missing, extra = (
            sorted(set(trainable) - set(saved)),
            sorted(set(saved) - set(trainable)),
        )
        raise ValueError(
            f"{ckpt}: its trainable parameters differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"{ckpt} was written without an lr_scheduler; resume without one or start afresh")
        lr_scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"][rank])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"][rank].cpu(), device)
    return progress
