"""`sample` against transformers' generate on a tiny random Qwen2, and its token frequencies by chi-square."""

from __future__ import annotations

import pytest
import torch

from llm_sampler import (
    CachedForward,
    SamplingParams,
    TransformersIncremental,
    pad_left,
    process_logits,
    sample,
    sample_stream,
    transformers_forward,
)

SETTINGS = [
    {
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.3,
    },
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 1.0, "top_k": 5, "repetition_penalty": 0.7},
]


def _prompt(seed: int, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 100, (1, length), generator=torch.Generator().manual_seed(seed))


def _forwards(model):
    return {
        "plain": lambda ids: model(ids).logits,
        "transformers_forward": transformers_forward(model),
        "cached": CachedForward(TransformersIncremental(model)),
    }


@pytest.mark.parametrize("kind", ["plain", "transformers_forward", "cached"])
def test_greedy_equals_generate(qwen2, hf_generate, kind: str) -> None:
    for seed in range(3):
        ids = _prompt(seed)
        expected = hf_generate(ids, 24)
        assert sample(_forwards(qwen2)[kind], ids, 24, temperature=0).tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["transformers_forward", "cached"])
def test_greedy_left_padded_batch_equals_generate(qwen2, hf_generate, kind: str) -> None:
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 3, 44], [40], [70, 71, 72, 73, 74, 75, 76]], 0)
    expected = hf_generate(ids, 16, mask)
    got = sample(_forwards(qwen2)[kind], ids, 16, temperature=0, attention_mask=mask)
    assert got.tolist() == expected.tolist()
    # each row equals that prompt run alone: padding does not leak into a row
    for row in range(ids.shape[0]):
        alone = ids[row, mask[row].bool()][None]
        assert sample(_forwards(qwen2)[kind], alone, 16, temperature=0).tolist() == got[row : row + 1].tolist()


def test_stop_tokens_pad_finished_rows_like_generate(qwen2, hf_generate) -> None:
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 3, 44], [40]], 0)
    free = sample(transformers_forward(qwen2), ids, 20, temperature=0, attention_mask=mask)
    # a token row 1 produces early; rows finish at different steps
    stop = int(free[1, 4])
    expected = hf_generate(ids, 20, mask, eos_token_id=[stop], pad_token_id=99)
    cached = CachedForward(TransformersIncremental(qwen2))
    got = sample(
        cached,
        ids,
        20,
        temperature=0,
        attention_mask=mask,
        stop_tokens=[stop],
        pad_token_id=99,
    )
    assert got.tolist() == expected.tolist()
    assert (got == 99).any()


@pytest.mark.parametrize("settings", SETTINGS)
def test_same_seed_same_tokens_as_generate(qwen2, hf_generate, settings: dict) -> None:
    """Same processors, same draw (torch.multinomial on the global RNG) and, through the cache, bit-identical
    logits: token-for-token equal. (An uncached forward differs in the last bits, so it is only equal in
    distribution; a draw near a bucket edge can then go the other way.)"""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 3, 44, 45, 46, 47, 48]])
    torch.manual_seed(1234)
    expected = hf_generate(ids, 30, do_sample=True, **settings)
    torch.manual_seed(1234)
    got = sample(CachedForward(TransformersIncremental(qwen2)), ids, 30, **settings)
    assert got.tolist() == expected.tolist()


def test_generator_makes_runs_reproducible(qwen2) -> None:
    forward = transformers_forward(qwen2)
    runs = [sample(forward, _prompt(0), 12, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    other = sample(forward, _prompt(0), 12, generator=torch.Generator().manual_seed(8))
    assert other.tolist() != runs[0].tolist()


def test_stream_yields_what_sample_returns(qwen2) -> None:
    ids, mask = pad_left([[5, 6, 7], [9]], 0)
    forward = transformers_forward(qwen2)
    steps = list(
        sample_stream(
            forward,
            ids,
            8,
            attention_mask=mask,
            generator=torch.Generator().manual_seed(3),
        )
    )
    whole = sample(forward, ids, 8, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    assert [s.shape for s in steps] == [torch.Size([2])] * 8
    assert torch.stack(steps, 1).tolist() == whole.tolist()


def test_stream_leaves_grad_mode_alone(qwen2) -> None:
    stream = sample_stream(transformers_forward(qwen2), _prompt(0), 3, temperature=0)
    next(stream)
    assert torch.is_grad_enabled()


def test_zero_new_tokens_calls_nothing() -> None:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        raise AssertionError("must not be called")

    assert sample(forward, [[1, 2], [3, 4]], 0).shape == (2, 0)


def test_stops_early_when_every_row_stopped() -> None:
    def forward(ids: torch.Tensor) -> torch.Tensor:  # always predicts token 3
        return torch.nn.functional.one_hot(torch.full_like(ids, 3), 5).float()

    assert sample(forward, [[1], [2]], 10, temperature=0, stop_tokens=[3]).tolist() == [
        [3],
        [3],
    ]


@pytest.mark.parametrize("settings", [*SETTINGS, {"temperature": 1.0}])
def test_token_frequencies_match_processed_distribution(settings: dict, chi_square_critical) -> None:
    vocab, draws = 12, 20_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    prompt = torch.tensor([[1, 2, 2, 7]])

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return logits.expand(ids.shape[0], ids.shape[1], vocab)

    scores = process_logits(logits[None], SamplingParams(**settings), prompt)
    expected = scores.softmax(-1)[0]  # (V,)
    tokens = sample(
        forward,
        prompt.expand(draws, -1),
        1,
        generator=torch.Generator().manual_seed(0),
        **settings,
    )
    counts = torch.bincount(tokens[:, 0], minlength=vocab).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered token was sampled"
    statistic = float(((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum())
    assert statistic < chi_square_critical(int(kept.sum()) - 1), statistic
