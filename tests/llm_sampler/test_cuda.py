"""The same checks with the model on a GPU (skipped without CUDA): nothing silently moves to the CPU."""

from __future__ import annotations

import pytest
import torch

from llm_sampler import (
    CachedForward,
    TransformersIncremental,
    pad_left,
    sample,
    score,
    speculative_sample,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def gpu_model(qwen2):
    import copy

    return copy.deepcopy(qwen2).to("cuda")


def test_greedy_padded_batch_equals_generate_on_gpu(gpu_model) -> None:
    from transformers import GenerationConfig

    ids, mask = pad_left([[5, 6, 7, 8, 9], [12, 3]], 0)
    ids, mask = ids.cuda(), mask.cuda()
    config = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = gpu_model.generate(ids, attention_mask=mask, generation_config=config)[:, 5:]
    cached = CachedForward(TransformersIncremental(gpu_model))
    got = sample(cached, ids, 12, temperature=0, attention_mask=mask, stop_tokens=[99])
    assert got.device.type == "cuda"
    assert got.tolist() == expected.tolist()


def test_generator_on_gpu_is_reproducible(gpu_model) -> None:
    cached = CachedForward(TransformersIncremental(gpu_model))
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    runs = [sample(cached, ids, 10, top_p=0.9, generator=torch.Generator("cuda").manual_seed(3)) for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()


def test_scores_on_gpu_equal_cpu(qwen2, gpu_model) -> None:
    conts = [[7, 8], [9], [10, 11, 12]]
    gpu = score(
        CachedForward(TransformersIncremental(gpu_model)),
        torch.tensor([1, 2, 3]).cuda(),
        conts,
    )
    cpu = score(lambda ids: qwen2(ids).logits, [1, 2, 3], conts)
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.token_logprobs.cpu(), b.token_logprobs, atol=1e-4, rtol=1e-4)


def test_speculative_on_gpu(gpu_model) -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5]], device="cuda")
    target = CachedForward(TransformersIncremental(gpu_model))
    expected = sample(target, ids, 16, temperature=0)
    draft = CachedForward(TransformersIncremental(gpu_model))
    out = speculative_sample(target, draft, ids, 16, temperature=0)
    assert out.tokens.tolist() == expected.tolist()
    generator = torch.Generator("cuda").manual_seed(0)
    out = speculative_sample(target, draft, ids, 16, temperature=0.9, generator=generator)
    assert out.tokens.shape == (1, 16) and out.stats.acceptance_rate == 1.0
