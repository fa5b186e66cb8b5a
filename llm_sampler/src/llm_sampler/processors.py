"""Logits processors: small pure functions `logits -> logits`, equal to transformers' own classes.

Order and semantics follow transformers' `generate` (`_get_logits_processor`, v4.45-v5.23):
repetition penalty -> temperature -> top-k -> top-p -> min-p, each on fp32 logits, filtered tokens set to -inf,
`min_tokens_to_keep = 1`. Each function equals the transformers class named in its docstring, op for op, so the
same logits and seed give the same token. `temperature == 0` means greedy: repetition penalty, then argmax
(the filters never change the argmax).

One deliberate difference: positions with `attention_mask == 0` (left padding) are not "seen" by the repetition
penalty. transformers penalises the pad id found in a padded prompt, which makes a row's distribution depend on
the batch it sits in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llm_sampler.validation import check_sampling_params

_FILTERED = -float("inf")


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings; `None` (or 1.0 for penalty and temperature) switches a processor off.

    Example:
        >>> params = SamplingParams(temperature=0.7, top_p=0.9)
        >>> scores = process_logits(torch.randn(2, 100), params)
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        check_sampling_params(
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: Tensor,
    context_ids: Tensor,
    penalty: float,
    context_mask: Tensor | None = None,
) -> Tensor:
    """Divide positive (multiply negative) logits of every id in the context by `penalty`, once per id.

    Equals transformers' `RepetitionPenaltyLogitsProcessor` except that masked (padding) positions are ignored.
    `logits` `(B, V)`, `context_ids` and `context_mask` `(B, L)`.

    Example:
        >>> apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1]]), 2.0)
        tensor([[ 1., -4.,  1.]])
    """
    vocab = logits.shape[-1]
    # Ids past the logits' vocabulary (and padding) land in an extra column that is dropped.
    ids = context_ids.clamp(max=vocab)
    if context_mask is not None:
        ids = ids.masked_fill(context_mask == 0, vocab)
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, :vocab], penalised, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by `temperature` > 0 (transformers' `TemperatureLogitsWarper`).

    Example:
        >>> apply_temperature(torch.tensor([[1.0, 2.0]]), 0.5)
        tensor([[2., 4.]])
    """
    return logits / temperature


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep every logit >= the k-th largest, so ties at the pivot survive (transformers' `TopKLogitsWarper`).

    Example:
        >>> apply_top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 1)
        tensor([[-inf, 3., 3., -inf]])
    """
    k = min(top_k, logits.shape[-1])
    pivot = torch.topk(logits, k)[0][..., -1, None]  # (B, 1)
    return logits.masked_fill(logits < pivot, _FILTERED)


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass is >= `top_p` (transformers' `TopPLogitsWarper`).

    Tokens are sorted ascending and dropped while the cumulative probability is <= 1 - top_p; the most likely
    token always survives.

    Example:
        >>> apply_top_p(torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log(), 0.6).exp()
        tensor([[0.0000, 0.0000, 0.3000, 0.4000]])
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V), ascending
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # min_tokens_to_keep = 1
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, _FILTERED)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens with probability < `min_p` * the top probability (transformers' `MinPLogitsWarper`).

    Example:
        >>> apply_min_p(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(), 0.2).exp()
        tensor([[0.5000, 0.3000, 0.1500, 0.0000]])
    """
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    top = torch.topk(probs, 1, dim=-1).indices  # (B, 1)
    remove.scatter_(-1, top, False)  # min_tokens_to_keep = 1
    return logits.masked_fill(remove, _FILTERED)


def process_logits(
    logits: Tensor,
    params: SamplingParams,
    context_ids: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Tensor:
    """Apply the enabled processors in transformers' order to fp32 `logits` `(B, V)`; returns `(B, V)`.

    `context_ids` `(B, L)` (prompt plus generated tokens) is only read by the repetition penalty.
    For `temperature == 0` only the repetition penalty runs: greedy picks the argmax of the result.

    Example:
        >>> params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)
        >>> probs = process_logits(logits, params, context_ids=input_ids).softmax(-1)
    """
    penalty = params.repetition_penalty
    if penalty is not None and penalty != 1.0:
        if context_ids is None:
            msg = "repetition_penalty needs context_ids (the prompt and the tokens generated so far)"
            raise ValueError(msg)
        logits = apply_repetition_penalty(logits, context_ids, penalty, context_mask)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p is not None:
        logits = apply_min_p(logits, params.min_p)
    return logits


def select_tokens(scores: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from processed `scores` `(B, V)`: argmax when greedy, else a multinomial draw.

    The draw is transformers' `multinomial(softmax(scores), 1)`; with `generator=None` it uses torch's global
    RNG, so `torch.manual_seed(s)` reproduces `generate(do_sample=True)` token for token.

    Example:
        >>> select_tokens(torch.tensor([[0.0, 5.0, 1.0]]), SamplingParams(temperature=0))
        tensor([1])
    """
    if params.greedy:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    tokens = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    return tokens.squeeze(1)
