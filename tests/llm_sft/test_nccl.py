"""Data parallelism on nccl (issue 15 item 19): collectives take tensors on the rank's GPU, each rank its own GPU.

One GPU cannot hold two nccl ranks, so the nccl tests run a group of one (run on a GPU machine, skipped
elsewhere): a group of one runs every collective of a training run (the token and loss sums, the
gradient all-reduce, the RNG-state gather of each checkpoint, the broadcast), and must give the run
without a group, resumed or not. The same collectives run here over gloo.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from sft_helpers import ALL7, FP32, examples, randomize_adapters

from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable
from llm_sft import SFTDataset, local_device, sft
from llm_sft.distributed import all_gather_tensor, all_reduce_sum

NCCL = torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()
needs_nccl = pytest.mark.skipif(not NCCL, reason="needs CUDA and nccl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group_of_one(request):
    """A process group of one rank over the backend in ``request.param``; destroyed afterwards."""
    backend = request.param
    if backend == "nccl":
        if not NCCL:
            pytest.skip("needs CUDA and nccl")
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def test_local_device_is_cuda_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert local_device("cuda:1") == torch.device("cuda", 1)  # an explicit GPU is kept
    assert local_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("group_of_one", ["gloo", "nccl"], indirect=True)
def test_collectives_of_a_group_of_one(group_of_one):
    assert all_reduce_sum([3.0, 0.5]) == [3.0, 0.5]
    state = torch.get_rng_state()  # a CPU tensor, sent through the backend's device
    (got,) = all_gather_tensor(state)
    assert got.device.type == "cpu" and torch.equal(got, state)
    if group_of_one == "nccl":
        cuda_state = torch.cuda.get_rng_state().cuda()
        (got,) = all_gather_tensor(cuda_state)
        assert got.device.type == "cuda" and torch.equal(got, cuda_state)


@pytest.mark.parametrize("group_of_one", ["nccl"], indirect=True)
def test_sums_over_nccl_take_cuda_tensors_as_in_a_bigger_group(group_of_one, monkeypatch):
    """What a rank of two sees (before the fix: a CPU tensor handed to nccl, which refuses it)."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert all_reduce_sum([3.0, 0.5]) == [3.0, 0.5]


class _Stop(Exception):
    pass


def _train(path, ckpt_dir, lazy: bool, stop_after: int | None = None):
    """A LoRA run on cuda (6 steps, dropout on, a checkpoint every step); its losses and adapters."""
    torch.manual_seed(0)
    part = load_part(path, "f", device="cuda", lazy=lazy, prefetch=1, stream_mode="copy", head_chunk_size=100)
    apply_lora(part, ALL7, r=4, lora_alpha=8, lora_dropout=0.1, device="cuda")
    randomize_adapters(part, seed=0)
    opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=1e-2)
    ds = SFTDataset(examples([4 + (5 * i) % 11 for i in range(12)], prompt=3, seed=3), pad_id=0)

    def callback(info):
        if stop_after is not None and info.step == stop_after:
            raise _Stop  # after the step's checkpoint: the run is resumed from it

    try:
        log = sft(
            part, ds, opt, 2, 2, 2, checkpoint_dir=ckpt_dir, save_every=1, callback=callback, seed=0, progress=False
        )
        adapters = {n: p.detach().cpu() for n, p in part.named_parameters() if p.requires_grad}
        assert all(p.device.type == "cuda" for p in part.parameters() if p.requires_grad)
        return [h.loss for h in log], adapters
    finally:
        part.close()


@needs_nccl
@pytest.mark.parametrize("lazy", [False, True], ids=["vram", "lazy"])
def test_sft_over_nccl_equals_the_run_without_a_group(sep, tmp_path, lazy):
    path, _ = sep("qwen2")
    want_losses, want = _train(path, tmp_path / "alone", lazy)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        losses, got = _train(path, tmp_path / "nccl", lazy)
        with pytest.raises(_Stop):
            _train(path, tmp_path / "resumed", lazy, stop_after=2)
        resumed_losses, resumed = _train(path, tmp_path / "resumed", lazy)  # the RNG states come back per rank
    finally:
        dist.destroy_process_group()
    assert len(want_losses) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), **FP32)
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(want_losses), **FP32)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, **FP32, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(resumed[name], t, **FP32, msg=lambda m, name=name: f"{name} (resumed): {m}")
