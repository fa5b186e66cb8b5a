"""Each processor against a hand-computed example and against transformers' own LogitsProcessor classes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_sampler import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    select_tokens,
)

NEG = -float("inf")


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


# (processor, logits, argument, expected): one hand-computed line per case; log(0) = -inf marks a filtered token.
HAND_CASES = [
    (apply_temperature, t([1.0, -2.0, 0.5]), 0.5, t([2.0, -4.0, 1.0])),
    (apply_temperature, t([1.0, -2.0, 0.5]), 2.0, t([0.5, -1.0, 0.25])),
    # tie at the pivot survives
    (
        apply_top_k,
        t([1.0, 3.0, 3.0, 2.0, 0.0]),
        1,
        t([NEG, 3.0, 3.0, NEG, NEG]),
    ),
    (apply_top_k, t([1.0, 3.0, 3.0, 2.0, 0.0]), 3, t([NEG, 3.0, 3.0, 2.0, NEG])),
    (apply_top_k, t([1.0, 3.0, 2.0]), 10, t([1.0, 3.0, 2.0])),  # k > V keeps everything
    # probs .1 .2 .3 .4: ascending cumsum .1 .3 .6 1.; top_p=.6 drops cumsum <= .4 -> .1 and .2
    (apply_top_p, t([0.1, 0.2, 0.3, 0.4]).log(), 0.6, t([0.0, 0.0, 0.3, 0.4]).log()),
    (apply_top_p, t([0.1, 0.2, 0.3, 0.4]).log(), 0.35, t([0.0, 0.0, 0.0, 0.4]).log()),
    # the top token survives
    (
        apply_top_p,
        t([0.1, 0.2, 0.3, 0.4]).log(),
        0.01,
        t([0.0, 0.0, 0.0, 0.4]).log(),
    ),
    (apply_top_p, t([0.1, 0.2, 0.3, 0.4]).log(), 0.95, t([0.1, 0.2, 0.3, 0.4]).log()),
    # min_p .2 x top .5 = .1: only .05 is below
    (apply_min_p, t([0.5, 0.3, 0.15, 0.05]).log(), 0.2, t([0.5, 0.3, 0.15, 0.0]).log()),
    (apply_min_p, t([0.5, 0.3, 0.15, 0.05]).log(), 1.0, t([0.5, 0.0, 0.0, 0.0]).log()),
    (
        apply_min_p,
        t([0.5, 0.3, 0.15, 0.05]).log(),
        0.0,
        t([0.5, 0.3, 0.15, 0.05]).log(),
    ),
]


@pytest.mark.parametrize(("processor", "logits", "argument", "expected"), HAND_CASES)
def test_processor_hand_computed(processor, logits, argument, expected) -> None:
    torch.testing.assert_close(processor(logits, argument), expected)


def test_repetition_penalty_hand_computed() -> None:
    logits = t([2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5])
    # id 7 >= V is ignored; repeats count once
    context = torch.tensor([[0, 1, 1, 7], [3, 3, 2, 2]])
    # row 1: the 3s are padding, not seen
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = apply_repetition_penalty(logits, context, 2.0, mask)
    torch.testing.assert_close(out, t([1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 0.5, 0.5]))


def _random_logits(seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=gen) * 2
    return logits.round() if ties else logits  # rounding makes many exact ties


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda x: apply_temperature(x, 0.7), TemperatureLogitsWarper(0.7)),
        (lambda x: apply_temperature(x, 1.9), TemperatureLogitsWarper(1.9)),
        (lambda x: apply_top_k(x, 1), TopKLogitsWarper(1)),
        (lambda x: apply_top_k(x, 5), TopKLogitsWarper(5)),
        (lambda x: apply_top_k(x, 39), TopKLogitsWarper(39)),
        (lambda x: apply_top_p(x, 0.05), TopPLogitsWarper(0.05)),
        (lambda x: apply_top_p(x, 0.5), TopPLogitsWarper(0.5)),
        (lambda x: apply_top_p(x, 0.9), TopPLogitsWarper(0.9)),
        (lambda x: apply_min_p(x, 0.05), MinPLogitsWarper(0.05)),
        (lambda x: apply_min_p(x, 0.3), MinPLogitsWarper(0.3)),
    ],
)
def test_warper_equals_transformers(ours, theirs, ties: bool) -> None:
    for seed in range(5):
        logits = _random_logits(seed, ties)
        ids = torch.zeros(6, 1, dtype=torch.long)
        torch.testing.assert_close(ours(logits), theirs(ids, logits.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    for seed in range(5):
        logits = _random_logits(seed, ties=False)
        # ids < V only: transformers < 5.2 raises on ids past the vocabulary (ours ignores them)
        gen = torch.Generator().manual_seed(seed)
        context = torch.randint(0, 40, (6, 12), generator=gen)
        expected = RepetitionPenaltyLogitsProcessor(penalty)(context, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, context, penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {
            "temperature": 0.7,
            "top_k": 10,
            "top_p": 0.8,
            "min_p": 0.05,
            "repetition_penalty": 1.3,
        },
        {"temperature": 1.5, "top_p": 0.6},
        {"temperature": 0.5, "min_p": 0.2, "repetition_penalty": 0.8},
        {"temperature": 1.0, "top_k": 3},
    ],
)
def test_process_logits_equals_transformers_chain(settings: dict) -> None:
    """The whole chain, in transformers' order, equals transformers' processors chained the same way."""
    chain = []
    if "repetition_penalty" in settings:
        chain.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings["temperature"] != 1.0:
        chain.append(TemperatureLogitsWarper(settings["temperature"]))
    if "top_k" in settings:
        chain.append(TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        chain.append(TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        chain.append(MinPLogitsWarper(settings["min_p"]))
    params = SamplingParams(**settings)
    for seed in range(5):
        logits = _random_logits(seed, ties=seed % 2 == 1)
        context = torch.randint(0, 40, (6, 9), generator=torch.Generator().manual_seed(seed))
        expected = LogitsProcessorList(chain)(context, logits.clone())
        torch.testing.assert_close(process_logits(logits, params, context), expected, rtol=0, atol=0)


def test_order_matters() -> None:
    """Temperature before top-p: the same settings in the other order keep a different set (guards the order)."""
    logits = t([0.0, 1.0, 2.0, 3.0])
    params = SamplingParams(temperature=3.0, top_p=0.5)
    kept = torch.isfinite(process_logits(logits, params))
    kept_other_order = torch.isfinite(apply_temperature(apply_top_p(logits, 0.5), 3.0))
    assert kept.sum() > kept_other_order.sum()


def test_greedy_ignores_filters_but_not_penalty() -> None:
    logits = t([1.0, 5.0, 3.0])
    context = torch.tensor([[1]])
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1, repetition_penalty=10.0)
    scores = process_logits(logits, greedy, context)
    torch.testing.assert_close(scores, t([1.0, 0.5, 3.0]))  # only the penalty ran
    assert select_tokens(scores, greedy).tolist() == [2]


def test_process_logits_does_not_modify_input() -> None:
    logits = _random_logits(0, ties=True)
    before = logits.clone()
    process_logits(
        logits,
        SamplingParams(0.5, 3, 0.5, 0.1, 1.2),
        torch.zeros(6, 2, dtype=torch.long),
    )
    torch.testing.assert_close(logits, before, rtol=0, atol=0)
