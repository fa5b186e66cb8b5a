"""Data parallelism over processes or hosts (``torchrun``), with DDP's semantics for the trainable parameters.

Every rank holds the whole (frozen, memory-mapped) model and the same adapters; each takes its
share of every global batch. Gradients are summed over ranks with one all-reduce per optimizer
step (all trainable gradients flattened into one buffer). The trainer divides each rank's summed
loss by the target tokens of the whole global batch, so the sum over ranks is the gradient of the
global mean: 2 ranks with batch b each give the same update as 1 rank with batch 2b.
Backend: gloo on CPU, nccl when the model is on CUDA; then each rank uses ``cuda:LOCAL_RANK`` (as
llm_pipeline) and every collective runs on tensors on that device, as nccl requires.

    torchrun --nproc-per-node 2 -m llm_sft.cli train --model ... --data ... --out ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def local_device(device: torch.device | str = "cpu") -> torch.device:
    """The device of this rank: ``"cuda"`` without an index means ``cuda:LOCAL_RANK`` (0 without torchrun).

    Example::

        local_device("cuda")    # under torchrun --nproc-per-node 2: cuda:0 on rank 0, cuda:1 on rank 1
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 1800) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; ``(rank, world_size)``.

    Without ``WORLD_SIZE`` > 1 in the environment (a plain ``python`` run) nothing happens and
    ``(0, 1)`` is returned. On CUDA it makes :func:`local_device` the current device first, so
    ``"cuda"`` (models, RNG state, nccl's buffers) means this rank's GPU, not every rank's cuda:0.

    Example::

        rank, world = init_distributed()        # under torchrun --nproc-per-node 2: (0, 2) / (1, 2)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _active() -> bool:
    # a group of one still runs its collectives (cheap): a single GPU exercises the nccl path
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    """Where the group's collectives take their tensors: nccl only takes CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """Sum a few numbers over ranks (float64: token counts stay exact); ``device`` defaults to the backend's."""
    if not _active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in place, in one flat buffer (missing grads count as 0)."""
    if not _active() or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Give every rank rank ``src``'s values (DDP does this when it wraps a model)."""
    if not _active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (used for the ranks' RNG states in checkpoints),
    on ``t``'s device (sent through the backend's device: a CPU RNG state travels over nccl too)."""
    if not _active():
        return [t]
    sent = t.to(_comm_device())
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sent)
    return [o.to(t.device) for o in out]


def barrier() -> None:
    if _active():
        dist.barrier()
