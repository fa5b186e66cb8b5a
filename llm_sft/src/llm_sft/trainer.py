"""sft(): the training loop: accumulation, clipping, evaluation, atomic checkpoints, exact resume.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` examples on each rank.
The loss is the mean over the target tokens of the whole step (all micro-batches, all ranks): each
micro-batch's summed loss is divided by that total (transformers PR #34191's fix; a mean of
per-micro-batch means would weight short examples more). Gradients are clipped after
accumulation and the all-reduce, never inside backward.

The batch order is a function of ``(seed, epoch)`` and a checkpoint holds the parameters,
optimizer, scheduler, RNG states and the data position, so a run killed at any moment and resumed
ends with the same adapter as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_lazy_qwen import QwenPart
from llm_lora_mmap import lora_layers, save_adapter

from .batching import batch_indices, collate
from .checkpoint import (
    latest_checkpoint,
    remove_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from .data import DataWarning, Example
from .distributed import (
    all_gather_tensor,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_parameters,
    rank_and_world,
)
from .engine import LayerwiseEngine


@dataclass
class StepInfo:
    """What one optimizer step did; ``sft`` returns one per step (the loss log)."""

    step: int  # optimizer steps done, 1-based
    epoch: int  # 0-based
    loss: float  # mean over the step's target tokens (all micro-batches, all ranks)
    lr: float  # the learning rate this step used
    targets: int  # target tokens in the step (all ranks)
    tokens: int  # real tokens processed (all ranks)
    tokens_per_s: float
    elapsed_s: float  # since the start of training (resumed runs continue the count)
    eval_loss: float | None = None


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum_steps: int = 1, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (the last batch and the last accumulation group may be partial).

    Example::

        total = epochs * steps_per_epoch(len(ds), batch_size=4, grad_accum_steps=8)   # for a scheduler
    """
    batches = math.ceil(n_examples / (batch_size * world_size))
    return math.ceil(batches / grad_accum_steps)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_optimizer(optimizer: torch.optim.Optimizer, trainable: dict[str, torch.nn.Parameter]) -> None:
    names = {id(p): n for n, p in trainable.items()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [p for p in held if id(p) not in names]
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameters that are not trainable parameters of the model (frozen "
            "weights?); build it from mark_only_lora_trainable(model) or the engine's trainable_parameters()"
        )
    missing = sorted(set(names.values()) - {names[id(p)] for p in held})
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are not in the optimizer, e.g. {missing[0]}")


def _shard(indices: list[int], batch_size: int, rank: int) -> list[int]:
    """This rank's rows of a global batch (rank r takes rows r*b .. r*b + b - 1)."""
    return indices[rank * batch_size : (rank + 1) * batch_size]


def evaluate(model: QwenPart | LayerwiseEngine, dataset: Sequence[Example], batch_size: int = 8) -> float:
    """Mean loss over the target tokens of ``dataset`` (token-weighted; split over ranks when distributed).

    Example::

        val_loss = evaluate(part, val_ds, batch_size=8); ppl = math.exp(val_loss)
    """
    engine = model if isinstance(model, LayerwiseEngine) else LayerwiseEngine(model)
    rank, world = rank_and_world()
    pad_id = getattr(dataset, "pad_id", 0)
    was_training = engine.part.training
    engine.part.eval()
    loss_sum = targets = 0.0
    try:
        for b in batch_indices([len(e) for e in dataset], batch_size * world, shuffle=False):
            rows = _shard(b, batch_size, rank)
            if rows:
                out = engine.loss(collate([dataset[j] for j in rows], pad_id))
                loss_sum, targets = loss_sum + out.loss_sum, targets + out.n_targets
    finally:
        engine.part.train(was_training)
    loss_sum, targets = all_reduce_sum([loss_sum, targets])
    return loss_sum / max(targets, 1.0)


def examples_sha256(dataset: Sequence[Example]) -> str:
    """A hash of every example's token ids and labels: changes with the data, template, tokenizer or max_seq_len.

    Example::

        examples_sha256(prepare_dataset(tok, ["Hi"], ["Hello"]))[:16]
    """
    h = hashlib.sha256()
    for e in dataset:
        h.update(array("q", [len(e.input_ids), *e.input_ids, *e.labels]).tobytes())
    return h.hexdigest()


def _lora_settings(part: torch.nn.Module) -> list[list[Any]]:
    """The distinct (r, lora_alpha, use_rslora, lora_dropout) of the model's LoRA layers."""
    return sorted({(m.r, m.lora_alpha, m.use_rslora, m.lora_dropout_p) for m in lora_layers(part).values()})


def _rng_states(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "cpu": all_gather_tensor(torch.get_rng_state()),
        "cuda": all_gather_tensor(torch.cuda.get_rng_state(device).to(device)) if cuda else None,
    }


def sft(
    model: QwenPart | LayerwiseEngine,
    dataset: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    epochs: int,
    grad_accum_steps: int = 1,
    lr_scheduler: Any = None,
    eval_dataset: Sequence[Example] | None = None,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 100,
    resume: bool = True,
    max_grad_norm: float | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    *,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    keep_checkpoints: int = 1,
    resume_settings: dict[str, Any] | None = None,
) -> list[StepInfo]:
    """Supervised fine-tuning of a whole-model QwenPart with the layer-wise engine; returns the loss log.

    Args:
        model: a QwenPart (spec ``"f"``) whose trainable parameters are the ones to train
            (``mark_only_lora_trainable``), or a :class:`LayerwiseEngine`.
        dataset: examples from :func:`prepare_dataset` (its ``pad_id`` pads the batches).
        optimizer: over exactly the trainable parameters.
        batch_size: examples per micro-batch on each rank (global batch = batch_size x ranks).
        grad_accum_steps: micro-batches per optimizer step.
        lr_scheduler: stepped once per optimizer step (e.g. :func:`warmup_cosine`).
        eval_dataset: evaluated (token-weighted mean loss) every ``eval_every`` steps and at the
            end, or at the end of each epoch when ``eval_every`` is None.
        checkpoint_dir: where checkpoints go, every ``save_every`` steps and at the end. With
            ``resume``, training continues from the newest one there; a checkpoint written with
            other settings is refused, naming them: batch size, accumulation, ranks, seed, the
            examples (a hash of their token ids: data, template, max_seq_len, tokenizer), the LoRA
            settings, and ``resume_settings``.
        max_grad_norm: clip the global gradient norm after accumulation.
        callback: called with each step's :class:`StepInfo`.
        seed: the batch order is a function of (seed, epoch).
        resume_settings: more JSON values that must not change on resume (the CLI records its
            data files, template, max_seq_len, LoRA and optimiser flags).

    Example::

        part = load_part("qwen-sep", "f", lazy=True, prefetch=0)
        apply_lora(part, "all-linear", r=8, lora_alpha=16)
        opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
        log = sft(part, ds, opt, batch_size=4, epochs=1, checkpoint_dir="ckpt")
    """
    engine = model if isinstance(model, LayerwiseEngine) else LayerwiseEngine(model)
    part = engine.part
    for name, value in (
        ("batch_size", batch_size),
        ("epochs", epochs),
        ("grad_accum_steps", grad_accum_steps),
        ("save_every", save_every),
    ):
        _positive_int(name, value)
    if eval_every is not None:
        _positive_int("eval_every", eval_every)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    trainable = engine.trainable_parameters()
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters; apply_lora(...) and mark_only_lora_trainable(model) first"
        )
    _check_optimizer(optimizer, trainable)
    params = list(trainable.values())
    rank, world = rank_and_world()
    broadcast_parameters(params)
    n = len(dataset)
    if n < world:
        raise ValueError(f"the dataset has {n} examples, fewer than the {world} ranks: every rank needs at least one")
    if n < batch_size * world:
        warnings.warn(
            f"the dataset has {n} examples, fewer than one batch (batch_size={batch_size} x {world} rank(s)): "
            f"every step trains on {n} examples",
            DataWarning,
            stacklevel=2,
        )
    pad_id = getattr(dataset, "pad_id", 0)
    lengths = [len(e) for e in dataset]
    total = epochs * steps_per_epoch(n, batch_size, grad_accum_steps, world)
    settings = {
        "batch_size": batch_size,
        "grad_accum_steps": grad_accum_steps,
        "world_size": world,
        "seed": seed,
        "examples": n,
        "examples_sha256": examples_sha256(dataset)[:16],
        "lora (r, lora_alpha, use_rslora, lora_dropout)": _lora_settings(part),
    }
    clash = sorted(set(settings) & set(resume_settings or {}))
    if clash:
        raise ValueError(f"resume_settings must not use sft's own keys {clash}")
    settings = json.loads(json.dumps({**settings, **(resume_settings or {})}))  # as read back from progress.json

    step, first_epoch, groups_done = 0, 0, 0
    history: list[StepInfo] = []
    ckpt = None
    if checkpoint_dir is not None and resume:
        ckpt = latest_checkpoint(checkpoint_dir)
    elif checkpoint_dir is not None and rank == 0 and (n_old := remove_checkpoints(checkpoint_dir)):
        warnings.warn(
            f"resume=False: removed {n_old} checkpoint(s) of an earlier run in {checkpoint_dir}",
            stacklevel=2,
        )
    barrier()
    if ckpt is not None:
        prog = restore_checkpoint(ckpt, settings, trainable, optimizer, lr_scheduler, rank, part.device)
        step, first_epoch, groups_done = (
            prog["step"],
            prog["epoch"],
            prog["groups_done"],
        )
        history = [StepInfo(**h) for h in prog["history"]]

    def save(epoch: int, groups_done: int) -> None:
        assert checkpoint_dir is not None
        rng = _rng_states(part.device)  # collective: every rank takes part
        if rank == 0:
            state = {
                "trainable": {k: p.detach().to("cpu", copy=True) for k, p in trainable.items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "rng": rng,
            }
            prog = {
                "step": step,
                "epoch": epoch,
                "groups_done": groups_done,
                "settings": settings,
                "history": [asdict(h) for h in history],
            }
            adapter = (lambda folder: save_adapter(part, folder)) if lora_layers(part) else None
            save_checkpoint(checkpoint_dir, step, state, prog, adapter, keep=keep_checkpoints)
        barrier()

    bar = tqdm(
        total=total,
        initial=step,
        desc="sft",
        unit="step",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    was_training = part.training
    part.train()
    start = time.perf_counter() - (history[-1].elapsed_s if history else 0.0)
    try:
        for epoch in range(first_epoch, epochs):
            batches = batch_indices(lengths, batch_size * world, seed=seed, epoch=epoch)
            groups = [batches[k : k + grad_accum_steps] for k in range(0, len(batches), grad_accum_steps)]
            for g in range(groups_done if epoch == first_epoch else 0, len(groups)):
                t0 = time.perf_counter()
                shards = [_shard(b, batch_size, rank) for b in groups[g]]
                micro = [collate([dataset[j] for j in rows], pad_id) for rows in shards if rows]
                n_targets, n_tokens = all_reduce_sum(
                    [
                        sum(mb.n_targets for mb in micro),
                        sum(mb.n_tokens for mb in micro),
                    ]
                )
                if n_targets == 0:
                    raise ValueError(
                        f"step {step + 1} has no target tokens (every label is -100); use prepare_dataset's examples"
                    )
                loss_sum = sum(engine.forward_backward(mb, normalizer=n_targets).loss_sum for mb in micro)
                all_reduce_gradients(params)
                (loss_sum,) = all_reduce_sum([loss_sum])
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if lr_scheduler is not None:
                    lr_scheduler.step()
                step += 1
                now = time.perf_counter()
                info = StepInfo(
                    step,
                    epoch,
                    loss_sum / n_targets,
                    lr,
                    int(n_targets),
                    int(n_tokens),
                    n_tokens / (now - t0),
                    now - start,
                )
                due = (step % eval_every == 0 or step == total) if eval_every else g == len(groups) - 1
                if eval_dataset is not None and due:
                    info.eval_loss = evaluate(engine, eval_dataset, eval_batch_size or batch_size)
                history.append(info)
                if checkpoint_dir is not None and (step % save_every == 0 or step == total):
                    save(epoch, g + 1)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{info.loss:.4f}",
                    tok_s=f"{info.tokens_per_s:.0f}",
                    refresh=False,
                )
                if callback is not None:
                    callback(info)
    finally:
        bar.close()
        part.train(was_training)
    return history
