"""The safetensors header: dtypes, where each tensor lies, and the validation of both.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and then the raw little-endian tensor bytes, offsets relative to the end of the header.
:func:`read_header` refuses what the safetensors package refuses and names the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SepweightError

assert sys.byteorder == "little", "safetensors stores little-endian data; big-endian hosts are unsupported"

# safetensors dtype string <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offset relative to the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def _fail(path: Path, what: str) -> SepweightError:
    return SepweightError(
        f"{path}: not a valid safetensors file ({what}). The file is truncated or corrupted: "
        "re-download it, or re-run the conversion that wrote it."
    )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header; checks that the file holds exactly the bytes it declares.

    Refuses what the safetensors package refuses: a header length beyond the file, a header that is
    not a JSON object of well-formed entries, a shape and dtype that do not fill their byte range,
    and byte ranges that overlap, leave gaps, or do not cover the data section exactly.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise _fail(path, f"header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise SepweightError(f"{path}: file not found") from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise _fail(path, f"key {e.args[0]!r} appears twice in the header") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    bad_meta = [(k, v) for k, v in metadata.items() if not isinstance(v, str)] if isinstance(metadata, dict) else []
    if not isinstance(metadata, dict) or bad_meta:
        what = f"key {bad_meta[0][0]!r} holds {bad_meta[0][1]!r}" if bad_meta else f"it is {metadata!r}"
        raise _fail(path, f"__metadata__ must map strings to strings; {what}")
    tensors = {name: _entry(path, name, entry) for name, entry in obj.items()}
    data_start = 8 + n
    _check_coverage(path, tensors, size - data_start)
    return Header(tensors, metadata, data_start, size)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook: Python's json keeps the last of two equal keys, the safetensors package refuses."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, entry: object) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape, and offsets that hold exactly shape x dtype."""
    why = ""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        why = "it needs dtype, shape and data_offsets"
    elif not (isinstance(entry["shape"], list) and all(_is_count(d) for d in entry["shape"])):
        why = "shape must be a list of non-negative integers"
    elif not (isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2):
        why = "data_offsets must be two non-negative integers"
    elif not all(_is_count(o) for o in entry["data_offsets"]):
        why = "data_offsets must be two non-negative integers"
    if why:
        raise _fail(path, f"tensor {name!r} has a malformed entry {entry!r}: {why}")
    assert isinstance(entry, dict)
    dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if end < begin:
        raise _fail(path, f"tensor {name!r}: data_offsets {[begin, end]} end before they begin")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if need != end - begin:
        raise _fail(
            path,
            f"tensor {name!r}: offsets [{begin}, {end}) do not match shape {list(shape)} {dtype} "
            f"(it needs {need} bytes, they hold {end - begin})",
        )
    return TensorInfo(dtype, shape, begin, end)


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The byte ranges, sorted, must tile the data section: no overlap, no gap, nothing after the last."""
    at, last = 0, ""
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < at:
            prev = tensors[last]
            raise _fail(
                path, f"tensor {name!r}: bytes [{t.begin}, {t.end}) overlap tensor {last!r} [{prev.begin}, {prev.end})"
            )
        if t.begin > at:
            raise _fail(path, f"bytes [{at}, {t.begin}) before tensor {name!r} belong to no tensor")
        if t.end > data_len:
            raise _fail(
                path,
                f"data section truncated: tensor {name!r} at [{t.begin}, {t.end}) runs past its end, "
                f"the file holds {data_len} bytes of data",
            )
        at, last = t.end, name
    if at != data_len:
        after = f"the last tensor {last!r}" if last else "the header"
        raise _fail(path, f"data section has trailing bytes: {data_len - at} after {after} belong to no tensor")
