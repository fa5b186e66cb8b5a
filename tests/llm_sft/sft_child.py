"""One training run in its own process, for the SIGKILL/resume and the two-rank (torchrun-style) tests.

    python sft_child.py '{"sep": ..., "out": ..., "ckpt": ..., "batch_size": 2, ...}'

Rank and world come from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun sets them.
"kill_in_save": n makes the n-th checkpoint state.safetensors of this process half a file, then SIGKILLs the process.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sft_helpers import ALL7, examples, randomize_adapters

import llm_sft.checkpoint
from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
from llm_sft import SFTDataset, init_distributed, sft, steps_per_epoch, warmup_cosine


def train(cfg: dict) -> None:
    """The run; also called in-process by the tests for the uninterrupted / single-rank reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same in every run: bitwise-equal results
    try:
        _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: dict) -> None:
    rank, world = init_distributed()
    if cfg.get("kill_in_save"):
        real_save, calls = llm_sft.checkpoint.save_safetensors, []

        def save(f, *args, **kwargs):
            calls.append(f)
            if len(calls) == cfg["kill_in_save"]:
                Path(f).write_bytes(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(f, *args, **kwargs)

        llm_sft.checkpoint.save_safetensors = save
    torch.manual_seed(cfg["seed"])
    part = load_part(cfg["sep"], "f", lazy=cfg["lazy"], prefetch=0, head_chunk_size=100)
    apply_lora(part, ALL7, r=4, lora_alpha=8, lora_dropout=cfg["dropout"])
    randomize_adapters(part, seed=rank)  # ranks start different: sft broadcasts rank 0's values, as DDP does
    opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=cfg["lr"])
    lengths = [4 + (5 * i) % 11 for i in range(cfg["n"])]
    ds = SFTDataset(examples(lengths, prompt=3, seed=3), pad_id=0)
    total = cfg["epochs"] * steps_per_epoch(len(ds), cfg["batch_size"], cfg["grad_accum"], world)
    sched = warmup_cosine(opt, 1, total)

    def callback(info):
        print(json.dumps({"rank": rank, "step": info.step}), flush=True)
        time.sleep(cfg.get("sleep", 0.0))

    log = sft(
        part,
        ds,
        opt,
        cfg["batch_size"],
        cfg["epochs"],
        cfg["grad_accum"],
        sched,
        checkpoint_dir=cfg.get("ckpt"),
        save_every=1,
        callback=callback,
        seed=cfg["seed"],
        progress=False,
    )
    if rank == 0:
        save_adapter(part, cfg["out"])
        Path(cfg["out"], "log.json").write_text(json.dumps([h.loss for h in log]))
    part.close()


if __name__ == "__main__":
    train(json.loads(sys.argv[1]))
