"""QwenPart: any contiguous part of a Qwen model as a plain nn.Module; equals transformers' Qwen2/Qwen3ForCausalLM.

Parameter names mirror transformers (``model.embed_tokens``, ``model.layers.{i}``, ``model.norm``,
``lm_head``, with absolute layer indices), so state dicts and PEFT adapter keys line up.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import PartSpec, QuantSpec, SepWeights, int4_layout

from .block import DecoderLayer
from .bsm_path import Matmul, check_matmul
from .budget import MAX_TOKENS, Item, MemoryPlan, parse_size, plan_memory, runtime_bytes
from .chunked import forward_in_chunks
from .config import QwenConfig
from .head import HeadMixin, LogitsToKeep, select_positions
from .inputs import check_input, check_tokens, keyword_inputs, masks, positions
from .kv_cache import KVCache
from .layers import RMSNorm, fits, linear, match_linears
from .quant import repacked, scratch_bytes
from .rope import RotaryEmbedding
from .slab_linear import SlabLinear, use_slabs
from .streaming import READ_PIECE, READERS, SMALL, LayerStreamer, Mode, item_size, layer_slabs
from .weights import assign, meta_placeholders, release

logger = logging.getLogger("llm_lazy_qwen")
P = ParamSpec("P")
R = TypeVar("R")


def _serialised(method: Callable[Concatenate[QwenPart, P], R]) -> Callable[Concatenate[QwenPart, P], R]:
    """Run a method of a lazy part under its lock: concurrent calls take turns (see ``materialized``)."""

    @functools.wraps(method)
    def run(self: QwenPart, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._lock is None:  # in RAM: a call changes nothing shared, calls run side by side
            return method(self, *args, **kwargs)
        with self._lock:
            return method(self, *args, **kwargs)

    return run


@dataclass
class Step:
    """What every layer of one forward call shares: RoPE tables, cache offset, masks."""

    cos: torch.Tensor  # (B, T, head_dim)
    sin: torch.Tensor
    start: int  # cache index of the first new token
    length: int  # T
    key_mask: torch.Tensor | None  # (B, start + T) bool, None = no padding
    cache: KVCache | None
    next_position: torch.Tensor | None = None  # (B,) the cache's after the step (committed by finish)
    rope_length: int | None = None  # dynamic RoPE: the cache's history after the step (committed by finish)


class QwenPart(HeadMixin, nn.Module):
    """Embedding (``b``), layers ``[a, b)`` and/or final norm + head (``e``) of a Qwen model.

    ``forward`` takes token ids (B, T) when the part holds the begin part, hidden states (B, T, H)
    otherwise, and returns logits (B, T_keep, V) when it holds the end part, hidden states
    otherwise, so parts chain across processes, devices and hosts. ``matmul="bsm"`` (CPU only, needs
    ``pip install llm_lazy_qwen[bsm]``) computes each layer's independent products as llm_bsm_kernel
    bundles; the default ``"torch"`` is the measured faster one (BENCHMARKS.md).

    Example::

        first = load_part("qwen-sep", "b 0-12")
        last = load_part("qwen-sep", "12-24 e")
        logits = last(first(ids))          # == the full model's logits
    """

    def __init__(
        self,
        config: QwenConfig,
        spec: str | PartSpec,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        head_chunk_size: int = 16384,
        matmul: Matmul = "torch",
    ) -> None:
        super().__init__()
        check_matmul(matmul, torch.device(device))
        self.config = config
        self.spec = PartSpec.parse(spec).resolve(config.num_hidden_layers)
        if not self.spec.is_contiguous():
            raise ValueError(f"part spec {str(self.spec)!r}: layers of a part must be one contiguous range")
        layers = list(self.spec.layers or ())
        if self.spec.begin and layers and layers[0] != 0:
            raise ValueError(f"part spec {str(self.spec)!r}: a part holding 'b' must start at layer 0")
        if self.spec.end and layers and layers[-1] != config.num_hidden_layers - 1:
            raise ValueError(
                f"part spec {str(self.spec)!r}: a part holding 'e' must end at the last layer "
                f"({config.num_hidden_layers - 1})"
            )
        if head_chunk_size < 1:
            raise ValueError(f"head_chunk_size must be >= 1, got {head_chunk_size}")
        self.device, self.dtype, self.head_chunk_size = torch.device(device), dtype, head_chunk_size
        self.matmul = matmul
        self.layer_ids = layers
        meta = torch.device("meta")
        self.model = nn.Module()
        # a given `_weight` skips the random init (which on meta imports torch._dynamo: ~2 s, ~60 MB)
        embed = torch.empty(config.vocab_size, config.hidden_size, device=meta)
        self.model.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size, _weight=embed) if self.spec.begin else None
        )
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, meta, matmul) for i in layers})
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, meta) if self.spec.end else None
        self.lm_head = linear(config.hidden_size, config.vocab_size, False, meta) if self.spec.end else None
        assert config.head_dim is not None and config.rope_parameters is not None
        self.rotary = RotaryEmbedding(
            config.rope_parameters, config.head_dim, config.max_position_embeddings, self.device
        )
        self._placeholders = {i: meta_placeholders(self.model.layers[str(i)]) for i in layers}
        self._streamer: LayerStreamer | None = None
        self._source: SepWeights | None = None
        self._head_spec: QuantSpec | None = None  # a quantized head (load_weights)
        self._head_chunk = head_chunk_size  # multiple of 64 for an int4 head in a kernel layout
        self._head_views: tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]] | None = None
        # lazy: calls swap streamed weights into the shared modules, so they take turns (re-entrant:
        # forward -> run_layer -> materialized); _held: layers materialized now (by the lock's holder)
        self._lock: threading.RLock | None = None
        self._held: set[int] = set()
        # resident (pinned) layers get the same Parameter objects every call, so caches keyed by them
        # (QuantLinear's prepared kernel scales) hit instead of re-preparing per token
        self._resident_params: dict[Item, dict[str, nn.Parameter]] = {}
        self._layer_fetch: dict[int, list[Item]] = {}  # lazy: what materializing a layer fetches (_layer_items)

    # ------------------------------------------------------------------------------- weights
    @property
    def lazy(self) -> bool:
        return self._streamer is not None

    def load_weights(
        self,
        source: SepWeights,
        lazy: bool = False,
        prefetch: int = 1,
        resident_mb: float = 0.0,
        stream_mode: Mode = "auto",
        hugepages: bool = True,
        memory_budget: int | str | None = None,
        max_context: int = 4096,
        max_batch: int = 1,
        reserve: int | str = 0,
        max_tokens: int = MAX_TOKENS,
    ) -> QwenPart:
        """Take weights from a sepweight folder: all now (``lazy=False``) or streamed per forward.

        ``memory_budget`` (bytes, or a string such as ``"6GiB"``; implies lazy): keep resident what
        fits so that the part's memory (weights, KV cache of ``max_context`` x ``max_batch`` tokens,
        activations, the page cache of its reads) stays within it, stream the rest (``budget.py``).
        Too small a budget is a ValueError before anything is loaded. The activations are those of a
        forward of ``max_tokens`` tokens per row: a longer one runs in chunks through its KV cache
        (each chunk streams the weights again), and without a cache it is refused (chunked.py).

        In lazy mode, ``resident_mb`` keeps that many MB of layers / head chunks mapped for good
        (the rest is streamed): a knob between lowest memory (0) and in-RAM speed. ``stream_mode``
        is "mmap" (map each item, unmap after use; the CPU default), "copy" (read into a few
        reusable buffers; the CUDA default) or "auto". ``hugepages`` (mmap mode): re-cache items held
        in 4 KiB page-cache pages as 2 MiB pages on first use, making per-token mapping ~10x cheaper.
        """
        self._match_storage(source, lazy or memory_budget is not None)
        plan = None
        if memory_budget is not None:
            plan = self._plan(
                source, memory_budget, prefetch, resident_mb, stream_mode, max_context, max_batch, reserve, max_tokens
            )
            for i in self.layer_ids:  # linears computed slab by slab, each slab fetched just in time
                use_slabs(self._layer(i), i, layer_slabs(source, i)[1], source.linears(i), self.dtype)
            self._placeholders = {i: meta_placeholders(self._layer(i)) for i in self.layer_ids}
            lazy = True
        elif reserve:
            raise ValueError("reserve keeps part of a memory_budget for the caller: give memory_budget too")
        self._source = source
        cpu_same = self.device.type == "cpu"

        def prep(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            return t if cpu_same else t.to(self.device)

        if self.spec.begin:
            emb = source.begin()["embed_tokens.weight"]
            # lazy: a mapped view (CPU, stored dtype) for users of the parameter; forward reads only
            # the input tokens' rows with pread (SepWeights.gather_rows), never touching this mapping
            self.model.embed_tokens.weight = nn.Parameter(emb if lazy else prep(emb), requires_grad=False)
        if self.spec.end:
            end = source.end()
            # lazy: a copy, so a forward touches no mapping but the streamer's, whose files it checks
            # first (pages of a file truncated since it was mapped are a SIGBUS)
            norm = prep(end["norm.weight"])
            self.model.norm.weight = nn.Parameter(norm.clone() if lazy else norm, requires_grad=False)
            if not lazy:
                if self.config.tie_word_embeddings and self.spec.begin:
                    self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, as transformers
                else:
                    head = {k.removeprefix("lm_head."): prep(v) for k, v in end.items() if k.startswith("lm_head.")}
                    q = source.linears("end").get("lm_head")
                    stored = {"": q} if q is not None else {}
                    assign(self.lm_head, repacked(head, stored, self.lm_head), "end part")
            del end
        if self._streamer is not None:  # weights loaded again: the previous streamer's thread and weights go
            self._streamer.close()
            self._streamer = None
            self._resident_params.clear()
        if lazy:
            self._lock = self._lock or threading.RLock()
            self._layer_fetch.clear()
            self._streamer = LayerStreamer(
                source,
                self._stream_order(source if plan is not None else None),
                self.device,
                self.dtype,
                prefetch,
                int(resident_mb * 2**20),
                stream_mode,
                hugepages,
                plan,
            )
            for module in self.modules():
                if isinstance(module, SlabLinear):
                    module.streamer = self._streamer
        else:
            for i in self.layer_ids:
                layer = {k: prep(v) for k, v in source.layer(i).items()}
                stored = source.linears(i)
                assign(self._layer(i), repacked(layer, stored, self._layer(i)), f"layer {i}")
        return self

    def _match_storage(self, source: SepWeights, lazy: bool) -> None:
        """Swap the meta skeleton's linears for what the folder stores (``QuantLinear`` for quantized
        ones); then the lazy placeholders. An int4 layout of another CPU is re-packed once at load in
        RAM; streamed, it is dequantized per forward (no kernel): both with a warning."""
        foreign: set[str] = set()

        def effective(spec: QuantSpec) -> QuantSpec:
            if spec.scheme != "int4" or spec.layout in ("rows", int4_layout()) or self.device.type != "cpu":
                return spec
            foreign.add(str(spec.layout))
            return spec if lazy else dataclasses.replace(spec, layout=int4_layout())

        for i in self.layer_ids:
            specs = {k: effective(q) for k, q in source.linears(i).items()}
            match_linears(self._layer(i), specs, self.dtype, f"{source.root}: layer {i}")
        self._placeholders = {i: meta_placeholders(self._layer(i)) for i in self.layer_ids}
        if self.spec.end:
            head = source.linears("end").get("lm_head")
            head = effective(head) if head is not None else None
            if not fits(self.lm_head, head):
                H, V = self.config.hidden_size, self.config.vocab_size
                self.lm_head = linear(H, V, False, "meta", head, self.dtype)
            self._head_spec, self._head_views = head, None
            self._head_chunk = self.head_chunk_size
            if head is not None and head.scheme == "int4" and head.layout != "rows":
                self._head_chunk = max(64, self.head_chunk_size // 64 * 64)  # rows a:b of a kernel layout
        if foreign:
            how = "streamed layers are dequantized per forward" if lazy else "re-packing them once at load"
            warnings.warn(
                f"{source.root}: int4 weights packed for {sorted(foreign)}, but this CPU's kernel takes "
                f"{int4_layout()!r}: {how}; convert the folder on this machine to skip this",
                stacklevel=3,
            )

    def _stream_order(self, slabs: SepWeights | None = None) -> list[Item]:
        """What a lazy part streams, in forward order: its layers (given `slabs`, as a memory budget
        plans them: each layer's small tensors, then its linears' slabs in the order of use), then the
        head's vocabulary chunks."""
        order: list[Item] = []
        for i in self.layer_ids:
            if slabs is None:
                order.append(i)
                continue
            order.append((i, SMALL))
            order += [(i, name, j) for name, rows in layer_slabs(slabs, i)[1].items() for j in range(len(rows))]
        if self.spec.end:
            V, c = self.config.vocab_size, self._head_chunk
            order += [(v0, min(V, v0 + c)) for v0 in range(0, V, c)]
        return order

    def _plan(
        self,
        source: SepWeights,
        budget: int | str,
        prefetch: int,
        resident_mb: float,
        stream_mode: Mode,
        max_context: int,
        max_batch: int,
        reserve: int | str = 0,
        max_tokens: int = MAX_TOKENS,
    ) -> MemoryPlan:
        """The memory plan for `budget`, checked before anything is loaded (the policy: budget.py)."""
        if resident_mb:
            raise ValueError(
                "memory_budget and resident_mb both decide what stays resident; give one (memory_budget plans it)"
            )
        if stream_mode == "mmap":
            raise ValueError("memory_budget streams in copy mode (pread into reused buffers); drop stream_mode='mmap'")
        if self.device.type != "cpu":
            raise ValueError(f"memory_budget plans host memory for CPU parts; on {self.device} use resident_mb")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        budget = parse_size(budget)
        try:
            reserved = 0 if reserve == 0 else parse_size(reserve)  # (parse_size refuses 0 and negatives)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("memory_budget", "reserve")) from None
        sizes = [item_size(source, item, self.dtype) for item in self._stream_order(source)]
        largest = max((s.stored for s in sizes), default=0)
        # the largest quantized weight prefill dequantizes at once: a slab of a linear, or a head chunk
        shapes = [
            (b - a, q.shape[1])
            for i in self.layer_ids
            for name, q in source.linears(i).items()
            for a, b in layer_slabs(source, i)[1][name]
        ]
        head = source.linears("end").get("lm_head") if self.spec.end else None
        shapes += [(min(self._head_chunk, head.shape[0]), head.shape[1])] if head is not None else []
        biggest = max((n * k for n, k in shapes), default=0)
        runtime = runtime_bytes(
            self.config,
            len(self.layer_ids),
            self.spec.end,
            self.dtype.itemsize,
            max_context=max_context,
            max_batch=max_batch,
            max_tokens=max_tokens,
            head_chunk_size=self.head_chunk_size,
            # O_DIRECT: none; through the cache: each reader's piece and its readahead (read_choice.py)
            page_cache=min(largest, READERS * 2 * READ_PIECE),
            scratch=scratch_bytes(biggest, self.dtype, self.device) if biggest else 0,
            reserved=reserved,
        )
        plan = plan_memory(budget, sizes, runtime, slots=prefetch + 1)
        logger.info("%s", plan)
        return plan

    @property
    def memory_plan(self) -> MemoryPlan | None:
        """What a ``memory_budget`` keeps resident and streams (None without a budget)."""
        return self._streamer.plan if self._streamer is not None else None

    @property
    def max_tokens(self) -> int | None:
        """Tokens per row of the largest forward the memory budget was planned for (None without one):
        a longer forward runs in chunks through its cache, or is refused without one."""
        plan = self.memory_plan
        return plan.runtime.tokens or None if plan is not None else None

    def _layer(self, i: int) -> nn.Module:
        return self.model.layers[str(i)]

    # ------------------------------------------------------------------------------- cache
    def new_cache(self, extra_window_slots: int = 0) -> KVCache:
        """An empty KV cache for this part (sliding-window layers get a ring of W + extra slots).

        Under a memory budget, full-attention layers allocate the plan's ``max_context`` tokens at once
        (the budget counts that, not a cache grown by doubling)."""
        plan = self.memory_plan
        capacity = plan.runtime.context if plan is not None else 0
        return KVCache({i: self.config.window(i) for i in self.layer_ids}, extra_window_slots, capacity)

    # ------------------------------------------------------------------------------- forward
    @_serialised
    def forward(
        self,
        x: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: LogitsToKeep = None,
        input_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        """Run the part.

        Args:
            x: token ids (B, T) if the part holds ``b``, else hidden states (B, T, hidden_size).
            position_ids: RoPE positions (B, T). Default: continue from the cache, counting only
                real tokens when there is padding (as transformers' generate).
            attention_mask: (B, T) for the new tokens or (B, past + T), 1 = token, 0 = padding.
            cache: from :meth:`new_cache`; updated in place. Under a memory budget a forward of more
                than :attr:`max_tokens` tokens per row runs as chunks of that many through it (the same
                result; chunked.py); without a cache such a forward is a ValueError.
            logits_to_keep: which positions get logits: None or 0 = all (0 as in transformers),
                n = the last n, a slice or an index tensor. Ignored by parts without the head.
            input_ids, past_key_values: transformers' names for ``x`` and ``cache``. ``use_cache``
                is accepted and changes nothing: a part uses the cache passed to it and never makes
                one (``as_transformers(part)`` gives the full transformers interface).
        """
        x, cache = keyword_inputs(x, input_ids, cache, past_key_values)
        T = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
        limit = self.max_tokens
        if limit is not None and T > limit:  # more than the memory budget planned for
            if cache is None:
                check_tokens(T, limit, "forward")  # refused: nothing to chunk through
            return forward_in_chunks(self, x, limit, cache, position_ids, attention_mask, logits_to_keep)
        h, step = self.prepare(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache)
        if self.spec.end:
            select_positions(h[..., :1], logits_to_keep)  # a bad logits_to_keep is refused before any layer runs
        for i in self.layer_ids:
            h = self.run_layer(i, h, step)
        return self.finish(h, step, logits_to_keep)

    # ------------------------------------------------------------------------------- steps
    # forward() is prepare -> run_layer for each layer -> finish. They are public so that engines
    # (layer-wise training, pipelines) can drive a part one layer at a time.

    def prepare(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, Step]:
        """Validate the input, embed token ids (begin part) and compute RoPE / masks once."""
        B, T = check_input(x, self.config, self.spec.begin, self.layer_ids)
        check_tokens(T, self.max_tokens, "prepare")
        # nothing is stored in the cache before finish(): a call refused here leaves it as it was
        start = cache.start_call(self.layer_ids, B) if cache is not None else 0
        new_mask, key_mask = masks(attention_mask, cache, B, T, start, x.device)
        position_ids, next_position = positions(position_ids, cache, new_mask, B, T, start, x.device, self.config)
        if self.spec.begin and self._streamer is not None:
            # lazy: pread just these tokens' rows; a mapping of the embedding would pull whole
            # (up to 2 MiB) pages of it into RSS per token
            h = self._source.gather_rows("begin", "embed_tokens.weight", x).to(self.device, self.dtype)  # (B, T, H)
        elif self.spec.begin:
            emb = self.model.embed_tokens.weight
            h = F.embedding(x.to(emb.device), emb).to(self.device, self.dtype)  # (B, T, H)
        else:
            h = x
        # dynamic RoPE: a sequence's history is its cache's; calls without one share the module's
        rope_length = self.rotary.length_for(position_ids, cache.rope_length) if cache is not None else None
        cos, sin = self.rotary(position_ids, h.dtype, rope_length)
        return h, Step(cos, sin, start, T, key_mask, cache, next_position, rope_length)

    def _same_params(self, item: Item, weights: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        """A resident item's tensors as Parameters made once (remade if the streamer handed out others)."""
        cached = self._resident_params.get(item)
        if cached is None or any(cached[k].data_ptr() != t.data_ptr() for k, t in weights.items()):
            with torch.inference_mode(False):  # kept for later calls, which may need autograd
                cached = {k: nn.Parameter(t, requires_grad=False) for k, t in weights.items()}
            self._resident_params[item] = cached
        return cached

    def _layer_items(self, i: int) -> list[Item]:
        """What materializing layer i fetches: the layer, or under a memory budget its small tensors
        (norms, biases; its linears fetch their own slabs as they run)."""
        assert self._streamer is not None
        items = self._layer_fetch.get(i)
        if items is None:
            items = self._layer_fetch[i] = [it for it in self._streamer.order if it in (i, (i, SMALL))]
        return items

    @contextmanager
    def materialized(self, i: int) -> Iterator[nn.Module]:
        """Layer i's module with its weights in place for the duration (fetched and released when lazy).

        Example::

            with part.materialized(3) as layer:
                out = layer(h, step.cos, step.sin, step.start)

        A lazy part's calls take turns: other threads wait until the layer is released.
        """
        layer = self._layer(i)
        if self._streamer is None or self._lock is None:
            yield layer
            return
        with self._lock:
            if i in self._held:  # nested in this thread: the weights are in place already
                yield layer
                return
            got: list[dict[str, torch.Tensor]] = []
            try:
                params: dict[str, torch.Tensor] = {}
                for item in self._layer_items(i):  # a layer, or its small tensors: in place while it runs
                    got.append(self._streamer.get(item))
                    params.update(self._same_params(item, got[-1]) if item in self._streamer.pinned else got[-1])
                assign(layer, params, f"layer {i}", self._placeholders[i].keys())
                self._held.add(i)
                yield layer
            finally:
                if i in self._held:
                    self._held.discard(i)
                    release(layer, self._placeholders[i])
                for weights in got:  # with autograd on, the graph may keep views: never reuse those buffers
                    self._streamer.retire(weights, reuse=not torch.is_grad_enabled())
                del got

    def run_layer(self, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """One decoder layer: (B, T, H) -> (B, T, H), updating its cache."""
        layer_cache = step.cache.layers[i] if step.cache is not None else None
        with self.materialized(i) as layer:
            return layer(h, step.cos, step.sin, step.start, layer_cache, step.key_mask)

    def finish(self, h: torch.Tensor, step: Step, logits_to_keep: LogitsToKeep = None) -> torch.Tensor:
        """Close the step: with the end part, final norm + head on the kept positions; then the cache
        counts the step (a step that fails before this point is rolled back by the next one)."""
        if self.spec.end:
            if select_positions(h[..., :1], logits_to_keep).shape[1]:
                h = self._logits(h, logits_to_keep)
            else:  # no position kept (a chunk of a chunked forward): no head to read
                h = h.new_empty(h.shape[0], 0, self.config.vocab_size)
        if step.cache is not None:
            assert step.next_position is not None
            step.cache.commit(step.start, step.length, step.key_mask, step.next_position, step.rope_length)
        return h

    def close(self) -> None:
        """Stop the prefetch thread (lazy parts) and let go of the resident layers' weights."""
        if self._streamer is not None:
            self._streamer.close()
        self._resident_params.clear()  # the streamer dropped its resident copies: so do we
