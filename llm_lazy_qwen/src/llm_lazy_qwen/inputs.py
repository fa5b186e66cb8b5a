"""What a part's forward takes: the input and cache under either name, input checks, masks, positions.

Everything here is checked before any layer runs, so a refused call leaves the cache as it was.
"""

from __future__ import annotations

import torch

from .config import QwenConfig
from .kv_cache import KVCache


def keyword_inputs(
    x: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    cache: KVCache | None,
    past_key_values: KVCache | None,
) -> tuple[torch.Tensor, KVCache | None]:
    """The input and cache of a forward call given positionally or under transformers' names."""
    if x is not None and input_ids is not None:
        raise TypeError("give the input once: positionally or as input_ids=, not both")
    x = x if x is not None else input_ids
    if x is None:
        raise TypeError("forward() needs the input: token ids or hidden states, positionally or as input_ids=")
    if cache is not None and past_key_values is not None:
        raise TypeError("give the KV cache once: as cache= or as past_key_values=, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"the KV cache must be a KVCache from part.new_cache(), got {type(cache).__name__}; "
            "for transformers' generate() use llm_lazy_qwen.as_transformers(part)"
        )
    return x, cache


def check_input(x: torch.Tensor, config: QwenConfig, begin: bool, layer_ids: list[int]) -> tuple[int, int]:
    """(B, T) of a part's input: token ids (B, T) for a part holding ``b``, hidden states (B, T, H) otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if begin:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"this part holds the embedding ('b'), so it takes token ids of shape (batch, seq) "
                f"int64; got {tuple(x.shape)} {x.dtype}"
            )
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, vocab_size={config.vocab_size}); got {int(x.min())}..{int(x.max())}"
            )
    else:
        H = config.hidden_size
        if x.dim() != 3 or x.shape[-1] != H or not x.is_floating_point():
            first = layer_ids[0] if layer_ids else "the end part"
            raise ValueError(
                f"this part starts at layer {first}, so it takes hidden states of shape (batch, seq, "
                f"hidden_size={H}); got {tuple(x.shape)} {x.dtype}"
            )
    if x.shape[1] == 0:
        raise ValueError("input has no positions (seq length 0)")
    return x.shape[0], x.shape[1]


def check_tokens(T: int, max_tokens: int | None, call: str) -> None:
    """Refuse a `call` ("forward" without a cache, or "prepare") of more tokens per row than the part's
    memory budget was planned for (``max_tokens``; None: no budget). A forward with a cache is never
    refused: it runs in chunks of ``max_tokens`` through the cache instead."""
    if max_tokens is None or T <= max_tokens:
        return
    if call == "forward":
        raise ValueError(
            f"this forward has {T} tokens per row, but the part's memory_budget was planned for forwards of "
            f"at most max_tokens={max_tokens}: pass a KV cache (cache=part.new_cache(); the forward then runs "
            f"in chunks of {max_tokens} tokens through it), or load the part with max_tokens >= {T}"
        )
    raise ValueError(
        f"prepare() got {T} tokens per row, but the part's memory_budget was planned for forwards of at most "
        f"max_tokens={max_tokens}: run at most {max_tokens} tokens per step (forward(..., cache=...) splits "
        f"its input itself), or load the part with max_tokens >= {T}"
    )


def masks(
    attention_mask: torch.Tensor | None,
    cache: KVCache | None,
    B: int,
    T: int,
    start: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask of the new tokens (B, T), key mask over all cache indices (B, start+T)); None = no padding."""
    new: torch.Tensor | None = None
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.bool)
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] not in (T, start + T):
            raise ValueError(
                f"attention_mask must be (batch={B}, {T}) or (batch={B}, past+new={start + T}); got {tuple(m.shape)}"
            )
        new = m[:, -T:]
    past = cache.key_mask if cache is not None else None
    if new is None and past is None:
        return None, None
    if new is None:
        new = torch.ones(B, T, dtype=torch.bool, device=device)
    if past is None:
        past = torch.ones(B, start, dtype=torch.bool, device=device)
    key_mask = torch.cat([past, new], dim=1)
    return new, (None if bool(key_mask.all()) else key_mask)


def positions(
    position_ids: torch.Tensor | None,
    cache: KVCache | None,
    new_mask: torch.Tensor | None,
    B: int,
    T: int,
    start: int,
    device: torch.device,
    config: QwenConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE positions (B, T), and the cache's next position after them (None without a cache)."""
    base = cache.next_position if cache is not None and cache.next_position is not None else None
    if position_ids is None:
        if base is None:
            base = torch.full((B,), start, dtype=torch.long, device=device)
        if new_mask is None:
            position_ids = base[:, None] + torch.arange(T, device=device)[None]
        else:  # count only real tokens; padding gets position 1 (as transformers' generate)
            position_ids = base[:, None] + new_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(~new_mask, 1)
    else:
        position_ids = position_ids.to(device=device, dtype=torch.long)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, -1)
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be (batch={B}, seq={T}); got {tuple(position_ids.shape)}")
    limit = config.max_positions  # None: dynamic RoPE scaling serves any length
    if (limit is not None and int(position_ids.max()) >= limit) or int(position_ids.min()) < 0:
        what = "max_position_embeddings" if limit == config.max_position_embeddings else "YaRN's length"
        raise ValueError(
            f"position {int(position_ids.max())} is beyond {what}={limit} of this model "
            "(or negative); shorten the input or crop the cache"
        )
    if cache is None:
        return position_ids, None
    if new_mask is None:
        return position_ids, position_ids[:, -1] + 1
    # rows whose new tokens are all padding keep their previous next position
    last = position_ids.masked_fill(~new_mask, -1).max(-1).values + 1
    prev = base if base is not None else torch.full((B,), start, dtype=torch.long, device=device)
    return position_ids, torch.where(new_mask.any(-1), last, prev)
