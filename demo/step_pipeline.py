"""Demo step 4: the model split over 2 processes with llm_pipeline (gloo on localhost), vs one process."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from step_chat import torch_threads

PROMPTS = ["Which continent is France in?", "Once upon a time there was"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt_ids(sep: Path) -> list[list[int]]:
    """Two prompts of different lengths (a left-padded batch), from the model's own tokenizer."""
    if not (sep / "tokenizer.json").is_file():
        return [list(range(10, 22)), list(range(30, 37))]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(sep / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]


def _decode_rate(stream: Iterator[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """(B, n) tokens, seconds to the first token, decode tokens/s: measured as llm-pipeline does."""
    t0 = time.perf_counter()
    steps, t_first = [], 0.0
    for tokens in stream:  # (B,) per step; the first one comes after the prefill
        steps.append(tokens)
        t_first = t_first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    new = torch.stack(steps, dim=1)  # (B, n)
    return new, t_first, (new.shape[1] - 1) * new.shape[0] / (elapsed - t_first)


def run_ranks(cmd: list[str], work: Path, limit: float) -> tuple[str, str]:
    """Run `cmd` as ranks 0 and 1 on localhost, with the variables torchrun would set; return
    rank 0's stdout and stderr. RuntimeError with both ranks' logs if either fails or runs too long.
    """
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    world.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    logs = [(work / f"pipeline.rank{r}.out", work / f"pipeline.rank{r}.err") for r in (0, 1)]
    procs = []
    for r, (out, err) in enumerate(logs):
        env = {**os.environ, **world, "RANK": str(r), "LOCAL_RANK": str(r)}
        with out.open("w") as fo, err.open("w") as fe:
            procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env))
    deadline = time.monotonic() + limit
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0, 0]:
        why = f"exit codes {codes}" if codes else f"still running after {limit:.0f} s"
        tails = "\n".join(f"--- {err}:\n{err.read_text()[-1500:]}" for _, err in logs)
        raise RuntimeError(f"the 2-process pipeline failed ({why}); rank logs:\n{tails}")
    return logs[0][0].read_text(), logs[0][1].read_text()


def pipeline_generate(sep: Path, work: Path, n: int, timeout: float, dtype: str = "fp32") -> dict[str, Any]:
    """Greedy generation with the model split over 2 processes (gloo on localhost) by the
    llm-pipeline CLI, and the same in this process; both as JSON-ready numbers and token ids.

    fp32 compute by default: the 2 processes and the reference split their GEMMs differently (other
    shapes), and bf16 rounding of such differences can flip a near-tie greedy token."""
    from llm_lazy_qwen import IncrementalPart, load_part
    from llm_sampler import CachedForward, pad_left, sample_stream

    layers = json.loads((sep / "config.json").read_text())["num_hidden_layers"]
    half = max(1, layers // 2)
    specs = [f"b 0-{half}", f"{half}-{layers} e"]
    prompts = _prompt_ids(sep)
    cli = [
        "-m",
        "llm_pipeline.cli",
        "generate",
        "--model",
        str(sep),
        "--parts",
        ",".join(specs),
    ]
    cli += ["--dtype", dtype, "--temperature", "0", "--max-new-tokens", str(n), "--ignore-eos", "--json"]
    cli += ["--timeout", str(timeout), "--join-timeout", str(timeout)]
    for p in prompts:
        cli += ["--prompt-ids", " ".join(map(str, p))]
    print(f"stages: rank 0 '{specs[0]}', rank 1 '{specs[1]}'")
    print("the same as: torchrun --nproc-per-node 2 " + shlex.join(cli))
    t0 = time.perf_counter()
    out, err = run_ranks([sys.executable, *cli], work, limit=2 * timeout + 30)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    speed = re.search(r"first token ([\d.]+) s, decode ([\d.]+) tokens/s", err)

    # the reference: the whole model in this process, same prompts, same padding, greedy, 1 thread
    # like each stage (step_chat.torch_threads says why)
    part = load_part(sep, "f", dtype=dtype)
    pad = part.config.pad_token_id if part.config.pad_token_id is not None else 0
    ids, mask = pad_left(prompts, pad_token_id=pad)  # (B, T), left padding
    with torch_threads(1):
        warm = CachedForward(IncrementalPart(part))  # its own cache: no prefix reused below
        next(sample_stream(warm, ids, 1, temperature=0, attention_mask=mask))
        fwd = CachedForward(IncrementalPart(part))
        stream = sample_stream(fwd, ids, n, temperature=0, attention_mask=mask)
        single, first_s, decode_tok_s = _decode_rate(stream)
    return {
        "parts": ",".join(specs),
        "prompt_ids": prompts,
        "pipeline_new_ids": [r["new_ids"] for r in rows],
        "single_new_ids": single.tolist(),
        "equal": [r["new_ids"] for r in rows] == single.tolist(),
        "pipeline_first_s": float(speed[1]) if speed else None,
        "pipeline_decode_tok_s": float(speed[2]) if speed else None,
        "pipeline_wall_s": wall,
        "single_first_s": first_s,
        "single_decode_tok_s": decode_tok_s,
    }


def show_pipeline(pipe: dict[str, Any]) -> tuple[str, str]:
    """Print step 4's table and tokens; return its summary row."""
    first, decode = pipe["pipeline_first_s"], pipe["pipeline_decode_tok_s"]
    batch, n = len(pipe["prompt_ids"]), len(pipe["single_new_ids"][0])
    print(f"greedy, {batch} prompts x {n} new tokens (decode tok/s counts all prompts)")
    print(f"{'':<34}{'prefill + 1st token s':>22}{'decode tok/s':>14}")
    if decode is not None:  # parsed from llm-pipeline's last stderr line
        print(f"{'2 processes x 1 thread (pipeline)':<34}{first:>22.3f}{decode:>14.1f}")
    single = pipe["single_decode_tok_s"]
    print(f"{'1 process x 1 thread':<34}{pipe['single_first_s']:>22.3f}{single:>14.1f}")
    rows = zip(pipe["prompt_ids"], pipe["pipeline_new_ids"], pipe["single_new_ids"])
    for p, a, b in rows:
        print(f"prompt of {len(p)} tokens -> {a[:10]}... {'==' if a == b else '!='} 1 process")
    wall = pipe["pipeline_wall_s"]
    print(f"2 processes started, joined, generated and exited in {wall:.1f} s")
    print("on one host a pipeline saves memory per process, not time (see llm_pipeline's README)")
    same = "==" if pipe["equal"] else "!="
    speed = "?" if decode is None else f"{decode:.1f}"
    row = f"'{pipe['parts']}': greedy tokens {same} 1 process; "
    return (
        "pipeline (2 processes)",
        row + f"decode {speed} tok/s (1 process: {single:.1f})",
    )
