"""Shared by llm_lazy_qwen's tests: the fp32 tolerance against transformers, seeded token ids, greedy decoding."""

from __future__ import annotations

import torch

from llm_lazy_qwen import QwenPart

FP32 = {"atol": 1e-4, "rtol": 1e-4}


def token_ids(batch: int = 2, seq: int = 13, seed: int = 0) -> torch.Tensor:
    """(batch, seq) ids inside the test models' 384-token vocabulary, the same for the same seed."""
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode(part: QwenPart, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``ids`` (B, T), then ``steps`` greedy tokens on a cache of its own: the logits of every call,
    concatenated (B, T + steps, vocab)."""
    cache = part.new_cache()
    logits = [part(ids, cache=cache)]
    for _ in range(steps):
        logits.append(part(logits[-1][:, -1:].argmax(-1), cache=cache))
    return torch.cat(logits, dim=1)


def sweep_plans(items, runtime, slots: int, budgets) -> list:
    """plan_memory over rising `budgets` from the minimum: each plan within its budget, covering every
    item, reading no more than the one before; one byte under the minimum is refused."""
    import pytest

    from llm_lazy_qwen import plan_memory

    minimum = plan_memory(10**15, items, runtime, slots=slots).minimum
    plans, previous = [], None
    for budget in budgets(minimum):
        plan = plan_memory(int(budget), items, runtime, slots=slots)
        assert plan.peak <= plan.budget and plan.minimum == minimum
        assert set(plan.resident) | set(plan.streamed) == {s.item for s in items}
        if previous is not None:
            assert plan.read_per_token <= previous
        previous = plan.read_per_token
        plans.append(plan)
    with pytest.raises(ValueError, match="too small"):
        plan_memory(minimum - 1, items, runtime, slots=slots)
    return plans


def check_layerwise_backward(part: QwenPart, ram: QwenPart, step, layer_input, rounds: int = 2) -> None:
    """A layer-wise backward (each layer from the top, its input's gradient through autograd) gives the
    same outputs and input gradients on `part` as on `ram` (fp32); `layer_input(i)` is layer i's input."""
    for _ in range(rounds):
        for i in reversed(part.layer_ids):
            results = []
            for model in (part, ram):
                x = layer_input(i).clone().requires_grad_(True)
                with model.materialized(i) as layer:
                    out = layer(x, step.cos, step.sin, step.start, None, step.key_mask)
                    (grad,) = torch.autograd.grad(out.square().sum(), x)
                results.append((out.detach(), grad))
            torch.testing.assert_close(results[0], results[1], **FP32)
