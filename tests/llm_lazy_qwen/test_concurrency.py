"""Several threads calling one part at once get what the same calls give one after the other.

A lazy part swaps each layer's streamed weights into its (shared) modules for the duration of the
layer, so calls on it are serialised; an in-RAM part shares nothing that a call changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from lazy_helpers import FP32, decode, token_ids

from llm_lazy_qwen import QwenPart, load_part

THREADS, ROUNDS = 3, 2
STEPS = 3  # greedy tokens after the prefill


def by_layer(part: QwenPart, ids: torch.Tensor) -> torch.Tensor:
    """The same forward driven one layer at a time, as llm_sft's engine and llm_pipeline's stages do."""
    h, step = part.prepare(ids)
    for i in part.layer_ids:
        h = part.run_layer(i, h, step)
    return part.finish(h, step)


def in_threads(work: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """`work(k)` for k < THREADS, each in its own thread, all started together, ROUNDS times each."""
    results: list[list[torch.Tensor]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def run(k: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(ROUNDS):
                    results[k].append(work(k))
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for per_thread in results for r in per_thread]


MODES = {
    "ram": {"lazy": False},
    "mmap": {"lazy": True, "stream_mode": "mmap"},
    "copy": {"lazy": True, "stream_mode": "copy"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_concurrent_calls_equal_sequential(sep, mode):
    path, _ = sep("qwen2_swa")
    part = load_part(path, **MODES[mode])
    inputs = [token_ids(1 + k % 2, 5 + k, seed=20 + k) for k in range(THREADS)]
    with torch.no_grad():
        want = [decode(part, inputs[k], STEPS) for k in range(THREADS) for _ in range(ROUNDS)]
    got = in_threads(lambda k: decode(part, inputs[k], STEPS))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)
    part.close()


@pytest.mark.parametrize("mode", ["mmap", "copy"])
def test_concurrent_forward_and_layer_by_layer(sep, mode):
    """Threads mixing forward() with prepare/run_layer/finish (engines) and materialized()."""
    path, ckpt = sep("qwen3")
    part = load_part(path, **MODES[mode])
    inputs = [token_ids(2, 6 + k, seed=30 + k) for k in range(THREADS)]
    with torch.no_grad():
        want = [ckpt.model(inputs[k]).logits for k in range(THREADS) for _ in range(ROUNDS)]
    got = in_threads(lambda k: by_layer(part, inputs[k]) if k % 2 else part(inputs[k]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)

    # a layer held by one thread is not swapped out under it by another thread's call
    layer_ids = part.layer_ids
    with torch.no_grad(), part.materialized(layer_ids[0]) as layer:
        weight = layer.self_attn.q_proj.weight
        other = threading.Thread(target=lambda: part(inputs[0]))
        other.start()
        other.join(timeout=0.5)
        assert layer.self_attn.q_proj.weight is weight
    other.join()
    part.close()


def test_nested_materialized_in_one_thread(sep):
    """The part's own methods nest (forward -> run_layer -> materialized): the lock is re-entrant, and a
    layer held around a call keeps its weights through it."""
    path, ckpt = sep("qwen2")
    part = load_part(path, lazy=True)
    ids = token_ids(1, 4, seed=40)
    last = part.layer_ids[-1]
    with torch.no_grad():
        hidden = ckpt.model(ids, output_hidden_states=True).hidden_states
        with part.materialized(last) as layer:
            got = part(ids)  # same thread: no deadlock
            _, step = part.prepare(ids)
            out = layer(hidden[last], step.cos, step.sin, step.start, None, step.key_mask)
    torch.testing.assert_close(got, ckpt.model(ids).logits, **FP32)
    # transformers' last hidden state is after the final norm: compare through it
    torch.testing.assert_close(part.model.norm(out), hidden[-1], **FP32)
    part.close()
