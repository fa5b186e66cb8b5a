"""The layer-wise training step: gradients equal full-graph autograd, memory is one layer plus boundaries.

For a whole-model :class:`llm_lazy_qwen.QwenPart` (``"f"``), one micro-batch goes:

1. forward under ``no_grad``, layer by layer, keeping only each layer's input ``x_l`` (B, T, H)
   and the RNG state before it: no autograd graph across layers;
2. head: final norm on the positions that have a target, then cross-entropy over vocabulary
   chunks of the head (streamed when the part is lazy) with an online softmax, which gives the
   loss and its gradient w.r.t. the normed hidden states in one pass. Full logits (T x V) never
   exist: one (N, chunk) block at a time;
3. backward in reverse: for layer l, re-materialise its weights, restore the RNG state it saw,
   recompute ``x_{l+1} = layer(x_l)`` with autograd and back-propagate ``g_{l+1}``: the layer's
   trainable parameters (LoRA A/B) accumulate their gradients, ``x_l.grad`` is ``g_l``. Then the
   layer's graph, weights and ``x_l`` are freed.

Dropout masks are the same in the recompute as in the forward (the RNG state is replayed and the
global RNG restored after), so gradients equal one ordinary autograd graph over the whole model,
dropout included (tests/llm_sft/test_engine.py). The sweep stops below the lowest layer that has
trainable parameters.

QLoRA: a part loaded from an int8/int4 folder holds llm_lazy_qwen ``QuantLinear`` bases under its
LoRA layers; they dequantize one linear at a time into a reused buffer (in the forward, the
recompute and the backward), never holding a dequantized copy of the model (a lazy part: one
layer's packed integers), and the gradients equal autograd on the dequantized model
(tests/llm_sft/test_qlora.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_lazy_qwen import QwenPart

from .batching import Batch
from .data import IGNORE_INDEX
from .heap import bound_heap

RngState = tuple[torch.Tensor, torch.Tensor | None]  # (CPU generator state, CUDA generator state)


@dataclass
class StepLoss:
    """Summed cross-entropy of a micro-batch and what it was summed over."""

    loss_sum: float  # sum over target tokens (nats)
    n_targets: int
    n_tokens: int  # real (non-padding) tokens

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.n_targets, 1)


def _rng_state(device: torch.device) -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed_rng(state: RngState, device: torch.device) -> Iterator[None]:
    """Run with the RNG as it was in the forward, then put the global RNG back where it was."""
    now = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(now[0])
        if now[1] is not None:
            torch.cuda.set_rng_state(now[1], device)


def chunked_cross_entropy(
    y: torch.Tensor,
    head_chunks: Iterable[tuple[int, int, torch.Tensor]],
    targets: torch.Tensor,
    grad_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of ``y @ W.T`` against ``targets``, W given in vocabulary chunks; optionally its gradient.

    One pass over the chunks with an online softmax (running max m, sum s, and ``sum_v p_v W_v``
    rescaled as m grows), so the head is read once and only an (N, chunk) block of logits
    exists at a time. Logits are rounded to ``y``'s dtype and then upcast, as transformers does.

    Args:
        y: (N, H) normed hidden states of the positions that have a target.
        head_chunks: ``(v0, v1, W[v0:v1])``, covering the vocabulary in order.
        targets: (N,) token ids.
        grad_scale: when given, also return ``d(loss_sum * grad_scale)/dy`` (N, H).

    Example::

        loss_sum, grad = chunked_cross_entropy(y, part.head_chunks(), targets, 1 / n_targets)
    """
    N, H = y.shape
    dev = y.device
    m = torch.full((N,), float("-inf"), device=dev)
    s = torch.zeros(N, device=dev)
    z_target = torch.zeros(N, device=dev)
    want_grad = grad_scale is not None
    acc = torch.zeros(N, H, device=dev) if want_grad else None  # sum_v exp(z_v - m) W_v
    w_target = torch.zeros(N, H, device=dev) if want_grad else None  # W[target]
    covered = 0
    for v0, v1, w in head_chunks:
        assert v0 == covered, "head chunks must cover the vocabulary in order"
        covered = v1
        z = F.linear(y, w).float()  # (N, v1 - v0)
        hit = (targets >= v0) & (targets < v1)
        rows, cols = hit.nonzero().squeeze(1), targets[hit] - v0
        z_target[rows] = z[rows, cols]
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        p = z.sub_(m_new[:, None]).exp_()  # in place: one (N, chunk) block alive
        s = s * alpha + p.sum(dim=1)
        if acc is not None and w_target is not None:
            acc.mul_(alpha[:, None]).add_((p.to(w.dtype) @ w).float())  # (N, chunk) @ (chunk, H)
            w_target[rows] = w[cols].float()
        m = m_new
        del z, p
    lse = m + torch.log(s)
    loss_sum = (lse - z_target).sum()
    if acc is None or w_target is None or grad_scale is None:
        return loss_sum, None
    grad = (acc / s[:, None] - w_target) * grad_scale  # (softmax - onehot) @ W
    return loss_sum, grad.to(y.dtype)


class LayerwiseEngine:
    """Training and evaluation steps for a whole-model QwenPart, one layer resident in backward.

    Trains whatever parameters of the decoder layers and the final norm have ``requires_grad``
    (normally LoRA's A and B: ``llm_lora_mmap.mark_only_lora_trainable(part)``); the embedding and
    the head stay frozen. Works on in-RAM and lazy parts; a lazy part's prefetcher follows the
    reverse walk of backward. ``prefetch=0`` gives the lowest memory: each prefetched layer is one
    more upcast copy, and a training step computes far longer on a layer than it takes to read it.

    Example::

        part = load_part("qwen-sep", "f", lazy=True, prefetch=0).train()
        apply_lora(part, "all-linear", r=8); opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
        engine = LayerwiseEngine(part)
        out = engine.forward_backward(collate(examples, pad_id))   # grads of the mean loss
        opt.step(); opt.zero_grad()
    """

    def __init__(self, part: QwenPart) -> None:
        if not isinstance(part, QwenPart):
            raise TypeError(f"LayerwiseEngine trains an llm_lazy_qwen QwenPart, got {type(part).__name__}")
        if not (part.spec.begin and part.spec.end):
            raise ValueError(f"the engine needs the whole model (spec 'f'), got a part with spec {str(part.spec)!r}")
        frozen_only = {"model.embed_tokens.weight", "lm_head.weight"}
        bad = [n for n, p in part.named_parameters() if n in frozen_only and p.requires_grad and not p.is_meta]
        if bad:
            raise ValueError(
                f"{bad} require grad; the layer-wise engine keeps the embedding and the head frozen (train LoRA on the layers)"
            )
        self.part = part
        self.device = part.device
        if part.memory_plan is not None:  # the process must stay within the budget: no heap growth
            bound_heap()

    # ------------------------------------------------------------------------------- parameters
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that get gradients, by name (meta placeholders of lazy parts are never trainable)."""
        return {n: p for n, p in self.part.named_parameters() if p.requires_grad and not p.is_meta}

    def _lowest_trainable_layer(self) -> int | None:
        for i in self.part.layer_ids:
            if any(
                p.requires_grad and not p.is_meta for p in self.part.get_submodule(f"model.layers.{i}").parameters()
            ):
                return i
        return None

    # ------------------------------------------------------------------------------- steps
    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        return (
            batch.input_ids.to(dev),
            batch.labels.to(dev),
            batch.attention_mask.to(dev),
            batch.position_ids.to(dev),
        )

    def forward_backward(self, batch: Batch, normalizer: float | None = None) -> StepLoss:
        """Forward and backward of one micro-batch; gradients of ``loss_sum / normalizer`` accumulate into ``.grad``.

        Args:
            normalizer: what the summed loss is divided by: the number of target tokens of the
                whole accumulated batch (all micro-batches, all ranks), so accumulation gives the
                mean over target tokens, not a mean of means. Default: this batch's targets.
        """
        if not self.trainable_parameters():
            raise ValueError(
                "the model has no trainable parameters; apply_lora(...) and mark_only_lora_trainable(model) first"
            )
        ids, labels, mask, pos = self._inputs(batch)
        targets = labels[:, 1:]  # position t predicts token t + 1
        sel = targets != IGNORE_INDEX  # (B, T-1)
        n_targets, n_tokens = int(sel.sum()), int(mask.sum())
        if n_targets == 0:
            return StepLoss(0.0, 0, n_tokens)
        scale = 1.0 / (normalizer if normalizer is not None else n_targets)
        part = self.part
        lowest = self._lowest_trainable_layer()

        # Long-lived tensors are allocated before the per-layer temporaries: gradients now, the layer
        # inputs as one block. Allocated between a layer's temporaries, they would split the holes
        # those leave, and glibc's heap would keep growing by about a layer per layer.
        for p in self.trainable_parameters().values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        # 1. forward without a graph, keeping each layer's input and RNG state
        kept = [i for i in part.layer_ids if lowest is not None and i >= lowest]
        inputs: dict[int, torch.Tensor] = {}
        rng: dict[int, RngState] = {}
        with torch.no_grad():
            h, step = part.prepare(ids, attention_mask=mask, position_ids=pos)
            block = h.new_empty(len(kept), *h.shape)  # (L_kept, B, T, H)
            for i in part.layer_ids:
                if kept and i >= kept[0]:
                    inputs[i], rng[i] = (
                        block[i - kept[0]].copy_(h),
                        _rng_state(self.device),
                    )
                h = part.run_layer(i, h, step)

        # 2. head: final norm with autograd (it may be trainable), loss and its gradient in vocabulary chunks
        x = h[:, :-1][sel].requires_grad_()  # (N, H): only positions with a target
        with torch.enable_grad():
            y = part.get_submodule("model.norm")(x)
        # no graph holds the head chunks: the streamer may reuse their buffers
        with torch.no_grad():
            loss_sum, grad_y = chunked_cross_entropy(y.detach(), part.head_chunks(), targets[sel], scale)
        y.backward(grad_y)
        g = torch.zeros_like(h)  # (B, T, H): dLoss/dh_L, zero where there is no target
        assert x.grad is not None
        g[:, :-1][sel] = x.grad
        del x, y, grad_y, h

        # 3. backward, one recomputed layer at a time, from the top down to the lowest trainable layer
        if lowest is not None:
            for i in reversed([i for i in part.layer_ids if i >= lowest]):
                # below the lowest trainable layer nothing needs g
                x = inputs.pop(i).detach().requires_grad_(i > lowest)
                # the layer's graph is gone before materialized() exits, and it exits with
                # grad mode off: a lazy part may then reuse the weights' buffer
                with torch.no_grad(), part.materialized(i) as layer:
                    with torch.enable_grad(), _replayed_rng(rng.pop(i), self.device):
                        out = layer(x, step.cos, step.sin, step.start, None, step.key_mask)
                        out.backward(g)
                    del out
                if i > lowest:
                    assert x.grad is not None
                    g = x.grad
                del x
        return StepLoss(float(loss_sum), n_targets, n_tokens)

    @torch.no_grad()
    def loss(self, batch: Batch) -> StepLoss:
        """Summed loss of a batch, forward only (evaluation)."""
        ids, labels, mask, pos = self._inputs(batch)
        targets = labels[:, 1:]
        sel = targets != IGNORE_INDEX
        n_targets, n_tokens = int(sel.sum()), int(mask.sum())
        if n_targets == 0:
            return StepLoss(0.0, 0, n_tokens)
        h, step = self.part.prepare(ids, attention_mask=mask, position_ids=pos)
        for i in self.part.layer_ids:
            h = self.part.run_layer(i, h, step)
        y = self.part.get_submodule("model.norm")(h[:, :-1][sel])
        loss_sum, _ = chunked_cross_entropy(y, self.part.head_chunks(), targets[sel])
        return StepLoss(float(loss_sum), n_targets, n_tokens)
