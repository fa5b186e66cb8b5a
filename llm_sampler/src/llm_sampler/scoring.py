"""Log-probabilities of continuations given a prompt, and a multiple-choice helper built on them.

For a prompt `p` (length P) and continuation `c` (length C), token `c_t` is scored by the logits at absolute
position `P - 1 + t`: `log_softmax(logits[P - 1 + t])[c_t]`, in fp32. Only continuation tokens are scored;
right padding in a batch is never read (a causal model's earlier positions cannot see it). This fixes the
original llm_sampler, which read raw logits against the wrong prefix and scored its padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_sampler.forward import Forward, ForwardFunc
from llm_sampler.validation import TokenIds, as_token_tensor, check_count


@dataclass(frozen=True)
class ContinuationScore:
    """How likely one continuation is after the prompt.

    Attributes:
        token_logprobs: `(C,)` fp32, `log p(c_t | prompt, c_<t)` for each continuation token.
        logprob: their sum, the log-probability of the whole continuation.
        mean_logprob: `logprob / C`, for length-normalised comparisons.
        is_greedy: True when every `c_t` is the argmax at its position (greedy decoding would produce `c`).
    """

    token_logprobs: Tensor
    logprob: float
    mean_logprob: float
    is_greedy: bool


@dataclass(frozen=True)
class Choice:
    """The result of `multiple_choice`: the winning index, the compared values and all scores."""

    best: int
    values: list[float]
    scores: list[ContinuationScore]


def _as_sequence(name: str, ids: TokenIds) -> Tensor:
    tensor = as_token_tensor(name, ids)
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 1 or tensor.numel() == 0:
        msg = f"{name} must be a non-empty 1-D sequence of token ids, got shape {tuple(tensor.shape)}"
        raise ValueError(msg)
    return tensor


def score(
    forward_func: ForwardFunc,
    prompt_ids: TokenIds,
    continuations: Sequence[TokenIds],
    *,
    batch_size: int = 1,
) -> list[ContinuationScore]:
    """Score each continuation after the shared prompt; one `ContinuationScore` per continuation.

    Continuations run `batch_size` at a time as `prompt + continuation[:-1]`, right-padded, so the last
    `max(C)` positions' logits are needed. With `CachedForward` the prompt is computed once and reused.
    Tokenise prompt and continuation together and split by offset (as lm-eval-harness does) so that
    merges like " positive" match what the model saw in training.

    Example:
        >>> scores = score(lambda ids: model(ids).logits, [1, 2, 3], [[7], [8, 9]])
        >>> scores[1].token_logprobs.shape  # log p(8 | 1 2 3), log p(9 | 1 2 3 8)
        torch.Size([2])
    """
    prompt = _as_sequence("prompt_ids", prompt_ids)
    conts = [_as_sequence(f"continuations[{i}]", c).to(prompt.device) for i, c in enumerate(continuations)]
    if not conts:
        msg = "continuations is empty; give at least one continuation to score"
        raise ValueError(msg)
    check_count("batch_size", batch_size, 1)
    forward = Forward(forward_func)
    results: list[ContinuationScore] = []
    for start in range(0, len(conts), batch_size):
        chunk = conts[start : start + batch_size]
        results.extend(_score_chunk(forward, prompt, chunk))
    return results


def _score_chunk(forward: Forward, prompt: Tensor, chunk: list[Tensor]) -> list[ContinuationScore]:
    width = max(c.numel() for c in chunk)
    # The last continuation token predicts nothing we score, so it is not fed: T = P + width - 1.
    # (b, T) right-padded with id 0, which no scored position can see
    ids = prompt.new_zeros(len(chunk), prompt.numel() + width - 1)
    ids[:, : prompt.numel()] = prompt
    for row, cont in enumerate(chunk):
        ids[row, prompt.numel() : prompt.numel() + cont.numel() - 1] = cont[:-1]
    with torch.no_grad():
        logits = forward(ids, None, width)  # (b, width, V) fp32; j predicts c_j
        logprobs = logits.log_softmax(dim=-1)
    scores = []
    for row, cont in enumerate(chunk):
        n = cont.numel()
        token_logprobs = logprobs[row, :n].gather(-1, cont[:, None]).squeeze(-1)  # (C,)
        is_greedy = bool((logits[row, :n].argmax(dim=-1) == cont).all())
        total = float(token_logprobs.sum())
        scores.append(ContinuationScore(token_logprobs, total, total / n, is_greedy))
    return scores


def multiple_choice(
    forward_func: ForwardFunc,
    prompt_ids: TokenIds,
    options: Sequence[TokenIds],
    *,
    length_normalized: bool = False,
    batch_size: int = 1,
) -> Choice:
    """Return the most likely option after the prompt (ties go to the lowest index).

    Compares summed log-probabilities, or per-token means with `length_normalized=True` (lm-eval's
    `acc_norm` normalises by bytes instead; pass `score` results through your own normaliser for that).

    Example:
        >>> choice = multiple_choice(forward, question_ids, [yes_ids, no_ids])
        >>> choice.best  # index of the option with the highest summed log-prob
    """
    scores = score(forward_func, prompt_ids, options, batch_size=batch_size)
    values = [s.mean_logprob if length_normalized else s.logprob for s in scores]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return Choice(best, values, scores)
