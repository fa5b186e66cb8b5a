"""Generation through the pipeline: prefill, then token-by-token decode, sampled on rank 0 by llm_sampler.

``CachedForward(pipeline)`` runs the prompt once (prefill: one pipelined forward of all
micro-batches, every stage filling its KV caches) and then only the newest token per step; the
last stage returns just the last position's logits, and rank 0 samples with llm_sampler's
processors (temperature 0 is greedy), so the tokens equal the single-process model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from llm_sampler import CachedForward, StopTokens, sample, sample_stream

from .pipeline import Pipeline


def generate(
    pipe: Pipeline,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New tokens (B, n) for a (left-padded) batch of prompts; sampling arguments as in ``llm_sampler.sample``.

    ``stop_tokens`` takes token ids and multi-token stop sequences (``[2, [13, 198]]``, or a 2-D tensor
    with one sequence per row); a row stops once its generated tokens end with one.

    Example::

        ids, mask = pad_left([[5, 6, 7], [8, 9]], pad_token_id=0)
        new = generate(pipe, ids, 32, attention_mask=mask, temperature=0)   # greedy, (2, 32)
    """
    return sample(
        CachedForward(pipe),
        input_ids,
        max_new_tokens,
        attention_mask=attention_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_tokens=stop_tokens,
        pad_token_id=pad_token_id,
        generator=generator,
    )


def generate_stream(
    pipe: Pipeline,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Like :func:`generate`, yielding each step's tokens (B,) as they are sampled (the first after prefill).

    Example::

        for tokens in generate_stream(pipe, [1, 2, 3], 16, temperature=0.7, top_p=0.9):
            print(tokens.tolist())
    """
    return sample_stream(
        CachedForward(pipe),
        input_ids,
        max_new_tokens,
        attention_mask=attention_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_tokens=stop_tokens,
        pad_token_id=pad_token_id,
        generator=generator,
    )
