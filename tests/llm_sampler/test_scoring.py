"""Scores equal a direct log-softmax computation; padding is never scored; multiple choice picks the best."""

from __future__ import annotations

import pytest
import torch

from llm_sampler import CachedForward, TransformersIncremental, multiple_choice, score

PROMPT = [11, 12, 13, 14, 15]
CONTINUATIONS = [[7], [8, 9], [20, 21, 22, 23], [8, 30, 31]]


def _direct(model, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """The definition: log_softmax over the full sequence's logits, logp[t - 1, x_t] for continuation tokens."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)  # (T, V)
    return torch.stack([logp[len(prompt) + j - 1, tok] for j, tok in enumerate(cont)])


@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("cached", [False, True])
def test_scores_equal_direct_log_softmax(qwen2, batch_size: int, cached: bool) -> None:
    forward = CachedForward(TransformersIncremental(qwen2)) if cached else (lambda ids: qwen2(ids).logits)
    scores = score(forward, PROMPT, CONTINUATIONS, batch_size=batch_size)
    for cont, got in zip(CONTINUATIONS, scores, strict=True):
        expected = _direct(qwen2, PROMPT, cont)
        torch.testing.assert_close(got.token_logprobs, expected, atol=1e-5, rtol=1e-5)
        assert got.logprob == pytest.approx(float(expected.sum()), abs=1e-4)
        assert got.mean_logprob == pytest.approx(float(expected.mean()), abs=1e-4)


def test_is_greedy_marks_the_greedy_continuation(qwen2) -> None:
    ids = torch.tensor([PROMPT])
    greedy = []
    for _ in range(3):
        with torch.no_grad():
            nxt = int(qwen2(ids).logits[0, -1].argmax())
        greedy.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    other = [*greedy[:2], (greedy[2] + 1) % 100]
    got = score(lambda x: qwen2(x).logits, PROMPT, [greedy, other])
    assert [s.is_greedy for s in got] == [True, False]


def test_padding_and_batch_neighbours_never_change_a_score() -> None:
    """A scripted model whose logits depend on every id it sees: right padding would show up if it were read."""
    vocab = 10

    def forward(ids: torch.Tensor) -> torch.Tensor:
        # position t's logits depend on the prefix sum: any id at or before t changes them
        prefix = ids.cumsum(-1).float()  # (B, T)
        # (B, T, V)
        return torch.sin(prefix[..., None] * torch.arange(1, vocab + 1).float())

    alone = score(forward, [1, 2], [[3, 4, 5]])[0]
    batched = score(forward, [1, 2], [[9], [3, 4, 5], [6, 6, 6, 6, 6, 6]], batch_size=3)[1]
    assert torch.equal(alone.token_logprobs, batched.token_logprobs)
    assert alone.token_logprobs.shape == (3,)


def test_forward_returning_only_the_last_positions_is_enough() -> None:
    def forward(ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        # predicts "same id again"
        full = torch.nn.functional.one_hot(ids % 4, 4).float()
        return full[:, -logits_to_keep:]

    got = score(forward, [1, 2], [[2, 2], [3]])
    assert got[0].is_greedy and not got[1].is_greedy
    assert got[0].logprob == pytest.approx(2 * float(torch.tensor([1.0, 0, 0, 0]).log_softmax(0)[0]))


def test_multiple_choice_sum_versus_length_normalised() -> None:
    # Logits fixed per position: option 0 is one good token, option 1 is three tokens each a little less likely.
    table = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return table.expand(ids.shape[0], ids.shape[1], 4)

    plain = multiple_choice(forward, [0], [[2], [1, 1, 1]])
    normalised = multiple_choice(forward, [0], [[2], [1, 1, 1]], length_normalized=True)
    assert plain.best == 0  # sums: log .05 = -3.00 beats 3 log .3 = -3.61
    assert normalised.best == 1  # means: -3.00 loses to log .3 = -1.20
    assert plain.values == pytest.approx([-2.9957, -3.6119], abs=1e-4)


def test_multiple_choice_ties_go_to_the_first() -> None:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], ids.shape[1], 4)

    choice = multiple_choice(forward, [0], [[1], [2], [3]])
    assert choice.best == 0
    assert choice.values == pytest.approx([-1.3862944] * 3)
