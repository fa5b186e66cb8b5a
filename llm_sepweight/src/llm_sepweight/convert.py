"""convert(): an HF checkpoint (local folder or hub id) -> a sepweight folder, streamed tensor by tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .errors import SepweightError
from .hub import fetch, looks_like_repo_id
from .manifest import FORMAT_VERSION, Manifest, Part
from .safetensors_io import TensorSpec
from .spec import PartSpec
from .writer import SepweightWriter

DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise SepweightError(f"dtype {dtype!r} is not supported; use one of bf16, fp16, fp32 (or None to keep)")


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    parts: str | PartSpec = "f",
    revision: str | None = None,
    fsync: bool = True,
) -> Manifest:
    """Convert a checkpoint into a sepweight folder; re-running resumes where a killed run stopped.

    Args:
        src: local HF checkpoint folder (safetensors single/sharded, or legacy pytorch_model*.bin),
            a hub repo id such as ``"Qwen/Qwen2.5-0.5B"`` (only the needed shards are downloaded), or a
            ``.gguf`` file (see :func:`llm_sepweight.gguf_import.convert_gguf`; dtype default bf16).
        dst: output folder.
        dtype: convert floating tensors to bf16 / fp16 / fp32; None keeps the stored dtype.
        parts: which parts to write, as a spec (``"f"`` full, ``"b 0-12"``, ...).

    Example::

        manifest = convert("path/to/Qwen2.5-0.5B", "qwen-sep", dtype="bf16")
        print(manifest.num_layers, list(manifest.files))
    """
    if str(src).lower().endswith(".gguf"):  # llama.cpp / ollama files: their own converter
        from .gguf_import import convert_gguf

        return convert_gguf(src, dst, dtype=dtype, progress=progress, parts=parts, fsync=fsync)
    spec = PartSpec.parse(parts)
    target = parse_dtype(dtype)
    src_str = str(src)
    if Path(src).exists():
        root = Path(src)
    elif looks_like_repo_id(src_str):
        root = fetch(src_str, spec, revision)
    else:
        raise SepweightError(f"{src}: no such folder, and not a hub repo id of the form 'owner/name'")
    ckpt = open_checkpoint(root, spec)
    spec = spec.resolve(ckpt.num_layers)
    plan = ckpt.plan(spec)
    writer = SepweightWriter(
        dst,
        ckpt.config,
        resume_key=_resume_key(ckpt, spec, target),
        source={"src": src_str, "revision": revision, "parts": str(spec), "dtype": str(target) if target else None},
        fsync=fsync,
    )
    for extra in ckpt.extra_files():
        writer.copy_extra(extra)
    order: list[Part] = (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else [])
    total = sum(_out_bytes(ckpt, plan[p], target) for p in order)
    shards = _ShardCache(ckpt)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {dst}", disable=not progress) as bar:
        for part in order:
            if not writer.done(part):
                shards.keep({fname for fname, _ in plan[part].values()})
                specs = []
                for rel, (fname, name) in sorted(plan[part].items()):
                    t = shards.get(fname)[name]
                    specs.append(TensorSpec(rel, t, _target(t.dtype, target)))
                writer.write(part, specs)
                del specs
            bar.update(_out_bytes(ckpt, plan[part], target))
    shards.keep(set())
    return writer.finish()


def _target(src: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and src.is_floating_point else src


def _out_bytes(ckpt: Checkpoint, entries: dict[str, tuple[str, str]], target: torch.dtype | None) -> int:
    total = 0
    for _, name in entries.values():
        dtype, numel = ckpt.sizes[name]
        total += numel * _target(dtype, target).itemsize
    return total


def _resume_key(ckpt: Checkpoint, spec: PartSpec, target: torch.dtype | None) -> str:
    """Identifies 'the same conversion': same source files (name, size, mtime), parts and dtype."""
    stats = {}
    for name in sorted(ckpt.files):
        st = (ckpt.root / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns]
    key = {
        "v": FORMAT_VERSION,
        "src": str(ckpt.root.resolve()),
        "files": stats,
        "parts": str(spec),
        "dtype": str(target),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class _ShardCache:
    """Opens the weight files a part reads from.

    safetensors files are re-mapped for every part and unmapped right after it, so the conversion's
    file-backed RSS is one part's source bytes, not the whole checkpoint (re-parsing a header is
    cheap). Legacy .bin files are expensive to open, so the current one stays open until a part
    needs another.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.open: dict[str, dict[str, torch.Tensor]] = {}

    def keep(self, names: set[str]) -> None:
        for name in list(self.open):
            if name not in names or self.ckpt.kind == "safetensors":
                del self.open[name]  # drops the mmap once no tensor refers to it

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.open:
            with self.ckpt.tensors(name) as tensors:
                self.open[name] = tensors
        return self.open[name]
