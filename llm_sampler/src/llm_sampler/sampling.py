"""Batched autoregressive sampling through `forward_func`; equals transformers' `generate` step for step.

Each step: `forward_func(ids)` -> last position's logits in fp32 -> `process_logits` -> argmax (temperature 0) or
`multinomial`. Rows that produced a stop token are finished: they keep running (the batch stays rectangular)
but their later tokens are replaced by `pad_token_id`, and generation ends once every row has finished.
A plain `forward_func` recomputes the whole sequence each step (O(n^2)); wrap a cache-capable model in
`CachedForward` to run only the new token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from llm_sampler.forward import Forward, ForwardFunc
from llm_sampler.processors import SamplingParams, process_logits, select_tokens
from llm_sampler.stops import stop_hits
from llm_sampler.validation import (
    Stops,
    StopTokens,
    TokenIds,
    check_count,
    check_prompt,
    check_stop_tokens,
)


def pad_left(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad ragged prompts into `(input_ids (B, T), attention_mask (B, T))`.

    Example:
        >>> ids, mask = pad_left([[5, 6, 7], [8]], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if len(sequences) == 0 or any(len(s) == 0 for s in sequences):
        msg = "pad_left needs at least one sequence and every sequence needs at least one token"
        raise ValueError(msg)
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids, mask


def sample_stream(
    forward_func: ForwardFunc,
    input_ids: TokenIds,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row, `(B,)` int64, as it is sampled; arguments as in `sample`.

    Arguments are checked when this is called, not when the iterator is first advanced.

    Example:
        >>> for tokens in sample_stream(lambda ids: model(ids).logits, prompt, 20, temperature=0):
        ...     print(tokens.tolist())
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    check_count("max_new_tokens", max_new_tokens, 0)
    ids, mask = check_prompt(input_ids, attention_mask)
    stops, pad = check_stop_tokens(stop_tokens, pad_token_id)
    forward = Forward(forward_func)
    mask = forward.check_mask(mask)
    return _stream(forward, ids, mask, max_new_tokens, params, stops, pad, generator)


def _stream(
    forward: Forward,
    ids: Tensor,
    mask: Tensor | None,
    max_new_tokens: int,
    params: SamplingParams,
    stops: Stops,
    pad: int,
    generator: torch.Generator | None,
) -> Iterator[Tensor]:
    batch, prompt_length = ids.shape
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        # no_grad per step, not around the loop: a generator must not leave grad mode off between yields.
        with torch.no_grad():
            logits = forward(ids, mask, 1)[:, -1]  # (B, V) fp32
            scores = process_logits(logits, params, ids, mask)
            tokens = select_tokens(scores, params, generator)  # (B,)
            if stops:
                tokens = torch.where(unfinished, tokens, pad)
        ids = torch.cat([ids, tokens[:, None]], dim=1)  # (B, T + 1)
        if stops:
            unfinished &= ~stop_hits(ids[:, prompt_length:], stops)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        yield tokens
        if stops and not bool(unfinished.any()):
            return


def sample(
    forward_func: ForwardFunc,
    input_ids: TokenIds,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens per row; returns the new tokens only, `(B, n)` int64.

    Args:
        forward_func: `forward_func(input_ids (B, T)) -> logits (B, T, V)`; see `llm_sampler.forward` for the
            optional `attention_mask=` / `logits_to_keep=` keywords.
        input_ids: `(B, T)` or `(T,)` prompt ids, left-padded when rows differ in length.
        temperature: 0 is greedy (argmax after the repetition penalty); > 0 samples.
        top_k, top_p, min_p, repetition_penalty: as in transformers; None switches each off.
        stop_tokens: what finishes a row: token ids, and/or sequences of ids that must be generated in a
            row (`[2, [13, 198]]`: token 2, or 13 then 198; a 2-D tensor is one sequence per row). Only
            generated tokens match. The stop is kept, later positions get `pad_token_id` (default: the
            first stop token; the last id of the first stop when that is a sequence). `n < max_new_tokens` once every row has stopped.
        attention_mask: `(B, T)` 0/1 with zeros on the left for padding; None means no padding.
        generator: torch RNG for the draws; None uses the global one (as transformers does).

    Example:
        >>> forward = lambda ids: model(ids).logits
        >>> new = sample(forward, torch.tensor([[1, 2, 3]]), 16, temperature=0.7, top_p=0.9, stop_tokens=[2])
        >>> new.shape
        torch.Size([1, 16])
    """
    stream = sample_stream(
        forward_func,
        input_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_tokens=stop_tokens,
        pad_token_id=pad_token_id,
        attention_mask=attention_mask,
        generator=generator,
    )
    steps = list(stream)
    if not steps:
        ids = check_prompt(input_ids, attention_mask)[0]
        return ids.new_empty(ids.shape[0], 0)
    return torch.stack(steps, dim=1)  # (B, n)
