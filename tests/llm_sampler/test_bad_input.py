"""Bad input fails up front with a ValueError that names the parameter and what is valid."""

from __future__ import annotations

import pytest
import torch

from llm_sampler import (
    multiple_choice,
    pad_left,
    sample,
    sample_stream,
    score,
    speculative_sample,
)

VOCAB = 8


def good_forward(ids: torch.Tensor) -> torch.Tensor:
    return torch.randn(ids.shape[0], ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(0))


PROMPT = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"temperature": -0.1},
            r"temperature must be a number >= 0 \(0 means greedy\), got -0.1",
        ),
        ({"temperature": float("nan")}, r"temperature must be a number >= 0"),
        (
            {"top_k": 0},
            r"top_k must be an integer >= 1, or None for no top-k filtering; got 0",
        ),
        ({"top_k": 2.5}, r"top_k must be an integer >= 1"),
        (
            {"top_p": 0.0},
            r"top_p must be in \(0, 1\], or None for no nucleus filtering; got 0.0",
        ),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        (
            {"min_p": -0.1},
            r"min_p must be in \[0, 1\], or None for no min-p filtering; got -0.1",
        ),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        (
            {"repetition_penalty": 0.0},
            r"repetition_penalty must be a finite number > 0 \(1.0 means no penalty\)",
        ),
        (
            {"repetition_penalty": -1.0},
            r"repetition_penalty must be a finite number > 0",
        ),
        ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0, got -1"),
        ({"stop_tokens": [-3]}, r"stop_tokens must be token ids >= 0"),
        ({"pad_token_id": -1}, r"pad_token_id must be a token id >= 0"),
    ],
)
def test_bad_sampling_settings(kwargs: dict, message: str) -> None:
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(good_forward, PROMPT, **args)
    # the stream checks when called, not when first advanced
    with pytest.raises(ValueError, match=message):
        sample_stream(good_forward, PROMPT, **args)
    if "pad_token_id" not in kwargs:
        with pytest.raises(ValueError, match=message):
            speculative_sample(good_forward, good_forward, PROMPT, **args)


@pytest.mark.parametrize(
    ("input_ids", "mask", "message"),
    [
        (
            torch.zeros(1, 0, dtype=torch.long),
            None,
            r"input_ids is empty \(shape \(1, 0\)\); the prompt needs at least one token",
        ),
        ([], None, r"input_ids is empty"),
        (
            torch.zeros(2, 2, 2, dtype=torch.long),
            None,
            r"input_ids must be 1-D \(T,\) or 2-D \(B, T\), got shape \(2, 2, 2\)",
        ),
        (
            torch.ones(1, 3),
            None,
            r"input_ids must hold integer token ids, got dtype torch.float32",
        ),
        (
            [[1, 2], [3]],
            None,
            r"input_ids must be a tensor or a rectangular list of token ids \(use pad_left",
        ),
        (
            PROMPT,
            torch.ones(1, 2),
            r"attention_mask must have the shape of input_ids \(1, 3\), got \(1, 2\)",
        ),
        (
            PROMPT,
            torch.tensor([[1, 2, 1]]),
            r"attention_mask must hold only 0 \(padding\) and 1 \(token\)",
        ),
        (
            PROMPT,
            torch.tensor([[1, 1, 0]]),
            r"attention_mask must be left-padded \(each row 0...0 1...1\)",
        ),
        (
            torch.tensor([[1, 2], [3, 4]]),
            torch.tensor([[1, 1], [0, 0]]),
            r"row 1 of attention_mask is all padding",
        ),
    ],
)
def test_bad_prompts(input_ids, mask, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample(good_forward, input_ids, 3, attention_mask=mask)


def test_padding_needs_a_forward_that_takes_the_mask() -> None:
    ids, mask = pad_left([[1, 2, 3], [4]], 0)
    with pytest.raises(
        ValueError,
        match=r"input_ids is left-padded but forward_func has no attention_mask parameter",
    ):
        sample(good_forward, ids, 3, attention_mask=mask)

    def masked_forward(ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return good_forward(ids)

    assert sample(masked_forward, ids, 3, attention_mask=mask).shape == (2, 3)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            lambda ids: torch.zeros(ids.shape[0], VOCAB),
            r"forward_func must return logits of shape \(B, T, V\) = \(1, 3, V\)",
        ),
        (
            lambda ids: torch.zeros(2, ids.shape[1], VOCAB),
            r"got \(2, 3, 8\) for input_ids of shape \(1, 3\)",
        ),
        (lambda ids: torch.zeros(1, 4, VOCAB), r"with 1 <= k <= T; got \(1, 4, 8\)"),
        (lambda ids: torch.zeros(1, 0, VOCAB), r"got \(1, 0, 8\)"),
        (
            lambda ids: torch.zeros(1, 3, VOCAB, dtype=torch.long),
            r"forward_func must return floating-point logits",
        ),
        (
            lambda ids: torch.full((1, 3, VOCAB), float("nan")),
            r"forward_func returned NaN or \+inf logits",
        ),
        (
            lambda ids: torch.full((1, 3, VOCAB), float("inf")),
            r"forward_func returned NaN or \+inf logits",
        ),
        (
            lambda ids: torch.full((1, 3, VOCAB), -float("inf")),
            r"returned a row of logits that is -inf everywhere",
        ),
    ],
)
def test_bad_forward_output(returned, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample(returned, PROMPT, 2)


def test_forward_must_return_a_tensor() -> None:
    with pytest.raises(
        TypeError,
        match=r"forward_func must return a logits tensor \(B, T, V\), got list",
    ):
        sample(lambda ids: ids.tolist(), PROMPT, 2)


def test_minus_inf_bans_a_token() -> None:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        logits[..., :-1] = -float("inf")
        return logits

    assert sample(forward, PROMPT, 4).tolist() == [[VOCAB - 1] * 4]


def test_forward_func_must_be_callable() -> None:
    with pytest.raises(
        TypeError,
        match=r"forward_func must be callable as forward_func\(input_ids\) -> logits",
    ):
        sample("model", PROMPT, 2)  # type: ignore[arg-type]


def test_bad_scoring_input() -> None:
    with pytest.raises(
        ValueError,
        match=r"prompt_ids must be a non-empty 1-D sequence of token ids, got shape \(0,\)",
    ):
        score(good_forward, [], [[1]])
    with pytest.raises(
        ValueError,
        match=r"continuations\[1\] must be a non-empty 1-D sequence of token ids",
    ):
        score(good_forward, [1], [[1], []])
    with pytest.raises(ValueError, match=r"continuations is empty; give at least one continuation"):
        multiple_choice(good_forward, [1], [])
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        score(good_forward, [1], [[1]], batch_size=0)
    with pytest.raises(
        ValueError,
        match=r"forward_func returned logits for the last 1 positions but 2 are needed",
    ):
        score(lambda ids: good_forward(ids)[:, -1:], [1, 2], [[3, 4]])


def test_bad_speculative_input() -> None:
    with pytest.raises(ValueError, match=r"num_draft_tokens must be an integer >= 1, got 0"):
        speculative_sample(good_forward, good_forward, PROMPT, 3, num_draft_tokens=0)
    with pytest.raises(
        ValueError,
        match=r"speculative_sample supports batch size 1 only .*got input_ids with batch size 2",
    ):
        speculative_sample(good_forward, good_forward, [[1], [2]], 3)
    with pytest.raises(ValueError, match=r"draft_forward must return logits of shape"):
        speculative_sample(good_forward, lambda ids: torch.zeros(VOCAB), PROMPT, 3)


def test_pad_left_rejects_empty_rows() -> None:
    with pytest.raises(
        ValueError,
        match=r"pad_left needs at least one sequence and every sequence needs at least one token",
    ):
        pad_left([[1], []], 0)
