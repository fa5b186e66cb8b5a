"""The head of a part: final norm + ``lm_head`` over vocabulary chunks, streamed when the part is lazy.

A chunk is ``W[v0:v1]`` of a plain head, or rows v0:v1 of a quantized head's ``qweight`` and scales
(the int kernel for decode rows, dequantize + GEMM for more); losses read the chunks through
:meth:`HeadMixin.head_chunks` (llm_sft's chunked cross-entropy).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import QuantSpec

from .config import QwenConfig
from .quant import dequantize_into, quant_linear
from .streaming import LayerStreamer

LogitsToKeep = int | slice | torch.Tensor | None


class HeadMixin:
    """The head's methods of :class:`~llm_lazy_qwen.part.QwenPart` (which sets these attributes)."""

    config: QwenConfig
    model: nn.Module  # .norm
    lm_head: nn.Module
    dtype: torch.dtype
    _streamer: LayerStreamer | None
    _head_spec: QuantSpec | None  # a quantized head
    _head_chunk: int  # rows per chunk
    _head_views: tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]] | None  # a quantized head's, in RAM

    def _head_items(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """``(v0, v1, {"weight": W[v0:v1]})`` per vocabulary chunk, or rows v0:v1 of ``qweight`` and its
        scales for a quantized head (streamed when lazy; in RAM the same views each call, so the
        kernels' prepared scales are cached)."""
        V, chunk, spec = self.config.vocab_size, self._head_chunk, self._head_spec
        if spec is None:
            stored = {"weight": "lm_head.weight"}
        else:
            stored = {"qweight": "lm_head.qweight", "scales": f"lm_head.{spec.scales_key}"}
        if self._streamer is None and spec is not None:
            q = self.lm_head.qweight
            if self._head_views is None or self._head_views[0] is not q:
                s = self.lm_head.scale_tensor()
                views = {v0: {"qweight": q[v0 : v0 + chunk], "scales": s[v0 : v0 + chunk]} for v0 in range(0, V, chunk)}
                self._head_views = (q, views)
        for v0 in range(0, V, chunk):
            v1 = min(V, v0 + chunk)
            if self._streamer is None:
                yield v0, v1, self._head_views[1][v0] if spec is not None else {"weight": self.lm_head.weight[v0:v1]}
                continue
            weights = self._streamer.get((v0, v1))
            try:
                yield v0, v1, {k: weights[key] for k, key in stored.items()}
            finally:
                self._streamer.retire(weights, reuse=not torch.is_grad_enabled())
                del weights

    def head_chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(v0, v1, lm_head.weight[v0:v1])`` for each vocabulary chunk (streamed when lazy); a quantized
        head's chunks are dequantized (a new tensor in the compute dtype each)."""
        for v0, v1, t in self._head_items():
            if self._head_spec is None:
                yield v0, v1, t["weight"]
            else:
                yield v0, v1, dequantize_into(t["qweight"], t["scales"], self._head_spec, self.dtype)

    def _logits(self, h: torch.Tensor, logits_to_keep: LogitsToKeep) -> torch.Tensor:
        """Final norm + head on the kept positions: (B, T, H) -> (B, T_keep, V) in the compute dtype."""
        h = self.model.norm(select_positions(h, logits_to_keep))
        out = h.new_empty(*h.shape[:-1], self.config.vocab_size)  # (B, T_keep, V)
        for v0, v1, t in self._head_items():
            if self._head_spec is None:
                out[..., v0:v1] = F.linear(h, t["weight"])
            else:  # the int kernel for decode rows, dequantize + GEMM for more
                out[..., v0:v1] = quant_linear(h, t["qweight"], t["scales"], None, self._head_spec)
        return out


def select_positions(h: torch.Tensor, keep: LogitsToKeep) -> torch.Tensor:
    """The positions of h (B, T, ...) that get logits: transformers' ``logits_to_keep`` (0 or None: all)."""
    if keep is None or (isinstance(keep, int) and keep == 0):
        return h  # 0: every position, as transformers' logits_to_keep
    if isinstance(keep, int):
        if keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0: all positions, n: the last n), got {keep}")
        return h[:, -keep:]
    if isinstance(keep, slice):
        return h[:, keep]
    T = h.shape[1]
    if not keep.dtype.is_floating_point and keep.dtype != torch.bool and keep.numel():
        lo, hi = int(keep.min()), int(keep.max())
        if lo < -T or hi >= T:
            raise ValueError(f"logits_to_keep indices must be in [-{T}, {T}) (positions of this call); got {lo}..{hi}")
    return h[:, keep.to(h.device)]
