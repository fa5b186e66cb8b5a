"""Shared pieces of llm_sft's tests: a LoRA-wrapped tiny part, random examples, the full-graph reference,
a short checkpointed training run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, lora_layers, mark_only_lora_trainable
from llm_sft import Batch, Example, SFTDataset, sft, warmup_cosine

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = {"atol": 2e-6, "rtol": 1e-5}


def lora_part(
    path,
    lazy=False,
    prefetch=0,
    stream_mode="copy",
    dropout=0.0,
    r=4,
    alpha=8,
    targets=ALL7,
    head_chunk_size=100,
    seed=0,
):
    """A whole-model part with LoRA on ``targets``, A and B random (B = 0 would hide errors in the B path)."""
    part = load_part(
        path,
        "f",
        lazy=lazy,
        prefetch=prefetch,
        stream_mode=stream_mode,
        head_chunk_size=head_chunk_size,
    )
    apply_lora(part, targets, r=r, lora_alpha=alpha, lora_dropout=dropout)
    randomize_adapters(part, seed)
    mark_only_lora_trainable(part)
    return part.train()


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora_layers(model).items()):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def examples(lengths=(9, 6, 12), prompt=3, seed=1, vocab=384) -> list[Example]:
    """Random token ids; the first ``prompt`` tokens of each are the prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and not p.is_meta and p.grad is not None
    }


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def full_graph_loss_sum(part, batch: Batch) -> torch.Tensor:
    """The reference: the part's ordinary forward (all logits, one autograd graph), summed CE over target tokens."""
    logits = part(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch.labels[:, 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )


def assert_grads_close(got: dict, want: dict, **tol) -> None:
    assert sorted(got) == sorted(want) and got, (sorted(got)[:3], sorted(want)[:3])
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **(tol or FP32), msg=name)


class StopTraining(Exception):
    """Raised after the step ``checkpointed_run(stop_at=...)`` names: the run is abandoned there."""


def checkpointed_run(path, checkpoint_dir, stop_at=None) -> tuple[dict[str, nn.Parameter], list[float]] | None:
    """3 AdamW steps (LoRA dropout 0.1, a warmup-cosine scheduler, 6 examples in batches of 2), a checkpoint
    after each in ``checkpoint_dir``, resuming from the latest one there. Returns the trained LoRA
    parameters and the loss of every step; None when ``stop_at`` abandoned the run after that step."""
    torch.manual_seed(0)
    part = lora_part(path, dropout=0.1)
    trainable = {n: p for n, p in part.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)

    def stop(info):
        if info.step == stop_at:
            raise StopTraining

    data = SFTDataset(examples([5 + (7 * i) % 9 for i in range(6)], prompt=3, seed=2), pad_id=0)
    try:
        log = sft(
            part,
            data,
            opt,
            batch_size=2,
            epochs=1,
            lr_scheduler=warmup_cosine(opt, 1, 3),
            checkpoint_dir=checkpoint_dir,
            save_every=1,
            callback=stop,
            progress=False,
        )
    except StopTraining:
        return None
    return trainable, [h.loss for h in log]
