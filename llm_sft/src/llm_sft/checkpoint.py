"""Training checkpoints that survive SIGKILL: written into a temp folder, then renamed into place.

A checkpoint is a folder ``step-00000042/`` holding

- ``state.safetensors``: every tensor of the training state (trainable parameters by name,
  optimizer state such as AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step``, every rank's RNG state
  as uint8 tensors), under flat keys that follow the nesting: ``trainable.<name>``,
  ``optimizer.state.<param index>.<name>``, ``rng.cpu.<rank>``, ``rng.cuda.<rank>``;
- ``state.json``: the rest of the state (optimizer ``param_groups``, scheduler state, ...) with
  ``{"$tensor": key}`` where a tensor was (see :func:`_to_json`);
- ``progress.json``: data position (epoch, batches done in it), global step, the settings that
  must not change on resume, and the loss log so far;
- ``adapter/``: the adapter in PEFT's format (when the model has LoRA layers), for use as is.

No pickle: a checkpoint of an older llm_sft (``state.pt``) is still read, with
``torch.load(weights_only=True)``, and the next checkpoint is written in the format above.

A rename of a complete folder is atomic, so a folder named ``step-*`` is always complete: a run
killed while writing leaves a ``tmp-*`` folder that the next save removes, and resuming picks the
highest step. Older checkpoints are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import atomic_write_bytes, fsync_dir, load_safetensors, save_safetensors

STATE_TENSORS, STATE_JSON, PROGRESS, ADAPTER = "state.safetensors", "state.json", "progress.json", "adapter"
LEGACY_STATE = "state.pt"  # older llm_sft's torch.save (pickle); read with torch.load(weights_only=True) only
STATE_FORMAT = "llm_sft.checkpoint.state/1"
_STEP = re.compile(r"step-(\d{8})")
_SCALARS = (bool, int, float, str, type(None))

log = logging.getLogger(__name__)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (llm_sepweight's writer): readers see the old or the new file."""
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def _fsync_tree(root: Path) -> None:
    """Files first, then their folders: after this the whole tree is on disk."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        fsync_dir(path)


def _join(key: str, part: object) -> str:
    return f"{key}.{part}" if key else str(part)


def _to_json(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as plain JSON, its tensors moved into ``tensors`` under flat keys that follow the nesting.

    A tensor becomes ``{"$tensor": key}``, a tuple ``{"$tuple": [...]}``, and a dict whose keys are
    not all strings free of ``$`` (the optimizer's ``state`` is keyed by parameter index)
    ``{"$items": [[k, v], ...]}``, so that everything reads back as the same type.
    """
    if isinstance(obj, torch.Tensor):
        name, n = key, 1
        while name in tensors:  # "a.b" + "c" and "a" + "b.c" would meet: keep both
            name, n = f"{key}#{n}", n + 1
        tensors[name] = obj
        return {"$tensor": name}
    if type(obj) in _SCALARS:  # exact types: a numpy scalar or an IntEnum would not read back as itself
        return obj
    if isinstance(obj, list | tuple):
        items = [_to_json(v, _join(key, i), tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, dict):  # an OrderedDict reads back as a dict (load_state_dict takes either)
        if all(type(k) is str and not k.startswith("$") for k in obj):
            return {k: _to_json(v, _join(key, k), tensors) for k, v in obj.items()}
        for k in obj:
            if type(k) not in _SCALARS:
                raise TypeError(f"checkpoint state {key!r}: a dict key {k!r} ({type(k).__name__}) cannot be stored")
        return {"$items": [[k, _to_json(v, _join(key, k), tensors)] for k, v in obj.items()]}
    msg = (
        f"checkpoint state {key!r}: a {type(obj).__name__} cannot be stored "
        "(tensors, numbers, strings, None, lists, tuples and dicts only)"
    )
    raise TypeError(msg)


def _from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_to_json`; takes each tensor out of ``tensors``."""
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and "$tensor" in obj:
        if obj["$tensor"] not in tensors:
            raise ValueError(f"tensor {obj['$tensor']!r} is not in {STATE_TENSORS}")
        return tensors.pop(obj["$tensor"])
    if len(obj) == 1 and "$tuple" in obj:
        return tuple(_from_json(v, tensors) for v in obj["$tuple"])
    if len(obj) == 1 and "$items" in obj:
        return {k: _from_json(v, tensors) for k, v in obj["$items"]}
    return {k: _from_json(v, tensors) for k, v in obj.items()}


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    """``state.safetensors`` (its tensors, in their own dtypes) and ``state.json`` (the rest) in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _to_json(state, "", tensors)
    save_safetensors(folder / STATE_TENSORS, tensors, metadata={"format": "pt"}, fsync=False)  # fsynced with the folder
    (folder / STATE_JSON).write_text(json.dumps({"format": STATE_FORMAT, "state": skeleton}, indent=1) + "\n")


def _damaged(path: Path, file: Path, why: object) -> ValueError:
    return ValueError(
        f"{file}: this checkpoint cannot be read ({why}); delete {path} to resume from the one before it "
        "(if kept: keep_checkpoints > 1), or start afresh with resume=False (--no-resume)"
    )


def _read_state(path: Path) -> dict[str, Any]:
    tensors_file, json_file, legacy = path / STATE_TENSORS, path / STATE_JSON, path / LEGACY_STATE
    if not tensors_file.exists() and legacy.is_file():
        log.warning(
            "%s: a checkpoint of an older llm_sft (%s): read with torch.load(weights_only=True); "
            "the next checkpoint is written as %s + %s",
            path,
            LEGACY_STATE,
            STATE_TENSORS,
            STATE_JSON,
        )
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, or a pickle that weights_only refuses
            raise _damaged(path, legacy, e) from e
    for file in (tensors_file, json_file):
        if not file.is_file():
            raise _damaged(path, file, "the file is missing")
    try:
        tensors = load_safetensors(tensors_file, use_mmap=False)  # fresh memory: the optimizer keeps these tensors
    except (ValueError, OSError) as e:  # SepweightError: truncated, bad header, ...
        # its message names the file too and suggests a re-download, which fits weights, not a checkpoint
        why = str(e).removeprefix(f"{tensors_file}: ").split(". The file is truncated or corrupted")[0]
        raise _damaged(path, tensors_file, why) from e
    try:
        doc = json.loads(json_file.read_text())
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"format {found!r}, expected {STATE_FORMAT!r}")
        state = _from_json(doc["state"], tensors)
    except (ValueError, KeyError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
        raise _damaged(path, json_file, e) from e
    if tensors:
        raise _damaged(path, tensors_file, f"tensors {sorted(tensors)[:3]} are not named in {STATE_JSON}")
    return state


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
    """Write ``state`` (tensors in nested dicts/lists) and ``progress`` (JSON) as checkpoint ``step``, atomically.

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
    try:
        _write_state(tmp, state)
        (tmp / PROGRESS).write_text(json.dumps(progress, indent=1) + "\n")
        if write_adapter is not None:
            write_adapter(tmp / ADAPTER)
        _fsync_tree(tmp)
    except Exception:  # e.g. a state that cannot be stored: leave nothing behind (a kill leaves tmp-*)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)  # make the rename itself durable
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
    """``(state, progress)`` of a checkpoint folder, tensors on CPU in the dtypes they were saved in.

    A damaged or incomplete folder is a ``ValueError`` naming the file; an older llm_sft's ``state.pt``
    is read with ``torch.load(weights_only=True)`` (logged).

    Example::

        state, progress = load_checkpoint(latest_checkpoint("out/checkpoints"))
        state["optimizer"]["state"][0]["exp_avg"]       # AdamW's first moment of parameter 0
    """
    path = Path(path)
    state = _read_state(path)
    try:
        progress = json.loads((path / PROGRESS).read_text())
    except (ValueError, OSError) as e:
        raise _damaged(path, path / PROGRESS, e) from e
    return state, progress


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _kind(x: object) -> str | None:
    """The kind of a value in optimizer / scheduler state, as torch uses it; None for None."""
    if isinstance(x, bool):
        return "a bool"
    if _is_number(x) or isinstance(x, torch.Tensor):  # torch takes a tensor learning rate or beta
        return "a number"
    for types, kind in ((str, "a string"), (dict, "an object"), (list | tuple, "a list")):
        if isinstance(x, types):
            return kind
    return None


def _unlike(saved: Any, current: Any, key: str) -> str | None:
    """Where ``saved`` (read back from a checkpoint) is not of the kind of ``current`` (the live object's
    state), in words; None when alike. Kinds, not values: an int may stand for a float, a list for a
    tuple, None for a bool (torch's optional flags such as ``foreach``); a None in ``current`` takes anything."""
    want, got = _kind(current), _kind(saved)
    if want is None or (want == "a bool" and saved is None):
        return None
    if got != want:
        return f"{key} is {saved!r}, not {want} like the live object's {current!r}"
    if isinstance(current, dict):
        return next((w for k in current if k in saved and (w := _unlike(saved[k], current[k], f"{key}.{k}"))), None)
    if isinstance(current, list | tuple):
        if len(saved) != len(current):
            return f"{key} has {len(saved)} entries, the live object's {len(current)}"
        return next((w for i, (a, b) in enumerate(zip(saved, current)) if (w := _unlike(a, b, f"{key}.{i}"))), None)
    return None


def _check_progress(ckpt: Path, progress: Any) -> None:
    """progress.json holds what ``sft`` resumes from, of the types it wrote."""
    why = None
    if not isinstance(progress, dict):
        why = f"it holds {type(progress).__name__}, not an object"
    else:
        for key, ok, want in (
            ("step", _is_count, "a non-negative integer"),
            ("epoch", _is_count, "a non-negative integer"),
            ("groups_done", _is_count, "a non-negative integer"),
            ("settings", lambda x: isinstance(x, dict), "an object"),
            ("history", _is_history, "a list of step records (step, epoch, loss, lr, targets, tokens, ...)"),
        ):
            if key not in progress:
                why = f"no {key!r}"
            elif not ok(progress[key]):
                why = f"{key!r} is {str(progress[key])[:80]}, not {want}"
            if why:
                break
    if why:
        raise _damaged(ckpt, ckpt / PROGRESS, f"{why}: was it edited by hand?")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


_STEP_FIELDS = {"step", "epoch", "loss", "lr", "targets", "tokens", "tokens_per_s", "elapsed_s"}  # + eval_loss


def _is_history(x: object) -> bool:
    return isinstance(x, list) and all(
        isinstance(h, dict) and _STEP_FIELDS <= h.keys() <= _STEP_FIELDS | {"eval_loss"} for h in x
    )


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
    _check_progress(ckpt, progress)
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
    shapes = [k for k, p in trainable.items() if not isinstance(saved[k], torch.Tensor) or saved[k].shape != p.shape]
    if shapes:
        raise _damaged(
            ckpt,
            ckpt / STATE_TENSORS,
            f"trainable.{shapes[0]} is not a tensor of shape {list(trainable[shapes[0]].shape)}",
        )
    for key, was, live in (
        ("optimizer.param_groups", state["optimizer"]["param_groups"], optimizer.state_dict()["param_groups"]),
        ("scheduler", state["scheduler"], None if lr_scheduler is None else lr_scheduler.state_dict()),
    ):  # (a checkpoint without a scheduler is refused below, saying so)
        if live is not None and was is not None and (why := _unlike(was, live, key)):
            raise _damaged(
                ckpt, ckpt / STATE_JSON, f"{why}: edited by hand, or written for another {key.split('.')[0]}?"
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
