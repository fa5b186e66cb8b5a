"""load_part(): a QwenPart from a sepweight folder; from_pretrained(): from an HF folder or hub id."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from llm_sepweight import PartSpec, SepWeights, convert

from .bsm_path import Matmul
from .budget import MAX_TOKENS
from .config import QwenConfig
from .part import QwenPart
from .streaming import Mode

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _dtype(dtype: torch.dtype | str | None, stored: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return stored if stored is not None and stored.is_floating_point else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use bf16, fp16, fp32 or a torch.dtype")


def load_part(
    sepweight_dir: str | Path,
    spec: str | PartSpec = "f",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    lazy: bool = False,
    prefetch: int = 1,
    head_chunk_size: int = 16384,
    resident_mb: float = 0.0,
    stream_mode: Mode = "auto",
    hugepages: bool = True,
    matmul: Matmul = "torch",
    memory_budget: int | str | None = None,
    max_context: int = 4096,
    max_batch: int = 1,
    reserve: int | str = 0,
    max_tokens: int = MAX_TOKENS,
) -> QwenPart:
    """Build the part `spec` of the model stored in a sepweight folder.

    Args:
        spec: ``"f"`` (whole model), ``"b 0-12"``, ``"12-24 e"``, ...
        dtype: compute dtype; default the stored one. A quantized folder (``llm_sepweight.convert(...,
            quant="int8" | "int4")`` or a GGUF import) keeps its integers as stored: its linears become
            ``QuantLinear`` modules computing in this dtype (README: Quantized weights).
        lazy: stream layers from disk (one resident plus `prefetch` in flight) instead of holding them.
        prefetch: how many upcoming layers / head chunks (row slabs under a ``memory_budget``) a
            background thread prepares (lazy mode). In mmap mode only items whose last use found them
            out of the page cache are prefetched; cached ones are mapped on the compute thread (cheaper
            than a hand-off on 2 busy cores).
            1 by default: on 2 CPU cores 2 was no faster (the thread competes with the matmuls)
            and keeps one more layer resident (BENCHMARKS.md).
        head_chunk_size: vocabulary rows per head chunk (logits are computed chunk by chunk).
        resident_mb: lazy mode only: keep this many MB of layers / head chunks mapped for good
            instead of streaming them every forward (0 = lowest memory).
        stream_mode: lazy mode only: "mmap" maps each item and unmaps it after use (no anonymous
            memory, no copy; the CPU default), "copy" reads items into a few reusable buffers (pinned
            on CUDA; the CUDA default), "auto" picks by device.
        hugepages: lazy mmap mode only: items whose pages sit in the page cache as 4 KiB pages are
            evicted once on first use and read back as 2 MiB pages (Linux THP), which makes mapping
            them every token ~10x cheaper. Costs one re-read of those files; False keeps the cache as is.
        matmul: "torch" (default) or "bsm": q/k/v, GQA attention and gate/up as llm_bsm_kernel
            bundles (CPU only; ``pip install llm_lazy_qwen[bsm]``). Same results within rounding.
        memory_budget: bytes or a size string ("6GiB", "800MB", "7.5GiB"); implies ``lazy=True``
            (CPU). The layers / head chunks that fit stay resident (read once into anonymous memory),
            the rest streams through reused buffers with the page cache dropped as it is read, so the
            process stays within the budget above its baseline and reads only the streamed bytes per
            token. The plan is ``part.memory_plan``; a budget too small to run at all is a ValueError
            naming the minimum. Not together with ``resident_mb`` or ``stream_mode="mmap"``.
        max_context, max_batch: the KV cache the budget makes room for (tokens x rows).
        max_tokens: with ``memory_budget``: tokens per row of the largest forward the budget makes room
            for (512; at most ``max_context``). A longer forward with a KV cache runs as chunks of
            ``max_tokens`` through it (the same logits; each chunk streams the weights that are not
            resident again: slower prefill for more resident weights); without a cache it is a
            ValueError. Generation needs 1 per decode step: a smaller value leaves more of the budget
            to weights (fewer bytes read per token) at the cost of a chunked prefill.
        reserve: bytes (or a size string) of the budget kept for the caller's own use: training state
            on top of the forward the plan counts (``llm_sft.training_reserve``), other models in the
            process. Only with ``memory_budget``.

    Example::

        model = load_part("qwen-sep", "f", lazy=True)
        logits = model(torch.tensor([[1, 2, 3]]))     # (1, 3, vocab)
        small = load_part("qwen7b-sep", "f", memory_budget="7GiB", dtype="bf16")  # a 15 GB model in 7 GiB
    """
    source = SepWeights(sepweight_dir)
    config = QwenConfig.from_folder(source)  # manifest.json's copy: the one source of truth
    part = QwenPart(
        config, spec, device=device, dtype=_dtype(dtype, source.dtype), head_chunk_size=head_chunk_size, matmul=matmul
    )
    part.load_weights(
        source,
        lazy=lazy,
        prefetch=prefetch,
        resident_mb=resident_mb,
        stream_mode=stream_mode,
        hugepages=hugepages,
        memory_budget=memory_budget,
        max_context=max_context,
        max_batch=max_batch,
        reserve=reserve,
        max_tokens=max_tokens,
    )
    return part.eval()  # like transformers' from_pretrained: trainers call .train() themselves


def default_cache_dir() -> Path:
    root = os.environ.get("LLM_MICROLIBS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm_microlibs"
    )
    return Path(root) / "sepweight"


def cache_folder(src: str | Path, spec: str | PartSpec = "f", storage_dtype: str | None = None) -> Path:
    """The folder :func:`from_pretrained` converts `src` into when no `cache_dir` is given
    (under ``$LLM_MICROLIBS_CACHE``, else ``~/.cache/llm_microlibs/sepweight``); it also holds the
    model's tokenizer files (copied, or built from a GGUF file's metadata).

    Example::

        cache_folder("Qwen/Qwen2.5-0.5B")  # ~/.cache/llm_microlibs/sepweight/Qwen2.5-0.5B-<key>
    """
    key = hashlib.sha256(
        f"{Path(src).resolve() if Path(src).exists() else src}|{storage_dtype}|{PartSpec.parse(spec)}".encode()
    ).hexdigest()[:16]
    name = Path(str(src)).name or "model"
    return default_cache_dir() / f"{name}-{key}"


def from_pretrained(
    src: str | Path,
    spec: str | PartSpec = "f",
    *,
    cache_dir: str | Path | None = None,
    storage_dtype: str | None = None,
    **kwargs: object,
) -> QwenPart:
    """Like :func:`load_part` for an HF checkpoint folder or hub id: converted once into `cache_dir`.

    The conversion is resumable; only the parts in `spec` are converted (and, for a hub id,
    downloaded). Once complete, later calls only ``stat`` the folder (nothing is re-read, re-hashed
    or rewritten), so several processes may call this at once (one converts, the others wait for
    it), and a hub id keeps working offline (``HF_HUB_OFFLINE=1``) from the hub cache or, without
    it, from the finished folder.

    Example::

        model = from_pretrained("Qwen/Qwen2.5-0.5B", "f", lazy=True, dtype="bf16")
    """
    dst = Path(cache_dir) if cache_dir is not None else cache_folder(src, spec, storage_dtype)
    convert(src, dst, dtype=storage_dtype, parts=spec, progress=True)
    return load_part(dst, spec, **kwargs)  # type: ignore[arg-type]
