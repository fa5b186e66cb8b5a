"""Attention masks of any dtype and shape, and many micro-batches in flight, on a 2- or 3-process pipeline."""

import torch

from llm_lazy_qwen import IncrementalPart, load_part
from llm_sampler import CachedForward, sample

FP32 = {"atol": 1e-5, "rtol": 1e-5}


def test_masks_of_any_dtype_equal_one_process(sep, launch, tmp_path):
    """bool/int32/uint8/float masks used to be sent as raw bytes and read as int64 by the next stage."""
    path, _ = sep("qwen2")
    out = tmp_path / "masks.pt"
    for r in launch(2, ["masks", str(path), "auto", str(out), "--timeout", "10"]):
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    res = torch.load(out)
    ids, mask = res["ids"], res["mask"]
    part = load_part(path)
    with torch.no_grad():
        want = part(ids, attention_mask=mask)
        greedy = sample(CachedForward(IncrementalPart(part)), ids, 4, attention_mask=mask, temperature=0)
        longer = part(ids[:, 3:], attention_mask=mask[:, 3:])
        row = part(ids[1:2], attention_mask=mask[1:2])
    for dtype in ("bool", "int32", "int64", "float32", "float64", "uint8"):
        torch.testing.assert_close(res[f"torch.{dtype}"], want, **FP32)
        assert torch.equal(res[f"greedy torch.{dtype}"], greedy), dtype
    torch.testing.assert_close(res["longer"], longer, **FP32)
    torch.testing.assert_close(res["row"], row, **FP32)
    shape, rows, values, rank3 = res["errors"]
    assert "attention_mask has shape (5, 4) but input_ids (5, 9)" in shape
    assert "attention_mask has shape (3, 9) but input_ids (5, 9)" in rows
    assert "attention_mask must hold only 0 (padding) and 1 (token)" in values
    assert "attention_mask has shape (5, 9, 1)" in rank3
    torch.testing.assert_close(res["after"], want, **FP32)


def test_96_micro_batches_do_not_deadlock(sep, launch, tmp_path):
    """B = M = 96: every micro-batch used to be sent before any result was read, and both ranks blocked
    on full send queues until the timeout. The in-flight window keeps the queues short."""
    path, _ = sep("qwen2")
    out = tmp_path / "many.pt"
    for r in launch(2, ["many", str(path), "auto", str(out), "--timeout", "5", "--victim", "-1"], wait=40):
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    res = torch.load(out)
    part = load_part(path)
    with torch.no_grad():
        want = part(res["ids"])
        greedy = sample(CachedForward(IncrementalPart(part)), res["ids"], 3, temperature=0)
    torch.testing.assert_close(res["logits"], want, **FP32)
    assert torch.equal(res["greedy"], greedy)


def test_a_rank_frozen_among_96_micro_batches_is_named(sep, launch, tmp_path):
    """Rank 1 of 3 freezes in the middle of a 96 micro-batch forward: the others name it, not each other."""
    path, _ = sep("qwen2")
    args = ["many", str(path), "auto", str(tmp_path / "x.pt"), "--timeout", "3", "--victim", "1"]
    ranks = launch(3, args, stuck={1}, wait=40)
    for r in (ranks[0], ranks[2]):
        assert r.returncode == 3, r.stderr[-2000:]
        assert r.error["type"] == "PipelineError"
    errors = [ranks[0].error["error"], ranks[2].error["error"]]
    # rank 2 waits on rank 1 and names it; rank 0 names rank 1 or "rank 2 (or one before it)" (it cannot see
    # past rank 2 once rank 2 gave up); nobody blames rank 0, which only drove the pipeline
    assert "rank 1 (or one before it) hangs" in errors[1], errors
    assert not any("rank 0 (or one before it)" in e or "rank 0 closed" in e or "took none" in e for e in errors)
