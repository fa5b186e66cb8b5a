"""Without torchrun the pipeline is one local stage: same API, micro-batches still split the rows."""

import pytest
import torch

from llm_lazy_qwen import IncrementalPart, load_part
from llm_pipeline import Pipeline, generate, generate_stream, load_stage
from llm_sampler import CachedForward, pad_left, sample

FP32 = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture
def local(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_logits_and_generation_equal_the_model(sep, local):
    path, _ = sep("qwen2")
    ids = torch.randint(0, 384, (3, 6), generator=torch.Generator().manual_seed(1))
    stage = load_stage(path)
    with torch.no_grad():
        want = load_part(path)(ids)
        want_new = sample(CachedForward(IncrementalPart(load_part(path))), ids, 6, temperature=0)
    with Pipeline(stage, micro_batches=2) as pipe:
        torch.testing.assert_close(pipe(ids), want, **FP32)
        torch.testing.assert_close(pipe(ids, logits_to_keep=2), want[:, -2:], **FP32)
        assert torch.equal(generate(pipe, ids, 6, temperature=0), want_new)
        with pytest.raises(ValueError, match="rank 0 drives the pipeline"):
            stage.serve()
    stage.close()


def test_micro_batches_changed_mid_generation_keep_the_cached_split(sep, local):
    path, _ = sep("qwen2")
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_token_id=0)
    pipe = Pipeline(load_stage(path), micro_batches=3)
    with torch.inference_mode():
        full = IncrementalPart(load_part(path))
        want = full.forward_incremental(ids, 0, mask, 1)
        got = pipe.forward_incremental(ids, 0, mask, 1)
        torch.testing.assert_close(got, want, **FP32)
        pipe.micro_batches = 2  # takes effect at the next crop(0)
        nxt = torch.tensor([[1], [2], [3]])
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        torch.testing.assert_close(
            pipe.forward_incremental(nxt, 4, mask, 1),
            full.forward_incremental(nxt, 4, mask, 1),
            **FP32,
        )
        with pytest.raises(
            ValueError,
            match="the caches hold 3 rows, got 2; crop\\(0\\) to start a new batch",
        ):
            pipe.forward_incremental(nxt[:2], 5, None, 1)
        with pytest.raises(ValueError, match="past_length=3 but the caches hold 5 positions"):
            pipe.forward_incremental(nxt, 3, None, 1)
    pipe.close()


def test_a_failed_step_is_replayed_not_half_cached(sep, local):
    """Rows 0-1 run before row 2 fails (3 micro-batches): the next call rebuilds the caches first."""
    path, _ = sep("qwen2")
    ids = torch.randint(1, 384, (3, 5), generator=torch.Generator().manual_seed(2))
    pipe = Pipeline(load_stage(path), micro_batches=3)
    full = IncrementalPart(load_part(path))
    with torch.inference_mode():
        pipe.forward_incremental(ids, 0, None, 1)
        full.forward_incremental(ids, 0, None, 1)
        with pytest.raises(ValueError, match="token ids must be in"):
            pipe.forward_incremental(torch.tensor([[1], [2], [999]]), 5, None, 1)
        nxt = torch.tensor([[1], [2], [3]])
        want = full.forward_incremental(nxt, 5, None, 1)
        torch.testing.assert_close(pipe.forward_incremental(nxt, 5, None, 1), want, **FP32)
    pipe.close()


def test_bad_stage_specs_fail_before_loading(sep, local):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match=r"only works as the single stage"):
        load_stage(path, "b 0-1,f")
    with pytest.raises(ValueError, match=r"2 stage specs .* for 1 ranks"):
        load_stage(path, "b 0-1,1-3 e")
    with pytest.raises(ValueError, match=r"Pipeline runs on rank 0"):
        stage = load_stage(path)
        stage.rank = 1
        Pipeline(stage)


def test_generation_stops_on_a_multi_token_sequence(sep, local):
    """stop_tokens=[[a, b]] (or a 2-D tensor) stops a row after a then b, like llm_sampler on one process."""
    path, _ = sep("qwen2")
    ids = torch.randint(1, 384, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        free = sample(CachedForward(IncrementalPart(load_part(path))), ids, 12, temperature=0).tolist()
    pair = [111, 50]  # this tiny model: row 0 gives 111 50 .., row 1 only 50s, row 2 111 111 50 ..
    ends = [next((i + 2 for i in range(11) if row[i : i + 2] == pair), 12) for row in free]
    assert ends == [2, 12, 3], free  # rows stop at different steps; one never does
    want = torch.tensor([row[:end] + [0] * (12 - end) for row, end in zip(free, ends)])
    with Pipeline(load_stage(path), micro_batches=2) as pipe:
        got = generate(pipe, ids, 12, temperature=0, stop_tokens=[pair], pad_token_id=0)
        assert torch.equal(got, want)
        pipe.crop(0)
        steps = generate_stream(pipe, ids, 12, temperature=0, stop_tokens=torch.tensor([pair]), pad_token_id=0)
        assert torch.equal(torch.stack(list(steps), dim=1), want)
