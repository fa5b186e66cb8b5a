"""End-to-end decode of an int4 model in RAM: llm_bsm_kernel's GEMV vs torch's int4 kernel vs the bf16 model (R).

One process, models loaded one after another with ``load_part(dir, lazy=False)`` (resident: no disk reads per
token), the same prompt; per engine a prefill of `--prompt` tokens, one warm-up token, then `--tokens` timed greedy
decode steps with a KV cache. Reported per token: the median wall time and the median CPU time of the process (all
threads; preemption on a shared box inflates the wall time, and at several threads the CPU time too: OpenMP threads
spin while they wait for a preempted one), and their ratios to R in the same run. ``--threads 1`` avoids both.

- ``bf16 (R)``: the bf16 sepweight folder;
- ``int4 torch``: the int4 folder with llm_bsm_kernel hidden from QuantLinear (torch's ``_weight_int4pack_mm_for_cpu``);
- ``int4 ours``: the int4 folder as QuantLinear runs it with the [bsm] extra (llm_bsm_kernel's GEMV).

The int4 folder is converted from the bf16 one if missing (``quant="int4"``, g=64, ``method="rtn"``: the method
changes the values, not the speed).

    nice -n 19 python benchmarks/bench_quant_decode.py --bf16 /work/cache/bench_budget/sep-bf16 --int4 /work/cache/bench_quant_decode/q15-int4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lazy_qwen import quant as quant_mod


def decode(folder: Path, prompt: torch.Tensor, tokens: int, budget: str | None = None) -> tuple[float, float]:
    """(median wall s, median process CPU s) per decode token."""
    part = load_part(folder, lazy=False) if budget is None else load_part(folder, memory_budget=budget)
    try:
        cache = part.new_cache()
        nxt = part(prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        nxt = part(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # warm-up token
        wall, cpu = [], []
        for _ in range(tokens):
            t, c = time.perf_counter(), time.process_time()
            nxt = part(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    finally:
        part.close()
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", required=True, type=Path, help="a bf16 sepweight folder (R)")
    ap.add_argument("--int4", required=True, type=Path, help="its int4 conversion (made here if missing)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch's and ours (default: torch's default)")
    ap.add_argument(
        "--memory-budget", default=None, help="load with load_part(memory_budget=...) instead of lazy=False"
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)  # llm_bsm_kernel follows: one OpenMP runtime
    if not args.int4.exists():
        t = time.perf_counter()
        sw.convert(args.bf16, args.int4, dtype="bf16", quant="int4", group_size=64, quant_method="rtn", progress=False)
        print(f"converted {args.bf16} -> {args.int4} (int4 g64 rtn) in {time.perf_counter() - t:.0f} s")
    config = sw.SepWeights(args.bf16).config
    shape = {k: config.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {shape}, bf16 activations, prompt {args.prompt}, median of {args.tokens} tokens; "
        f"bsm_max_rows {quant_mod.bsm_max_rows(torch.bfloat16)}; loadavg {os.getloadavg()[0]:.1f}"
    )
    prompt = torch.randint(
        0, int(shape["vocab_size"] or 1000), (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    results = {"bf16 (R)": decode(args.bf16, prompt, args.tokens, args.memory_budget)}
    bsm = quant_mod._bsm
    quant_mod._bsm = lambda: None  # type: ignore[assignment]  # QuantLinear without llm_bsm_kernel
    try:
        results["int4 torch"] = decode(args.int4, prompt, args.tokens, args.memory_budget)
    finally:
        quant_mod._bsm = bsm  # type: ignore[assignment]
    results["int4 ours"] = decode(args.int4, prompt, args.tokens, args.memory_budget)
    r_wall, r_cpu = results["bf16 (R)"]
    print("| engine | wall s/token | ÷ R | CPU s/token | ÷ R |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in results.items():
        print(f"| {name} | {wall:.3f} | {wall / r_wall:.2f} | {cpu:.3f} | {cpu / r_cpu:.2f} |")
    print(f"loadavg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
