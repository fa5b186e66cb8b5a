"""Multi-token stop sequences (`stop_tokens=[[13, 198]]`) and stop strings: equal transformers' generate with
an equivalent StoppingCriteria, and a reference loop over the free-running greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from llm_sampler import (
    CachedForward,
    TransformersIncremental,
    pad_left,
    sample,
    sample_stream,
    speculative_sample,
    stream_text,
    transformers_forward,
)


class GeneratedEndsWith(StoppingCriteria):
    """A row stops once its *generated* tokens end with one of `stops` (the prompt never counts).

    `eos_token_id` is set so that generate pads finished rows, as it does for its own EOS criteria."""

    eos_token_id = None

    def __init__(self, stops: list[list[int]], prompt_length: int) -> None:
        self.stops, self.prompt_length = stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]  # (B, n)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for seq in self.stops:
            if len(seq) <= generated.shape[1]:
                done |= (generated[:, -len(seq) :] == torch.tensor(seq)).all(dim=1)
        return done


def _hf(model, ids, mask, n: int, stops: list[list[int]], pad: int) -> torch.Tensor:
    criteria = StoppingCriteriaList([GeneratedEndsWith(stops, ids.shape[1])])
    # greedy with transformers' implicit defaults (top_k=50, ...) switched off
    config = GenerationConfig(
        max_new_tokens=n, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=None
    )
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config, stopping_criteria=criteria)
    return out[:, ids.shape[1] :]


def _first_pair(row: list[int], start: int) -> list[int]:
    """A 2-token sequence that first occurs in `row` at or after `start` (not earlier)."""
    for i in range(start, len(row) - 1):
        pair = row[i : i + 2]
        if all(row[j : j + 2] != pair for j in range(i)):
            return pair
    raise AssertionError("no fresh pair")


@pytest.fixture
def batch(qwen2):
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [12, 3, 44], [40]], 0)
    free = sample(transformers_forward(qwen2), ids, 20, temperature=0, attention_mask=mask)
    return ids, mask, free


def test_stop_sequence_equals_generate_with_a_stopping_criteria(qwen2, batch) -> None:
    ids, mask, free = batch
    pair = _first_pair(free[1].tolist(), 3)  # row 1 stops after a few tokens, the others run on or stop later
    expected = _hf(qwen2, ids, mask, 20, [pair], 99)
    assert (expected == 99).any()  # rows finish at different steps
    for stops in ([pair], torch.tensor([pair]), (tuple(pair),)):
        got = sample(
            CachedForward(TransformersIncremental(qwen2)),
            ids,
            20,
            temperature=0,
            attention_mask=mask,
            stop_tokens=stops,
            pad_token_id=99,
        )
        assert got.tolist() == expected.tolist(), stops
    streamed = sample_stream(qwen2_forward := transformers_forward(qwen2), ids, 20, temperature=0,
                             attention_mask=mask, stop_tokens=[pair], pad_token_id=99)  # fmt: skip
    assert torch.stack(list(streamed), dim=1).tolist() == expected.tolist()
    # mixed with a single-token stop
    single = int(free[2, 6])
    expected = _hf(qwen2, ids, mask, 20, [[single], pair], 99)
    got = sample(qwen2_forward, ids, 20, temperature=0, attention_mask=mask, stop_tokens=[single, pair],
                 pad_token_id=99)  # fmt: skip
    assert got.tolist() == expected.tolist()


def test_a_2d_tensor_is_not_flattened_into_single_tokens(qwen2, batch) -> None:
    ids, mask, free = batch
    pair = _first_pair(free[0].tolist(), 2)
    got = sample(transformers_forward(qwen2), ids[:1], 20, temperature=0, stop_tokens=torch.tensor([pair]))
    row = free[0].tolist()
    end = next(i for i in range(1, len(row)) if row[i - 1 : i + 1] == pair) + 1
    assert got[0].tolist() == row[:end]  # stopped right after the pair, not at its first token


def test_a_stop_sequence_spanning_the_prompt_does_not_stop(qwen2, batch) -> None:
    ids, _, free = batch
    first = int(free[0, 0])
    got = sample(transformers_forward(qwen2), ids[:1], 5, temperature=0, stop_tokens=[[11, first]])
    assert got[0].tolist() == free[0, :5].tolist()  # the prompt ends with 11: only generated tokens count


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_stops_on_a_sequence_like_sample(qwen2, batch, num_draft: int) -> None:
    ids, _, free = batch
    prompt = ids[:1]
    draft = copy.deepcopy(qwen2)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    for pair in (_first_pair(free[0].tolist(), 2), _first_pair(free[0].tolist(), 5)):
        want = sample(transformers_forward(qwen2), prompt, 20, temperature=0, stop_tokens=[pair])
        out = speculative_sample(
            CachedForward(TransformersIncremental(qwen2)),
            CachedForward(TransformersIncremental(draft)),
            prompt,
            20,
            num_draft_tokens=num_draft,
            temperature=0,
            stop_tokens=[pair],
        )
        assert out.tokens.tolist() == want.tolist()
        assert out.tokens[0, -2:].tolist() == pair


class ByteDecoder:
    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _script_forward(script: bytes):
    """Greedy follows `script` byte by byte; counts the calls."""
    calls = []

    def forward(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[1])
        return torch.nn.functional.one_hot(torch.tensor([[script[ids.shape[1]]]]), 256).float() * 10

    return forward, calls


def test_stream_text_hides_a_multi_token_stop_and_what_looked_like_one() -> None:
    script = b"Qa\nb\n\nc"  # "\n" then "b" is not the stop [10, 10]: it must come out
    forward, calls = _script_forward(script)
    chunks = list(stream_text(forward, [script[0]], ByteDecoder(), 20, temperature=0, stop_tokens=[[10, 10]]))
    assert "".join(chunks) == "a\nb"
    assert len(calls) == 5  # stopped right after the second "\n"


@pytest.mark.parametrize("stop", ["\n\n", "c\n", "é!"])
def test_stream_text_stop_strings(stop: str) -> None:
    text = "Qab\nc\n\nd é!é!"
    script = text.encode()
    forward, calls = _script_forward(script)
    chunks = list(stream_text(forward, [script[0]], ByteDecoder(), 40, temperature=0, stop_strings=[stop, "zz"]))
    # reference loop: the first generated token after which the generated text contains the stop string
    generated = script[1:]
    n = next(i for i in range(1, len(generated) + 1) if stop in generated[:i].decode(errors="replace"))
    assert "".join(chunks) == generated[:n].decode().split(stop)[0]
    assert len(calls) == n


@pytest.mark.parametrize(
    ("stop_tokens", "error", "message"),
    [
        ([[13, 198], []], ValueError, r"stop_tokens\[1\] is an empty stop sequence"),
        ([[13, -1]], ValueError, r"stop_tokens must be token ids >= 0, got \[13, -1\]"),
        ([[[1, 2]]], TypeError, r"stop_tokens\[0\]\[0\] must be a token id"),
        (["\n\n"], TypeError, r"stop_tokens\[0\] is a str; stop_tokens takes token ids"),
        (torch.zeros(1, 2, 2, dtype=torch.long), ValueError, r"a stop_tokens tensor must be 1-D .* or 2-D"),
        (torch.tensor([1.0]), TypeError, r"stop_tokens must hold integer token ids, got dtype torch.float32"),
    ],
)
def test_bad_stop_sequences(stop_tokens, error, message: str) -> None:
    with pytest.raises(error, match=message):
        sample(lambda ids: ids, [[1]], 3, stop_tokens=stop_tokens)
