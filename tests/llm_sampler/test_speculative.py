"""Speculative decoding: the output distribution is the target's (chi-square) and greedy equals the target's."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from llm_sampler import (
    CachedForward,
    SamplingParams,
    TransformersIncremental,
    process_logits,
    sample,
    speculative_sample,
)

VOCAB = 4


def _bigram(seed: int, scale: float) -> torch.Tensor:
    """Logits table (previous id, V): a toy model whose next token depends on the last id only."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=gen) * scale


def _forward(table: torch.Tensor):
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]  # (B, T, V): next-token logits depend on the last id only

    return forward


def _exact_distribution(table: torch.Tensor, prompt: list[int], length: int, params: SamplingParams) -> dict:
    """P(x_1..x_n) under the target with processing, by enumeration (the penalty sees each prefix)."""
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=length):
        p, context = 1.0, list(prompt)
        for token in seq:
            scores = process_logits(table[context[-1]][None], params, torch.tensor([context]))
            p *= float(scores.softmax(-1)[0, token])
            context.append(token)
        probs[seq] = p
    return probs


@pytest.mark.parametrize(
    ("settings", "num_draft"),
    [
        ({"temperature": 1.0}, 2),
        ({"temperature": 0.8, "top_k": 3, "repetition_penalty": 1.5}, 3),
    ],
)
def test_output_distribution_equals_target(settings: dict, num_draft: int, chi_square_critical) -> None:
    target, draft = _bigram(0, 1.5), _bigram(1, 1.5)  # unrelated: plenty of rejections
    prompt, length, runs = [1], 3, 3000
    expected = _exact_distribution(target, prompt, length, SamplingParams(**settings))
    gen = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(expected, 0)
    proposed = accepted = 0
    for _ in range(runs):
        out = speculative_sample(
            _forward(target),
            _forward(draft),
            [prompt],
            length,
            num_draft_tokens=num_draft,
            generator=gen,
            **settings,
        )
        counts[tuple(out.tokens[0].tolist())] += 1
        proposed += out.stats.proposed
        accepted += out.stats.accepted
    # both the accept and the reject/resample paths ran
    assert 0.2 < accepted / proposed < 0.9
    assert sum(c for seq, c in counts.items() if expected[seq] == 0) == 0
    cells = [seq for seq in expected if expected[seq] > 0]
    statistic = sum((counts[s] - runs * expected[s]) ** 2 / (runs * expected[s]) for s in cells)
    assert statistic < chi_square_critical(len(cells) - 1), statistic


def test_draft_distribution_would_fail_the_same_test(chi_square_critical) -> None:
    """The test above can fail: the draft's own samples are far from the target's distribution."""
    target, draft = _bigram(0, 1.5), _bigram(1, 1.5)
    expected = _exact_distribution(target, [1], 3, SamplingParams())
    gen = torch.Generator().manual_seed(0)
    tokens = sample(_forward(draft), torch.tensor([[1]]).expand(3000, 1), 3, generator=gen)
    counts = dict.fromkeys(expected, 0)
    for row in tokens.tolist():
        counts[tuple(row)] += 1
    statistic = sum((counts[s] - 3000 * p) ** 2 / (3000 * p) for s, p in expected.items())
    assert statistic > chi_square_critical(len(expected) - 1)


@pytest.fixture(scope="module")
def noisy_draft(qwen2):
    """The target with 2% weight noise: correlated enough that some drafts are accepted, some rejected."""
    draft = copy.deepcopy(qwen2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return draft


@pytest.mark.parametrize("num_draft", [1, 3, 6])
def test_greedy_equals_target_greedy(qwen2, noisy_draft, num_draft: int) -> None:
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    expected = sample(lambda ids: qwen2(ids).logits, prompt, 30, temperature=0)
    target = CachedForward(TransformersIncremental(qwen2))
    draft = CachedForward(TransformersIncremental(noisy_draft))
    out = speculative_sample(target, draft, prompt, 30, num_draft_tokens=num_draft, temperature=0)
    assert out.tokens.tolist() == expected.tolist()
    stats = out.stats
    assert 0 < stats.accepted < stats.proposed
    assert stats.generated == 30 and stats.target_calls < 30
    # each target call adds one non-draft token
    assert stats.target_calls == stats.generated - stats.accepted


def test_identical_draft_is_always_accepted(qwen2) -> None:
    target = CachedForward(TransformersIncremental(qwen2))
    draft = CachedForward(TransformersIncremental(qwen2))
    out = speculative_sample(
        target,
        draft,
        [[5, 6, 7]],
        21,
        num_draft_tokens=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.stats.acceptance_rate == 1.0
    # four rounds of 4 + bonus, then a last round of 1
    assert out.stats.target_calls == 21 // 5 + 1
    assert out.tokens.shape == (1, 21)


def test_stop_token_ends_generation() -> None:
    table = torch.full((VOCAB, VOCAB), -5.0)
    table[:, 2] = 5.0  # token 2 is almost certain everywhere
    out = speculative_sample(_forward(table), _forward(table), [[1]], 10, stop_tokens=[2], temperature=0)
    assert out.tokens.tolist() == [[2]]


def test_zero_new_tokens() -> None:
    table = _bigram(0, 1.0)
    out = speculative_sample(_forward(table), _forward(table), [[1]], 0)
    assert out.tokens.shape == (1, 0) and out.stats.target_calls == 0
