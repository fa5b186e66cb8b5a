"""What LoRA training adds on top of the forward a memory budget plans for (``load_part(reserve=...)``).

llm_lazy_qwen's plan counts one forward (weights, KV cache, activations, logits). Layer-wise training
also keeps, for the whole step: the LoRA parameters with their gradients and AdamW's two moments,
and every layer's input (the backward recomputes each layer from it); and, while a layer runs
backward, its activations with their gradients, the attention probabilities and the loss over a
head chunk. Measured on the Qwen2.5-7B shape (int8 base, r=8 on all 7 projections, 1 x 256 tokens,
fp32 compute): 0.76 GiB above the plan's peak; this estimate gives 0.76 GiB (the sum below + 1/8).
That plan counted the logits of every position of its forward (``itemsize x tokens x (vocab + head
chunk)``, 172 MB there); it now counts one position per row (what generation keeps), so this reserve
carries that term (``head``) to keep the fit, until the step is measured again. ``llm-sft train`` plans
its forward for ``batch x max_seq_len`` tokens (``max_tokens=max_seq_len``: no cache to chunk through).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_lazy_qwen import QwenConfig, layer_activation_bytes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def training_reserve(
    config: QwenConfig,
    *,
    batch: int,
    seq: int,
    r: int = 8,
    targets: str | Sequence[str] = "all-linear",
    dtype: torch.dtype = torch.float32,
    head_chunk_size: int = 16384,
) -> int:
    """Bytes to pass as ``load_part(..., memory_budget=..., reserve=...)`` for LoRA training of
    `batch` x `seq` tokens (``llm-sft train --memory-budget`` does).

    Example::

        config = QwenConfig.from_folder(SepWeights("qwen7b-int8"))
        reserve = training_reserve(config, batch=1, seq=256, r=8)   # ~0.8 GB
        part = load_part("qwen7b-int8", memory_budget="7.5GiB", max_context=256, reserve=reserve)
    """
    if batch < 1 or seq < 1 or r < 1:
        raise ValueError(f"batch, seq and r must be >= 1, got {batch}, {seq}, {r}")
    H, inter, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    nh, nkv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    d = config.head_dim or H // nh
    shapes = {  # (in, out) of each projection
        "q_proj": (H, nh * d),
        "k_proj": (H, nkv * d),
        "v_proj": (H, nkv * d),
        "o_proj": (nh * d, H),
        "gate_proj": (H, inter),
        "up_proj": (H, inter),
        "down_proj": (inter, H),
    }
    names = PROJECTIONS if targets == "all-linear" else [t for t in targets if t in shapes]
    isz = dtype.itemsize
    T = batch * seq
    lora = L * r * sum(sum(shapes[n]) for n in names) * isz * 4  # A and B: weights, grads, 2 AdamW moments
    inputs = L * T * H * isz  # each layer's input, kept for its backward
    layer = layer_activation_bytes(config, T, isz) * 2  # one layer's activations and their gradients
    attention = isz * batch * nh * seq * seq * 2  # probabilities and their gradient
    loss = isz * T * min(V, head_chunk_size) * 3  # a head chunk's logits, softmax and gradient
    head = isz * T * (V + min(V, head_chunk_size))  # what the fitted plan counted for logits (see above)
    total = lora + inputs + layer + attention + loss + head
    return total + total // 8
