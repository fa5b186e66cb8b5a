"""Whole safetensors files as ``dict[str, Tensor]``: the safetensors package's verbs, without numpy.

``save_safetensors`` writes atomically (temp file, fsync, rename) and streams each tensor in bounded
chunks; ``load_safetensors`` validates the header as strictly as the safetensors package (byte
ranges that tile the data exactly, shapes that fill them) and names the file and tensor on error.
For adapters, shards and other small files; sepweight folders have :class:`SepWeights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import SepweightError
from .safetensors_io import DTYPE_NAMES, TensorSpec, open_tensors, read_header, write_file


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> Path:
    """Write ``tensors`` (in the given order) to a safetensors file, atomically; returns the path.

    Readers see the old file or the complete new one, never half of it, even if the write is killed.
    Tensors on any device or stride are written contiguous, in their own dtype.

    Example::

        save_safetensors("adapter_model.safetensors", {"w": torch.ones(2, 3)}, metadata={"format": "pt"})
    """
    path = Path(path)
    for name, t in tensors.items():
        if not isinstance(name, str):  # json.dumps would write 1 as "1": it would read back as another key
            raise SepweightError(f"{path}: tensor name {name!r} is a {type(name).__name__}, not a string")
        if not isinstance(t, torch.Tensor):
            raise SepweightError(f"{path}: tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_meta:
            raise SepweightError(f"{path}: tensor {name!r} is on the meta device (it has no data to write)")
        if t.layout != torch.strided:
            raise SepweightError(f"{path}: tensor {name!r} is sparse (layout {t.layout}); pass t.to_dense()")
        if t.dtype not in DTYPE_NAMES:
            raise SepweightError(
                f"{path}: tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors; "
                f"convert it to one of {sorted(str(d) for d in DTYPE_NAMES)}"
            )
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SepweightError(f"{path}: metadata {key!r}: {value!r} must be a string mapped to a string")
    specs = [TensorSpec(name, t, t.dtype) for name, t in tensors.items()]
    with atomic_write(path, fsync=fsync) as f:
        write_file(f, specs, dict(metadata) if metadata else None)
    return path


def load_safetensors(path: str | os.PathLike[str], *, use_mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU, after validating its header against its size.

    With ``use_mmap`` (default) they are zero-copy views of a private, copy-on-write memory map
    (writing to one never touches the file); otherwise they are read into fresh memory.
    Raises :class:`SepweightError` naming the file and tensor for anything the safetensors package
    refuses (overlapping or uncovered byte ranges, a shape that does not fill its bytes, a truncated file).

    Example::

        tensors = load_safetensors("adapter_model.safetensors", use_mmap=False)
    """
    return open_tensors(path, use_mmap=use_mmap)


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none); the header is validated, the data not read.

    Example::

        safetensors_metadata("adapter_model.safetensors")     # {"format": "pt"}
    """
    return dict(read_header(path).metadata)
