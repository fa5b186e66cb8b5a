"""What checking part files for changes costs a lazy part: decode with the checks on vs off.

SepWeights stats a part file (inode, size, mtime) before and after every read or mapping, and the
streamer once more when it hands a prefetched item out (llm_sepweight README: "Files changed while
in use"). This measures lazy decode (Qwen2.5-0.5B-shaped, bf16, 2 threads, warm page cache) with
those checks and with them replaced by a no-op, interleaved in one process, in mmap and copy mode.

    python benchmarks/bench_file_checks.py [--rounds 5] [--tokens 16] [--workdir /tmp/llm_bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import torch  # noqa: E402
from _ckpt import make_checkpoint  # noqa: E402

import llm_sepweight as sw  # noqa: E402
from llm_lazy_qwen import load_part  # noqa: E402


def decode(part, tokens: int) -> float:
    """Seconds per token of greedy decode after an 8-token prompt."""
    cache = part.new_cache()
    logits = part(torch.arange(8).unsqueeze(0), cache=cache)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = part(logits[:, -1:].argmax(-1), cache=cache)
    return (time.perf_counter() - t0) / tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/llm_bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    src = make_checkpoint(work)
    sep = work / "qwen-sep-bf16"
    if not (sep / "manifest.json").exists():
        sw.convert(src, sep, dtype="bf16", progress=False)

    checked = sw.SepWeights._unchanged
    calls = 0

    def counted(self, name):
        nonlocal calls
        calls += 1
        return checked(self, name)

    def unchecked(self, name):
        return self._stamps[name][0]

    weights, n = sw.SepWeights(sep), 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        weights._unchanged("mid.00000.safetensors")
    check_us = (time.perf_counter() - t0) / n * 1e6

    load = os.getloadavg()[0]
    print(f"lazy decode, Qwen2.5-0.5B shape bf16, {args.tokens} tokens x {args.rounds} rounds (load {load:.1f})")
    print(f"one check (an os.stat and a compare): {check_us:.1f} us")
    for mode in ("mmap", "copy"):
        part = load_part(sep, lazy=True, stream_mode=mode)
        decode(part, 2)  # warm: 2 MiB pages re-cached, buffers allocated
        on, off = [], []
        for _ in range(args.rounds):
            sw.SepWeights._unchanged = counted
            calls = 0
            on.append(decode(part, args.tokens))
            per_token = calls / (args.tokens + 1)
            sw.SepWeights._unchanged = unchecked
            off.append(decode(part, args.tokens))
        sw.SepWeights._unchanged = checked
        part.close()
        a, b = statistics.median(on), statistics.median(off)
        cost = per_token * check_us / 1e3  # ms per token
        print(
            f"{mode}: {per_token:.0f} checks per token = {cost:.2f} ms = {cost / (b * 1e3):.3%} of a token; "
            f"decode with checks {a * 1e3:.1f} ms/token, without {b * 1e3:.1f} (ratio {a / b:.3f}, run-to-run noise)"
        )


if __name__ == "__main__":
    main()
