"""Read and write safetensors files (what PEFT and transformers write) with torch alone.

Layout: an 8-byte little-endian header length N, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the end
of the header. The safetensors package's writer needs numpy, which torch does not install; this
one writes each tensor's bytes straight from its memory (a mmapped view is not copied).
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import LoraError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # as the safetensors package


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them (and without numpy)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file, fsync, rename), in the given order.

    Example::

        write_safetensors(Path("a.safetensors"), {"w": torch.ones(2, 3)}, {"format": "pt"})
    """
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data: list[torch.Tensor] = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise LoraError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().to("cpu").contiguous()  # a no-op for contiguous CPU tensors (mmapped views included)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        data.append(t)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in data:
            f.write(_bytes(t))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a whole (small) safetensors file into RAM, validating its header against its size.

    Example::

        tensors = read_safetensors(Path("adapter_model.safetensors"))
    """
    data = path.read_bytes()

    def bad(why: str) -> LoraError:
        return LoraError(f"{path}: not a valid safetensors file ({why}); re-save it")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad(f"header length {n} exceeds the file's {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed: {info!r}") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if (
            not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body))
            or end - begin != size
        ):
            raise bad(
                f"tensor {name!r}: data_offsets {[begin, end]} do not hold {shape} {info['dtype']} inside the file"
            )
        raw = (
            torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8)
            if size
            else torch.empty(0, dtype=torch.uint8)
        )
        out[name] = raw.view(dtype).reshape(shape)
    return out


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none); the data is not read.

    Example::

        read_safetensors_metadata(Path("adapter_model.safetensors"))     # {"format": "pt", ...}
    """
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= _MAX_HEADER else b""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoraError(f"{path}: not a valid safetensors file (unreadable header); re-save it") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
