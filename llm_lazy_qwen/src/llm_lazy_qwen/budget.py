"""The memory budget: which layers / head chunks stay resident and which stream, as a pure function of sizes.

Under ``load_part(..., memory_budget=...)`` a lazy part adds to its process, above the baseline:

- the resident items, held for good in the compute dtype (read once; their page cache dropped);
- streaming buffers of the largest streamed item (+ its converted copy when the stored dtype is not
  the compute dtype): ``prefetch + 1`` of them (the one in use, and those read meanwhile);
- the page cache of the read in progress: streamed reads evict each piece right after reading it;
- the KV cache for ``max_context`` tokens x ``max_batch`` rows (``part.new_cache()`` allocates them at
  once under a budget, instead of growing by doubling);
- the activations of one forward of ``max_tokens`` tokens per row (longer forwards through a KV cache
  run in chunks of that many; without one they are refused), and the logits of one position per row;
- quantized folders: the buffer their prefill dequantizes a weight into (``quant.scratch_bytes``),
  and, per int4 item, the kernel's transposed copy of its scales (counted in the item's size).

Not counted: the process's bookkeeping (the prefetch and reader threads' stacks and malloc arenas, the
per-item Python objects): up to ~1 MiB above the plan, measured +0.4 MiB on a 26.6 MiB plan in a fresh process.

:func:`plan_memory` keeps as much resident as fits, so the bytes read per token (the stored bytes of
the streamed items) are the least the budget allows. Under a budget every linear of a layer is planned
in row slabs (``(layer, "mlp.up_proj", j)``: output rows of its stored tensors, ~``SLAB_BYTES`` each,
stream_items.py), used one at a time just in time (slab_linear.py), plus one tiny item per layer that is
always resident (its norms and biases: ``(layer, "small")``). So a layer can be part resident and part
streamed, and a buffer holds one slab: on the Qwen2.5-7B shape ~27 MB instead of a 466 MB layer, which
leaves more of the budget to resident weights. Without a budget the page cache decides instead,
and in a box smaller than the model its LRU evicts exactly the layer needed next: every token then
re-reads the whole model (notes: 14.1 GB per token for a 15.2 GB model in an 8 GiB box).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .attention import attention_bytes
from .config import QwenConfig

# a layer index, a head chunk (first row, last row + 1), a layer's small tensors (index, "small"), or slab j of
# one of a layer's linears (index, "mlp.up_proj", j)
Item = int | tuple[int, int] | tuple[int, str] | tuple[int, str, int]
MAX_TOKENS = 512  # tokens per row of the largest forward the plan makes room for, by default

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({u: 1024**p for p, u in enumerate(("", "k", "m", "g", "t")) if u})
_UNITS.update({f"{u}ib": 1024**p for p, u in enumerate(("", "k", "m", "g", "t")) if u})
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with a unit: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and
    K/M/G/T (as ``memlimit 8G``, docker, ``free -g``) powers of 1024.

    Example::

        parse_size("7.5GiB")  # 8053063680
        parse_size("800MB")   # 800000000
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"memory_budget must be an int (bytes) or a string like '6GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget {value!r} is not a size; use bytes (an int) or a number with a unit: '800MB', "
                "'7.5GiB', '6G' (KB/MB/GB = powers of 1000, KiB/MiB/GiB or K/M/G = powers of 1024)"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return n


def size_argument(text: str) -> int:
    """:func:`parse_size` as an argparse ``type``: a bad size is argparse's one-line usage error (status 2).

    Example::

        parser.add_argument("--memory-budget", type=size_argument)  # "6GiB" -> 6442450944
    """
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: int) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512 B``: for messages."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ItemSize:
    """What one streamable item costs: bytes read from disk, and bytes held in the compute dtype."""

    item: Item
    stored: int  # bytes on disk: read once per token when streamed
    resident: int  # bytes when held in the compute dtype (ints keep their stored size), + kernel scales
    converted: bool = False  # stored floats differ from the compute dtype: a copy is made after the read
    forced: bool = False  # always resident (a layer's norms and biases: tiny, used with each of its slabs)

    @property
    def slot(self) -> int:
        """Memory of one streamed copy in flight: its read buffer, plus the converted copy."""
        return self.stored + self.resident if self.converted else self.resident


@dataclass(frozen=True)
class Runtime:
    """Memory a forward needs besides the weights (bytes)."""

    kv_cache: int = 0
    activations: int = 0
    logits: int = 0
    # of the read in progress (none with O_DIRECT; else the piece read at a time): at most this, and
    # plan_memory counts no more than the largest streamed item (resident reads' pages are reclaimable)
    page_cache: int = 0
    scratch: int = 0  # quantized weights: the buffer prefill dequantizes the largest linear into
    context: int = 0  # tokens per row the KV cache is made for (``part.new_cache()`` allocates them at once)
    tokens: int = 0  # tokens per row of the largest forward (``max_tokens``, at most ``context``); 0: unsized
    reserved: int = 0  # kept for the caller (``load_part(..., reserve=...)``): e.g. training state

    @property
    def total(self) -> int:
        return self.kv_cache + self.activations + self.logits + self.page_cache + self.scratch + self.reserved

    def describe(self) -> str:
        parts = [
            ("KV cache", self.kv_cache),
            (f"activations of {self.tokens}-token forwards" if self.tokens else "activations", self.activations),
            ("logits", self.logits),
            ("page cache of a read", self.page_cache),
            ("dequantize buffer", self.scratch),
            ("reserved for the caller", self.reserved),
        ]
        return ", ".join(f"{name} {format_size(n)}" for name, n in parts if n)


def layer_activation_bytes(config: QwenConfig, tokens: int, itemsize: int) -> int:
    """Activations of one decoder layer over `tokens` tokens (all rows): the residual stream and norms,
    q/k/v with RoPE temporaries, gate/up/product. The one formula for forward (:func:`runtime_bytes`)
    and training (``llm_sft.training_reserve``) budgets.

    Example::

        layer_activation_bytes(QwenConfig.from_dict(cfg), tokens=512, itemsize=2)
    """
    d, n_heads, n_kv = config.head_dim or 0, config.num_attention_heads, config.num_key_value_heads or 1
    H, inter = config.hidden_size, config.intermediate_size
    return itemsize * tokens * (10 * H + 4 * inter + 3 * (n_heads + 2 * n_kv) * d)


def runtime_bytes(
    config: QwenConfig,
    layers: int,
    head: bool,
    itemsize: int,
    *,
    max_context: int = 4096,
    max_batch: int = 1,
    max_tokens: int = MAX_TOKENS,
    head_chunk_size: int = 16384,
    page_cache: int = 0,
    scratch: int = 0,
    reserved: int = 0,
) -> Runtime:
    """KV cache, activations and logits of a part with `layers` decoder layers (and the head if `head`).

    Activations are those of one forward of `max_tokens` tokens per row (at most `max_context`) x
    `max_batch` rows; attention repeats no keys or values over the query heads (attention.py), so
    what it adds is its mask and kernel blocks (:func:`~llm_lazy_qwen.attention.attention_bytes`; the
    ``repeat_interleave`` of the whole context, 59 MB per layer on the 7B shape at 4096 tokens, is gone).
    Logits are counted for one position per row: what generation keeps (llm_sampler's
    ``logits_to_keep=1``, so the chat, ``IncrementalPart`` and llm-pipeline generate). A forward keeping the logits
    of n positions per row holds ``n x vocab_size x itemsize`` more per row (156 MB for 512 positions
    of the 7B shape in bf16), which is the caller's result: budget it with ``reserve``.

    Example::

        runtime_bytes(QwenConfig.from_dict(cfg), layers=28, head=True, itemsize=2, max_context=4096)
    """
    if max_context < 1 or max_batch < 1 or max_tokens < 1:
        raise ValueError(
            f"max_context, max_batch and max_tokens must be >= 1, got {max_context}, {max_batch}, {max_tokens}"
        )
    d, n_heads, n_kv = config.head_dim or 0, config.num_attention_heads, config.num_key_value_heads or 1
    H = config.hidden_size
    # k and v of every layer, allocated for max_context tokens at once (FullLayerCache's capacity)
    kv = 2 * layers * max_batch * n_kv * d * itemsize * max_context
    tokens = min(max_tokens, max_context)
    T = max_batch * tokens
    act = layer_activation_bytes(config, T, itemsize) + 4 * T * H * 2  # (+ the norms' fp32 insides)
    act += attention_bytes(max_batch, tokens, max_context, n_heads // n_kv, itemsize)
    # one kept position per row: the (B, 1, V) logits and one head chunk's product
    logits = itemsize * max_batch * (config.vocab_size + min(head_chunk_size, config.vocab_size)) if head else 0
    activations = act if layers or head else 0
    return Runtime(kv, activations, logits, page_cache, scratch, context=max_context, tokens=tokens, reserved=reserved)


@dataclass(frozen=True)
class MemoryPlan:
    """Which items stay resident and which stream, and what that costs. ``str(plan)`` is one summary line."""

    budget: int
    resident: tuple[Item, ...]
    streamed: tuple[Item, ...]  # in the part's order
    resident_bytes: int  # held for good, compute dtype
    read_per_token: int  # stored bytes of the streamed items: read from disk every forward
    model_bytes: int  # stored bytes of all items
    slots: int  # streaming buffers (0 when nothing streams)
    slot_bytes: int  # each: the largest streamed item's read buffer (+ converted copy)
    load_bytes: int  # transient while a converted resident item is read
    runtime: Runtime = field(default_factory=Runtime)
    minimum: int = 0  # the smallest budget that runs this part at all

    @property
    def peak(self) -> int:
        """Estimated peak memory above the process's baseline (<= budget)."""
        return self.resident_bytes + self.slots * self.slot_bytes + self.load_bytes + self.runtime.total

    def __str__(self) -> str:
        n = len(self.resident) + len(self.streamed)
        return (
            f"memory plan: budget {format_size(self.budget)}; {len(self.resident)} of {n} items resident "
            f"({format_size(self.resident_bytes)}), {len(self.streamed)} streamed: "
            f"{format_size(self.read_per_token)} read per token of {format_size(self.model_bytes)}; "
            f"estimated peak {format_size(self.peak)} = resident + {self.slots} buffers of "
            f"{format_size(self.slot_bytes)} + {self.runtime.describe() or 'nothing else'}"
        )


def _spread(members: list[ItemSize], keep: int) -> set[Item]:
    """`keep` of `members` (one size class, in part order) to hold, the streamed rest evenly spaced:
    a streamed item's read then overlaps the compute of the resident ones before it."""
    n, m = len(members), len(members) - keep
    streamed = {int((j + 0.5) * n / m) for j in range(m)} if m else set()
    return {s.item for k, s in enumerate(members) if k not in streamed}


def layer_of(item: Item) -> int | None:
    """The layer a layer's item (its small tensors, or a slab) belongs to; None for a whole layer or a head chunk."""
    return item[0] if isinstance(item, tuple) and isinstance(item[1], str) else None


def _hold(free: list[ItemSize], cap: int, largest_first: bool) -> set[Item]:
    """Items of `free` to keep within `cap` bytes: most bytes saved per byte held first (unconverted
    items), then by size; a class of equal sizes keeps its streamed members spread."""
    keep: set[Item] = set()
    classes: dict[tuple[int, int], list[ItemSize]] = {}
    for s in free:
        classes.setdefault((s.resident, s.stored), []).append(s)
    for size, saved in sorted(classes, key=lambda c: (-c[1] / max(c[0], 1), -c[0] if largest_first else c[0])):
        members = classes[size, saved]
        k = min(len(members), max(cap, 0) // size) if size else len(members)
        keep |= _spread(members, k)
        cap -= k * size
    return keep


def plan_memory(budget: int, items: Sequence[ItemSize], runtime: Runtime, slots: int) -> MemoryPlan:
    """The plan that reads the fewest bytes per token within `budget` (ties: the lower peak).

    `slots` is the number of streaming buffers (``prefetch + 1``: the item in use and those being
    read); items are used one at a time (whole layers, head chunks, slabs of a linear).

    For each candidate buffer size S (no streaming, or the slot of some item), items whose slot
    exceeds S must be resident, and so must ``forced`` ones; the others are held while they fit, in
    order of stored bytes saved per byte held, then largest first or smallest first (both are tried).
    Raises ValueError when nothing fits.

    Example::

        items = [ItemSize(i, 100 << 20, 100 << 20) for i in range(24)]
        plan = plan_memory(1 << 30, items, Runtime(kv_cache=64 << 20), slots=2)
        plan.resident, plan.read_per_token   # 7 layers held; 17 x 100 MiB read per token
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if len({s.item for s in items}) != len(items):
        raise ValueError("plan_memory: an item is listed twice")
    stored = sum(s.stored for s in items)
    load = max((s.stored for s in items if s.converted), default=0)
    # kept whatever S: forced ones, and those with nothing to read or hold
    always = [s for s in items if s.forced or not (s.slot or s.stored)]
    movable = [s for s in items if s not in always]
    best: MemoryPlan | None = None
    minimum: int | None = None
    least = runtime  # the runtime of the least budget that runs
    for S in [0, *sorted({s.slot for s in movable})]:
        forced = always + [s for s in movable if s.slot > S]
        rest = [s for s in movable if s.slot <= S]
        # the page cache of a streamed read: no more than the largest item that may stream
        run = replace(runtime, page_cache=min(runtime.page_cache, max((s.stored for s in rest), default=0)))
        base = run.total + (slots * S if S else 0) + sum(s.resident for s in forced)
        need = base + (load if any(s.converted for s in forced) else 0)
        if minimum is None or need < minimum:
            minimum, least = need, run
        if need > budget:
            continue
        cap = budget - base - (load if any(s.converted for s in items) else 0)
        for largest_first in (True, False):
            keep = {s.item for s in forced} | _hold(rest, cap, largest_first)
            held = [s for s in items if s.item in keep]
            streamed = tuple(s.item for s in items if s.item not in keep)
            plan = MemoryPlan(
                budget=budget,
                resident=tuple(s.item for s in held),
                streamed=streamed,
                resident_bytes=sum(s.resident for s in held),
                read_per_token=sum(s.stored for s in items if s.item not in keep),
                model_bytes=stored,
                slots=slots if streamed else 0,
                slot_bytes=max((s.slot for s in items if s.item not in keep), default=0),
                load_bytes=load if any(s.converted for s in held) else 0,
                runtime=run,
            )
            if best is None or (plan.read_per_token, plan.peak) < (best.read_per_token, best.peak):
                best = plan
    assert minimum is not None
    if best is None:
        big = max(movable, key=lambda s: s.slot, default=None)
        buffers = f"{slots} streaming buffers of {format_size(big.slot)} (the largest item), " if big else ""
        raise ValueError(
            f"memory_budget {format_size(budget)} is too small to run this part: it needs at least "
            f"{format_size(minimum)} ({buffers}{least.describe()}); raise the budget, lower max_context "
            "or max_batch, or store the model quantized (llm-sepweight convert SRC DST --quant int8)"
        )
    return replace(best, minimum=minimum)
