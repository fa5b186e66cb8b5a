"""Speculative decoding that preserves the target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023).

Each round the draft proposes up to `num_draft_tokens` tokens from its processed distribution q; the target
scores all of them plus one more position in a single call, giving p. Draft token x_i is accepted with
probability min(1, p(x_i) / q(x_i)); at the first rejection a token is drawn from norm(max(0, p - q)) and the
round ends; if all are accepted a bonus token is drawn from the target's next distribution. p and q are the
final processed distributions (same temperature, top-k, top-p, min-p) and the repetition penalty is
recomputed per position from that position's own context. At temperature 0 a draft token is accepted when it
equals the target's argmax, so the output equals greedy decoding with the target alone.

Batch size 1 only. Wrap both models in `CachedForward`: rollback after a rejection is then a cache crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llm_sampler.forward import Forward, ForwardFunc
from llm_sampler.processors import SamplingParams, process_logits
from llm_sampler.stops import matched_stop
from llm_sampler.validation import (
    StopTokens,
    TokenIds,
    check_count,
    check_prompt,
    check_stop_tokens,
)


@dataclass(frozen=True)
class SpeculativeStats:
    """Counters of one `speculative_sample` call."""

    proposed: int  # draft tokens proposed
    accepted: int  # draft tokens accepted
    target_calls: int
    draft_calls: int
    generated: int  # tokens returned

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated / self.target_calls if self.target_calls else 0.0


@dataclass(frozen=True)
class SpeculativeOutput:
    """New tokens `(1, n)` int64 (stop token included, nothing after it) and the acceptance statistics."""

    tokens: Tensor
    stats: SpeculativeStats


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def speculative_sample(
    target_forward: ForwardFunc,
    draft_forward: ForwardFunc,
    input_ids: TokenIds,
    max_new_tokens: int,
    *,
    num_draft_tokens: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Sample from `target_forward` with proposals from the cheaper `draft_forward` (same vocabulary).

    Sampling arguments are those of `sample`; the output has the distribution `sample` would give with
    `target_forward` alone (exactly, not approximately), and at temperature 0 the same tokens.

    Example:
        >>> target = CachedForward(TransformersIncremental(big_model))
        >>> draft = CachedForward(TransformersIncremental(small_model))
        >>> out = speculative_sample(target, draft, prompt, 64, temperature=0.7)
        >>> out.tokens.shape, out.stats.acceptance_rate  # (1, n) and a fraction in [0, 1]
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    check_count("max_new_tokens", max_new_tokens, 0)
    check_count("num_draft_tokens", num_draft_tokens, 1)
    ids, _ = check_prompt(input_ids, None)
    if ids.shape[0] != 1:
        msg = (
            f"speculative_sample supports batch size 1 only (rows accept different numbers of tokens); got "
            f"input_ids with batch size {ids.shape[0]}: call it once per row"
        )
        raise ValueError(msg)
    stops, _ = check_stop_tokens(stop_tokens, None)
    target = Forward(target_forward, "target_forward")
    draft = Forward(draft_forward, "draft_forward")
    prompt_length = ids.shape[1]
    counts = {"proposed": 0, "accepted": 0, "target_calls": 0, "draft_calls": 0}
    with torch.no_grad():
        while (produced := ids.shape[1] - prompt_length) < max_new_tokens:
            # A round yields at most gamma + 1 tokens: never overshoot max_new_tokens.
            gamma = min(num_draft_tokens, max_new_tokens - produced - 1)
            new = _round(target, draft, ids, gamma, params, generator, counts)
            # the first of the new tokens that completes a stop (a sequence may have begun in earlier rounds)
            generated = ids[0, prompt_length:].tolist()
            stop_at = next((i for i in range(len(new)) if matched_stop(generated + new[: i + 1], stops)), None)
            if stop_at is not None:
                new = new[: stop_at + 1]
            ids = torch.cat([ids, ids.new_tensor([new])], dim=1)  # (1, L + len(new))
            if stop_at is not None:
                break
    tokens = ids[:, prompt_length:]  # (1, n)
    stats = SpeculativeStats(**counts, generated=tokens.shape[1])
    return SpeculativeOutput(tokens, stats)


def _round(
    target: Forward,
    draft: Forward,
    ids: Tensor,
    gamma: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    counts: dict[str, int],
) -> list[int]:
    """One draft-then-verify round from context `ids` `(1, L)`; returns the 1..gamma+1 tokens it produces."""
    length = ids.shape[1]
    context = ids
    drafted: list[int] = []
    draft_probs: list[Tensor] = []  # q_i, (V,) each
    for _ in range(gamma):
        logits = draft(context, None, 1)[:, -1]  # (1, V)
        scores = process_logits(logits, params, context)[0]  # (V,)
        if params.greedy:
            token = int(scores.argmax())
        else:
            draft_probs.append(scores.softmax(-1))
            token = _draw(draft_probs[-1], generator)
        drafted.append(token)
        next_id = context.new_tensor([[token]])
        context = torch.cat([context, next_id], dim=1)  # (1, L + i + 1)
    counts["draft_calls"] += gamma
    counts["proposed"] += gamma
    counts["target_calls"] += 1
    # (gamma + 1, V): row i predicts the token at position L + i
    target_logits = target(context, None, gamma + 1)[0]
    for i in range(gamma + 1):
        # the repetition penalty sees this position's own context
        prefix = context[:, : length + i]
        scores = process_logits(target_logits[i : i + 1], params, prefix)[0]  # (V,)
        if params.greedy:
            choice = int(scores.argmax())
            if i < gamma and choice == drafted[i]:
                counts["accepted"] += 1
                continue
            return [*drafted[:i], choice]
        p = scores.softmax(-1)
        if i == gamma:
            # every draft accepted: a bonus token from p
            return [*drafted, _draw(p, generator)]
        q, token = draft_probs[i], drafted[i]
        # Accept with probability min(1, p/q): u < p/q, written u*q < p (q > 0: drawn).
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[token]) < float(p[token]):
            counts["accepted"] += 1
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # only reachable through rounding when p == q
            residual = p
        return [*drafted[:i], _draw(residual / residual.sum(), generator)]
    raise AssertionError("unreachable: the loop returns at i == gamma")
