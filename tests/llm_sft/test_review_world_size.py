"""A checkpoint of a two-rank run resumed with one rank (outside review): a clear error naming the ranks,
never a silent resume (the RNG states, data shards and global batch all depend on the world size)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sft_child import train

from llm_sft import latest_checkpoint

CHILD = Path(__file__).with_name("sft_child.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_two_rank_checkpoint_resumed_by_one_rank_is_refused(sep, tmp_path):
    path, _ = sep("qwen2")
    cfg = {
        "sep": str(path),
        "lazy": False,
        "lr": 1e-2,
        "dropout": 0.0,
        "epochs": 1,
        "grad_accum": 1,
        "n": 8,
        "seed": 0,
        "batch_size": 2,
        "ckpt": str(tmp_path / "ckpt"),
        "out": str(tmp_path / "two"),
    }
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = [sys.executable, str(CHILD), json.dumps(cfg)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000002"
    cfg["epochs"] = 2  # more to do: the resume must read the checkpoint
    with pytest.raises(ValueError, match=r"step-00000002 was written with other settings \(world_size: 2 -> 1\)"):
        train({**cfg, "out": str(tmp_path / "one")})  # in this process: one rank
