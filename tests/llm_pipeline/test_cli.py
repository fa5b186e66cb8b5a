"""The llm-pipeline CLI: end to end under torchrun, and its checks of bad input (in-process)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llm_lazy_qwen import IncrementalPart, load_part
from llm_pipeline.cli import main
from llm_sampler import CachedForward, pad_left, sample


def test_torchrun_generate_equals_single_process(sep, tmp_path):
    path, _ = sep("qwen2")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", _free_port()]
    cli = [
        "-m",
        "llm_pipeline.cli",
        "generate",
        "--model",
        str(path),
        "--json",
        "--timeout",
        "30",
    ]
    cli += ["--prompt-ids", "5 6 7 8 9", "--prompt-ids", "10,11"]
    cli += ["--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        torchrun + cli,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt_ids"] for r in rows] == prompts
    ids, mask = pad_left(prompts, pad_token_id=0)
    with torch.no_grad():
        want = sample(
            CachedForward(IncrementalPart(load_part(path))),
            ids,
            8,
            attention_mask=mask,
            temperature=0,
        )
    assert [r["new_ids"] for r in rows] == want.tolist()
    assert "llm-pipeline: 2 stages" in done.stderr and "tokens/s" in done.stderr


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_single_process_text_prompt(sep, monkeypatch, capsys):
    """Without torchrun the CLI runs the whole model in one process; --prompt uses tokenizer.json."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    path, _ = sep("qwen2")
    assert (
        main(
            [
                "generate",
                "--model",
                str(path),
                "--prompt",
                "hello world",
                "--max-new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert 1 <= len(row["new_ids"]) <= 4 and isinstance(row["text"], str)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--prompt-ids", "1 2", "--parts", "b 0-2,1-3 e"], "overlaps stage 0"),
        (["--prompt-ids", "1 x"], "--prompt-ids '1 x': expected integers"),
        ([], "give the prompts as --prompt TEXT or as --prompt-ids IDS"),
        (["--prompt-ids", "1", "--micro-batches", "0"], "--micro-batches must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(sep, monkeypatch, capsys, argv, match):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    path, _ = sep("qwen2")
    assert main(["generate", "--model", str(path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm-pipeline: error: ") and match in err


def test_split_prints_the_automatic_split(sep, capsys):
    path, _ = sep("qwen2")
    assert main(["split", "--model", str(path), "--stages", "2", "--balance", "layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("stage 0: b 0-2  (") and out[-1] == "b 0-2,2 e"
