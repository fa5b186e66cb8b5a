"""A 2- and a 3-stage pipeline (separate processes, gloo on localhost) equal the single-process model.

Each pipeline is launched once per module; rank 0 saves what it computed and the tests compare it
with the whole model in this process and with transformers' generate.
"""

import pytest
import torch

from llm_lazy_qwen import IncrementalPart, load_part
from llm_sampler import CachedForward, sample, score

FP32 = {"atol": 1e-5, "rtol": 1e-5}

PIPELINES = {
    # 2 stages, automatic split by bytes, tied head on the stage without the embedding
    "2-stage": ("qwen2_tied", 2, "auto", []),
    # 3 stages streamed from disk, sliding-window layers (ring caches) in the middle and last stage
    "3-stage": ("qwen2_swa", 3, "b 0-1,1-3,3-4 e", ["--lazy"]),
}


@pytest.fixture(scope="module", params=list(PIPELINES))
def run(request, sep, launch, tmp_path_factory):
    name, world, parts, extra = PIPELINES[request.param]
    path, ckpt = sep(name)
    out = tmp_path_factory.mktemp("pipe") / "result.pt"
    ranks = launch(world, ["equivalence", str(path), parts, str(out), *extra])
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return torch.load(out), path, ckpt


def reference_sample(path, ids, mask, **kw):
    with torch.no_grad():
        return sample(
            CachedForward(IncrementalPart(load_part(path))),
            ids,
            10,
            attention_mask=mask,
            **kw,
        )


def test_logits_equal_single_process(run):
    res, path, ckpt = run
    with torch.no_grad():
        want = load_part(path)(res["ids"], attention_mask=res["mask"])
        hf = ckpt.model(res["ids"], attention_mask=res["mask"]).logits
    torch.testing.assert_close(res["logits_m1"], want, **FP32)
    real = res["mask"].bool()  # transformers' logits at padding positions are not comparable
    torch.testing.assert_close(res["logits_m1"][real], hf[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [2, 5])
def test_micro_batched_equals_unbatched(run, m):
    res, _, _ = run
    torch.testing.assert_close(res[f"logits_m{m}"], res["logits_m1"], **FP32)
    assert torch.equal(res[f"greedy_m{m}"], res["greedy_m1"])


def test_greedy_equals_single_process_and_transformers(run):
    res, path, ckpt = run
    ids, mask = res["ids"], res["mask"]
    assert torch.equal(res["greedy_m1"], reference_sample(path, ids, mask, temperature=0))
    hf = ckpt.model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    assert torch.equal(res["greedy_m1"], hf[:, ids.shape[1] :])


def test_sampling_equals_single_process(run):
    res, path, _ = run
    want = reference_sample(
        path,
        res["ids"],
        res["mask"],
        temperature=1.0,
        top_p=0.9,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(res["sampled"], want)


def test_scores_after_crops_equal_single_process(run):
    """score() crops every stage's caches back to the prompt (rings: rebuilt by a replay)."""
    res, path, _ = run
    conts = [list(range(10, 30)), [7, 8], list(range(40, 60))]
    with torch.no_grad():
        want = score(
            CachedForward(IncrementalPart(load_part(path))),
            res["ids"][0].tolist(),
            conts,
        )
    for got, w in zip(res["scores"], want):
        torch.testing.assert_close(got, w.token_logprobs, **FP32)


def test_stage_errors_are_raised_on_rank0_and_the_pipeline_survives(run):
    res, _, _ = run
    assert "token ids must be in [0, vocab_size=384)" in res["own_error"]
    assert "rank 1 (stage 1 of" in res["stage_error"] and "ValueError: injected failure" in res["stage_error"]
    torch.testing.assert_close(res["after_errors"], res["logits_m1"], **FP32)
