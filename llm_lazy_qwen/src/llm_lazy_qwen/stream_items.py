"""What a streamer streams: items (a layer, a head chunk, a layer's small tensors, a slab of a linear),
where llm_sepweight keeps each, and the bytes each takes on disk and in memory.

Under a memory budget (see streaming.py) a layer streams as one small resident item (norms, biases) and
each linear as row slabs of about :data:`SLAB_BYTES` (:func:`layer_slabs`), in :data:`USE_ORDER`.
"""

from __future__ import annotations

import math

import torch

from llm_sepweight import SepWeights

from .budget import Item, ItemSize, layer_of

Tensors = dict[str, torch.Tensor]
_INT_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "I32": 4, "I64": 8}
_INT4_SCALES = "scales_and_zeros"  # the int4 kernel takes them transposed: a copy per weight in use
Rows = list[tuple[str, int, int]]  # (key, first row, last row + 1) of each tensor of a head chunk


def head_keys(source: SepWeights) -> list[str]:
    """The stored tensors a head chunk is rows of: the weight, or a quantized head's integers and scales."""
    spec = source.linears("end").get("lm_head") if source.spec.end else None
    return ["lm_head.weight"] if spec is None else ["lm_head.qweight", f"lm_head.{spec.scales_key}"]


SMALL = "small"  # (layer, SMALL): a layer's tensors that are not linear weights (norms, biases); kept resident
SLAB_BYTES = 32 << 20  # stored bytes a slab of a linear aims at (buffers ~ this; more slabs per linear below it)
USE_ORDER = (  # the order a decoder layer uses its linears: slabs stream in it, just in time
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_INT4_ROWS = 64  # int4 in a kernel layout is cut at multiples of the largest block (as the head's chunks)
_ROWS = 8  # other weights: slab boundaries at multiples of this many rows


def linear_keys(source: SepWeights, i: int, name: str) -> list[str]:
    """The stored tensors slabs of linear `name` of layer i are rows of: its weight, or a quantized
    weight's integers and scales (biases live in the layer's small item)."""
    spec = source.linears(i).get(name)
    return [f"{name}.weight"] if spec is None else [f"{name}.qweight", f"{name}.{spec.scales_key}"]


def layer_slabs(source: SepWeights, i: int) -> tuple[list[str], dict[str, list[tuple[int, int]]]]:
    """How a memory budget streams layer i: its small tensors (norms, biases: one item, always resident)
    and, for each linear in the order of use, its slabs' output rows ``[(first, stop), ...]``: about
    :data:`SLAB_BYTES` each, nearly equal, cut at multiples of 64 rows for int4 kernel layouts.

    Example::

        small, slabs = layer_slabs(SepWeights("qwen7b-sep"), 0)
        small        # ["input_layernorm.weight", "self_attn.q_proj.bias", ...]
        slabs["mlp.gate_proj"]   # [(0, 3792), (3792, 7584), ..., (15168, 18944)]: 5 slabs of ~27 MB
    """
    tensors = source.manifest.files[f"mid.{i:05d}.safetensors"].tensors
    quant = source.linears(i)
    names = [k.rsplit(".", 1)[0] for k, t in tensors.items() if k.endswith(".weight") and len(t["shape"]) == 2]
    names = sorted(set(names) | set(quant), key=lambda n: USE_ORDER.index(n) if n in USE_ORDER else len(USE_ORDER))
    linear = {key for n in names for key in linear_keys(source, i, n)}
    small = [k for k in tensors if k not in linear]
    slabs = {}
    for name in names:
        keys = linear_keys(source, i, name)
        rows = int(tensors[keys[0]]["shape"][0])
        spec = quant.get(name)
        step = _INT4_ROWS if spec is not None and spec.scheme == "int4" and spec.layout != "rows" else _ROWS
        n = max(1, -(-sum(source.nbytes(i, (k, 0, rows)) for k in keys) // SLAB_BYTES))
        size = rows if n == 1 else math.ceil(math.ceil(rows / n) / step) * step  # nearly equal, step-aligned
        slabs[name] = [(a, min(rows, a + size)) for a in range(0, rows, size)]
    return small, slabs


def _unit(item: Item) -> tuple[int, str] | None:
    """The linear a slab belongs to, ``(layer, "mlp.up_proj")``: its slabs are used in order; None otherwise."""
    return item[:2] if isinstance(item, tuple) and len(item) == 3 else None  # type: ignore[return-value]


def is_head_chunk(item: Item) -> bool:
    return isinstance(item, tuple) and isinstance(item[1], int)


def _where(source: SepWeights, item: Item, keys: list[str]) -> tuple[int | str, Rows | None]:
    """Where llm_sepweight keeps an item: (part, rows of each tensor read, or None for a whole layer);
    `keys` are the head's tensors (:func:`head_keys`)."""
    if is_head_chunk(item):
        first, stop = item  # type: ignore[misc]
        return "end", [(key, first, stop) for key in keys]
    i = layer_of(item)
    if i is not None and len(item) == 2:  # type: ignore[arg-type]
        return i, [(key, 0, source.shape(i, key)[0]) for key in layer_slabs(source, i)[0]]
    if i is not None:
        _, name, j = item  # type: ignore[misc]
        first, stop = layer_slabs(source, i)[1][name][j]
        return i, [(key, first, stop) for key in linear_keys(source, i, name)]
    return item, None  # type: ignore[return-value]


def _stored(source: SepWeights, part: int | str, rows: Rows | None) -> int:
    return source.nbytes(part) if rows is None else sum(source.nbytes(part, r) for r in rows)


def item_size(source: SepWeights, item: Item, dtype: torch.dtype) -> ItemSize:
    """Bytes an item takes on disk and in memory in the compute `dtype` (integer tensors keep theirs;
    int4 scales count twice: the int4 kernel keeps a transposed copy of them while the weights live)."""
    part, rows = _where(source, item, head_keys(source) if is_head_chunk(item) else [])
    stored = _stored(source, part, rows)
    if rows is not None:
        resident, converted = 0, False
        for r in rows:
            stored_dtype, nbytes = source.rows(part, r[0], 0, 0).dtype, source.nbytes(part, r)  # empty: no mapping
            if stored_dtype.is_floating_point:
                resident += nbytes // stored_dtype.itemsize * dtype.itemsize * (2 if _INT4_SCALES in r[0] else 1)
                converted |= stored_dtype != dtype
            else:
                resident += nbytes
        return ItemSize(item, stored, resident, converted, forced=isinstance(item, tuple) and item[1] == SMALL)
    resident, converted = 0, False
    for key, t in source.manifest.files[f"mid.{item:05d}.safetensors"].tensors.items():
        numel = math.prod(t["shape"])
        if t["dtype"] in _INT_BYTES:
            resident += numel * _INT_BYTES[t["dtype"]]
        else:
            resident += numel * dtype.itemsize * (2 if key.endswith(_INT4_SCALES) else 1)
            converted |= t["dtype"] != {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype)
    return ItemSize(item, stored, resident, converted)
