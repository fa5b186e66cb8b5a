"""CachedForward: outputs equal the uncached model's; only the suffix beyond the common prefix is run."""

from __future__ import annotations

import pytest
import torch

from llm_sampler import (
    CachedForward,
    IncrementalModel,
    TransformersIncremental,
    pad_left,
    sample,
    score,
)


def _full(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        # (B, T, V)
        return model(ids, attention_mask=mask, position_ids=positions).logits.float()


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows))


# (input_ids, logits_to_keep, positions the model must run): one line per call, run in order on one cache.
CALLS = [
    (_ids([1, 2, 3, 4, 5, 6]), 1, 6),  # empty cache: everything
    (_ids([1, 2, 3, 4, 5, 6, 7]), 1, 1),  # extend by one
    (_ids([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), 2, 3),  # extend by three
    (_ids([1, 2, 3, 4, 50, 51]), 1, 2),  # branch after 4 tokens
    (_ids([1, 2, 3, 4, 50, 51]), 1, 1),  # same input again: the last position is rerun
    # a prefix of what was seen: crop, rerun the kept positions
    (
        _ids([1, 2, 3]),
        2,
        2,
    ),
    (_ids([1, 2, 3, 60, 61, 62]), 6, 6),  # all logits requested: nothing reusable
    (_ids([9, 2, 3, 60]), 1, 4),  # differs at position 0
    (_ids([9, 2, 3, 60], [9, 2, 3, 61]), 1, 4),  # batch size changed: start over
    (_ids([9, 2, 3, 60, 5], [9, 2, 3, 61, 5]), 1, 1),
]


def test_outputs_equal_uncached_and_only_the_suffix_runs(qwen2) -> None:
    cached = CachedForward(TransformersIncremental(qwen2))
    for ids, keep, expected_run in CALLS:
        before = cached.tokens_run
        got = cached(ids, logits_to_keep=keep)
        torch.testing.assert_close(got, _full(qwen2, ids)[:, -keep:], atol=1e-5, rtol=1e-5)
        assert cached.tokens_run - before == expected_run, ids.tolist()


def test_left_padded_batch_equals_uncached(qwen2) -> None:
    cached = CachedForward(TransformersIncremental(qwen2))
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10]], 0)
    for step in range(3):
        got = cached(ids, attention_mask=mask, logits_to_keep=1)
        torch.testing.assert_close(got, _full(qwen2, ids, mask)[:, -1:], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, torch.tensor([[20 + step], [30 + step]])], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert cached.tokens_run == 4 + 1 + 1
    # the same ids with a different padding layout are a different sequence: no reuse
    cached(ids, logits_to_keep=1)
    assert cached.tokens_run == 6 + ids.shape[1]


def test_generation_with_the_cache_equals_without(qwen2) -> None:
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    cached = CachedForward(TransformersIncremental(qwen2))
    with_cache = sample(cached, prompt, 20, temperature=0)
    without = sample(lambda ids: qwen2(ids).logits, prompt, 20, temperature=0)
    assert with_cache.tolist() == without.tolist()
    # O(n): one position per step after the prompt
    assert cached.tokens_run == prompt.shape[1] + 20 - 1


def test_scoring_reuses_the_prompt(qwen2) -> None:
    prompt = list(range(1, 31))
    conts = [[40, 41, 42], [50], [60, 61], [40, 70]]
    cached = CachedForward(TransformersIncremental(qwen2))
    got = score(cached, prompt, conts)
    # first call: prompt + cont[:-1]; later calls rerun the prompt's last position plus cont[:-1]
    assert cached.tokens_run == len(prompt) - 1 + sum(len(c) for c in conts)
    uncached = score(lambda ids: qwen2(ids).logits, prompt, conts)
    for a, b in zip(got, uncached, strict=True):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=1e-5)


class Recorder:
    """A toy IncrementalModel: logits are a function of (position, id), so correctness is easy to see."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.length = 0
        self.calls: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def forward_incremental(self, input_ids, past_length, attention_mask, logits_to_keep):
        assert past_length == self.length
        self.calls.append(("run", input_ids.shape[1]))
        if self.fail_on is not None and self.fail_on in input_ids:
            raise RuntimeError("boom")
        self.length += input_ids.shape[1]
        positions = torch.arange(past_length, self.length)
        # (B, T_new, 8)
        logits = torch.nn.functional.one_hot(input_ids % 8, 8).float() + positions[:, None]
        return logits[:, -logits_to_keep:]

    def crop(self, length: int) -> None:
        self.calls.append(("crop", length))
        self.length = min(self.length, length)


def test_protocol_calls_and_reset_on_error() -> None:
    model = Recorder(fail_on=99)
    assert isinstance(model, IncrementalModel)
    cached = CachedForward(model)
    cached(_ids([1, 2, 3]))
    cached(_ids([1, 2, 5, 6]), logits_to_keep=2)
    assert model.calls == [("crop", 0), ("run", 3), ("crop", 2), ("run", 2)]
    with pytest.raises(RuntimeError, match="boom"):
        cached(_ids([1, 2, 5, 6, 99]))
    # a half-updated cache is never reused
    assert cached.cached_length == 0 and model.length == 0
    out = cached(_ids([1, 2]), logits_to_keep=2)
    torch.testing.assert_close(
        out,
        torch.nn.functional.one_hot(torch.tensor([[1, 2]]), 8).float() + torch.tensor([[[0.0], [1.0]]]),
    )


def test_rejects_objects_without_the_protocol() -> None:
    with pytest.raises(
        TypeError,
        match=r"model must implement forward_incremental\(\.\.\.\) and crop\(length\)",
    ):
        CachedForward(object())  # type: ignore[arg-type]


def test_grad_mode_switch_restarts_the_cache(qwen2) -> None:
    """No-grad calls run in inference mode; a cache made there is never reused with autograd on."""
    cached = CachedForward(TransformersIncremental(qwen2))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        cached(ids)
    longer = torch.cat([ids, torch.tensor([[6]])], 1)
    logits = cached(longer, logits_to_keep=2)  # autograd on: recomputed from scratch
    assert cached.tokens_run == 5 + 6
    logits.sum().backward()  # works: nothing from inference mode was saved for backward
    assert qwen2.lm_head.weight.grad is not None
    qwen2.zero_grad(set_to_none=True)
    with torch.no_grad():
        again = cached(torch.cat([longer, torch.tensor([[7]])], 1))
    assert cached.tokens_run == 11 + 7
    assert not again.is_inference()  # callers never receive inference tensors


def test_transformers_incremental_uses_the_current_cache_argument(qwen2, monkeypatch) -> None:
    """transformers 5 renamed `past_key_values` to `cache` (argument and output): no deprecation path is hit,
    and the logits still equal the uncached model's."""
    import warnings

    from transformers.utils import generic

    def refuse(message: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"deprecated transformers API used: {message}")

    monkeypatch.setattr(generic.logger, "warning_once", refuse)  # the output's `past_key_values` alias
    cached = CachedForward(TransformersIncremental(qwen2))
    ids = _ids([1, 2, 3, 4, 5, 6, 7])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)  # the `past_key_values=` argument's deprecation
        got = [cached(ids[:, :5], logits_to_keep=5), cached(ids, logits_to_keep=2)]
    want = _full(qwen2, ids)
    torch.testing.assert_close(got[0], want[:, :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[:, 5:], atol=1e-4, rtol=1e-4)
