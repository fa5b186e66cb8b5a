"""sft(): one step's update equals full-graph autograd of the mean over the accumulated batch; clipping; eval; errors."""

import pytest
import torch
from sft_helpers import examples, full_graph_loss_sum, lora_part

from llm_sft import (
    DataWarning,
    SFTDataset,
    batch_indices,
    collate,
    evaluate,
    sft,
    steps_per_epoch,
    warmup_cosine,
)


def _dataset(n=6, seed=2):
    lengths = [5 + (7 * i) % 9 for i in range(n)]  # 5..13 tokens: batches need padding
    return SFTDataset(examples(lengths, prompt=3, seed=seed), pad_id=0)


def _snapshot(part):
    return {n: p.detach().clone() for n, p in part.named_parameters() if p.requires_grad}


def test_step_update_is_the_gradient_of_the_mean_over_the_accumulated_batch(sep):
    path, _ = sep("qwen2")
    ds = _dataset()
    part, ref = lora_part(path), lora_part(path)
    before = _snapshot(part)
    opt = torch.optim.SGD([p for p in part.parameters() if p.requires_grad], lr=1.0)  # update = -grad
    after = {}
    log = sft(
        part,
        ds,
        opt,
        batch_size=2,
        epochs=1,
        grad_accum_steps=2,
        seed=5,
        progress=False,
        callback=lambda info: after.setdefault(info.step, _snapshot(part)),
    )
    assert len(log) == steps_per_epoch(6, 2, 2) == 2
    first_group = batch_indices(ds.lengths, 2, seed=5, epoch=0)[:2]  # the two micro-batches of step 1
    micro = [collate([ds[i] for i in b], 0) for b in first_group]
    total = sum(mb.n_targets for mb in micro)
    loss = sum(full_graph_loss_sum(ref, mb) for mb in micro) / total  # mean over the targets of both
    loss.backward()
    assert log[0].loss == pytest.approx(float(loss.detach()), rel=1e-6) and log[0].targets == total

    for (
        name,
        p,
    ) in ref.named_parameters():  # SGD with lr 1: the first update is minus the gradient
        if p.requires_grad:
            torch.testing.assert_close(before[name] - after[1][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_clipping_after_accumulation(sep):
    path, _ = sep("qwen2")
    part = lora_part(path)
    before = _snapshot(part)
    opt = torch.optim.SGD([p for p in part.parameters() if p.requires_grad], lr=1.0)
    after = {}
    sft(
        part,
        _dataset(),
        opt,
        batch_size=2,
        epochs=1,
        grad_accum_steps=2,
        max_grad_norm=1e-3,
        progress=False,
        callback=lambda info: after.setdefault("p", _snapshot(part)),
    )
    update = torch.cat([(before[n] - after["p"][n]).flatten() for n in before])
    assert float(update.norm()) == pytest.approx(1e-3, rel=1e-4)  # the global norm, clipped once


def test_eval_loss_scheduler_and_log(sep):
    path, _ = sep("qwen2")
    part = lora_part(path)
    opt = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=1e-2)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    train, val = _dataset(8), _dataset(3, seed=9)
    log = sft(
        part,
        train,
        opt,
        batch_size=2,
        epochs=2,
        grad_accum_steps=2,
        lr_scheduler=sched,
        eval_dataset=val,
        progress=False,
    )
    assert [h.step for h in log] == [1, 2, 3, 4] and [h.epoch for h in log] == [
        0,
        0,
        1,
        1,
    ]
    assert [h.lr for h in log] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (1 + 0.5**0.5))], rel=1e-6)
    assert [h.eval_loss is not None for h in log] == [
        False,
        True,
        False,
        True,
    ]  # end of each epoch
    assert log[-1].eval_loss == pytest.approx(evaluate(part, val, batch_size=3), rel=1e-6)
    assert log[-1].loss < log[0].loss
    assert all(h.tokens > h.targets > 0 and h.tokens_per_s > 0 for h in log)
    assert part.training


def test_bad_settings(sep):
    path, _ = sep("qwen2")
    part = lora_part(path)
    lora = [p for p in part.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        sft(part, _dataset(), torch.optim.SGD(lora, lr=0.1), batch_size=0, epochs=1)
    with pytest.raises(ValueError, match="the optimizer holds 1 parameters that are not trainable"):
        sft(
            part,
            _dataset(),
            torch.optim.SGD([*lora, part.model.norm.weight], lr=0.1),
            batch_size=2,
            epochs=1,
        )
    with pytest.raises(
        ValueError,
        match=r"2 trainable parameters are not in the optimizer, e.g. model.layers.0.self_attn.q_proj.lora_A.weight",
    ):
        sft(part, _dataset(), torch.optim.SGD(lora[2:], lr=0.1), batch_size=2, epochs=1)
    with pytest.warns(
        DataWarning,
        match=r"the dataset has 3 examples, fewer than one batch \(batch_size=4 x 1 rank\(s\)\): every step trains on 3",
    ):
        log = sft(
            part,
            _dataset(3),
            torch.optim.SGD(lora, lr=0.1),
            batch_size=4,
            epochs=1,
            progress=False,
        )
    assert len(log) == 1


def test_resume_with_other_settings_is_refused(sep, tmp_path):
    path, _ = sep("qwen2")
    part = lora_part(path)
    lora = [p for p in part.parameters() if p.requires_grad]
    sft(
        part,
        _dataset(),
        torch.optim.AdamW(lora),
        batch_size=2,
        epochs=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"was written with other settings \(batch_size: 2 -> 3\)"):
        sft(
            part,
            _dataset(),
            torch.optim.AdamW(lora),
            batch_size=3,
            epochs=1,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert (
        len(
            sft(
                part,
                _dataset(),
                torch.optim.AdamW(lora),
                batch_size=2,
                epochs=1,
                checkpoint_dir=tmp_path,
                progress=False,
            )
        )
        == 3
    )  # done already
    with pytest.warns(UserWarning, match=r"resume=False: removed 1 checkpoint\(s\) of an earlier run"):
        log = sft(
            part,
            _dataset(),
            torch.optim.AdamW(lora),
            batch_size=3,
            epochs=1,
            checkpoint_dir=tmp_path,
            resume=False,
            progress=False,
        )
    assert len(log) == 2 and [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_resume_with_other_examples_lora_or_caller_settings_is_refused(sep, tmp_path):
    """Another dataset (template, max_seq_len, ...) or other LoRA settings used to continue silently."""
    path, _ = sep("qwen2")

    def run(dataset=None, alpha=8, r=4, **kw):
        part = lora_part(path, alpha=alpha, r=r)
        opt = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad])
        ds = dataset or _dataset()
        return sft(part, ds, opt, batch_size=2, epochs=1, checkpoint_dir=tmp_path, progress=False, **kw)

    assert len(run(resume_settings={"--template": "auto", "--max-seq-len": 64})) == 3
    with pytest.raises(ValueError, match=r"other settings \(examples_sha256: [0-9a-f]{16} -> [0-9a-f]{16}\)"):
        run(_dataset(seed=5), resume_settings={"--template": "auto", "--max-seq-len": 64})  # same size, other tokens
    lora = r"lora \(r, lora_alpha, use_rslora, lora_dropout\): \[\[4, 8, False, 0.0\]\] -> \[\[4, 2, False, 0.0\]\]"
    with pytest.raises(ValueError, match=lora):
        run(alpha=2, resume_settings={"--template": "auto", "--max-seq-len": 64})
    with pytest.raises(ValueError, match=r"lora .*\[\[4, 8, False, 0.0\]\] -> \[\[2, 8, False, 0.0\]\]"):
        run(r=2, resume_settings={"--template": "auto", "--max-seq-len": 64})  # not a torch shape error
    with pytest.raises(ValueError, match=r"other settings \(--template: auto -> alpaca, --max-seq-len: 64 -> 32\)"):
        run(resume_settings={"--template": "alpaca", "--max-seq-len": 32})
    with pytest.raises(ValueError, match=r"resume_settings must not use sft's own keys \['seed'\]"):
        run(resume_settings={"seed": 1})
    assert len(run(resume_settings={"--template": "auto", "--max-seq-len": 64})) == 3  # the same: resumes (done)
