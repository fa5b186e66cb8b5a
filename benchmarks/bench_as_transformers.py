"""llm_lazy_qwen.as_transformers: decode tokens/s of transformers' generate() on a part vs llm_sampler's sample.

Both drive the same QwenPart (the Qwen2.5-0.5B-shaped random checkpoint of _ckpt.py, bf16), in RAM and
lazy: `as_transformers(part).generate(...)` against `sample(CachedForward(IncrementalPart(part)), ...)`,
greedy and with sampling processors, batch 1. Decode rate = (N - 1) / (t(N new tokens) - t(1 new
token)), so the prompt's prefill cancels out; medians of interleaved runs after one warm-up each.
The ratio is sample tok/s / generate tok/s (goal: <= 1.1, generate() costs at most 10% more per token).

Each run is timed twice: wall clock, and the CPU time of this process (`time.process_time`, all its
threads). On a box shared with other work the wall clock measures the neighbours; the CPU time with
`--threads 1` (no OpenMP worker spinning while it waits for a core) measures the work each path does.

    python benchmarks/bench_as_transformers.py [--rounds 3] [--new-tokens 24] [--threads 2] [--workdir /tmp/llm_bench]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ckpt import make_checkpoint

import llm_sepweight as sw
from llm_lazy_qwen import IncrementalPart, as_transformers, load_part
from llm_sampler import CachedForward, sample

PROMPT = 16
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def decode_rates(
    runs: dict[str, Callable[[int], object]], new_tokens: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """(wall, CPU) decode tokens/s of each run: (N - 1) / (t(N) - t(1)), medians over interleaved rounds."""
    for run in runs.values():  # warm-up
        run(2)
    full: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    one: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            full[name].append(timed(lambda run=run: run(new_tokens)))
            one[name].append(timed(lambda run=run: run(1)))

    def rate(name: str, clock: int) -> float:
        spent = statistics.median(t[clock] for t in full[name]) - statistics.median(t[clock] for t in one[name])
        return (new_tokens - 1) / spent

    return {name: (rate(name, 0), rate(name, 1)) for name in runs}


def bench(sep: Path, lazy: bool, new_tokens: int, rounds: int) -> list[str]:
    part = load_part(sep, "f", lazy=lazy, dtype="bf16")
    model = as_transformers(part)
    prompt = torch.randint(1, part.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, settings in [("greedy", {}), ("T=0.8 top_k=50 top_p=0.95", SAMPLED)]:
        do_sample = bool(settings)

        def ours(n: int, settings=settings) -> object:
            cached = CachedForward(IncrementalPart(part))
            temperature = settings.get("temperature", 0)
            with torch.no_grad():
                return sample(
                    cached, prompt, n, **{**settings, "temperature": temperature}, generator=torch.Generator()
                )

        def generate(n: int, settings=settings, do_sample=do_sample) -> object:
            with torch.no_grad():
                return model.generate(
                    prompt,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=do_sample,
                    eos_token_id=None,
                    pad_token_id=0,
                    **settings,
                )

        rates = decode_rates({"sample": ours, "generate": generate}, new_tokens, rounds)
        (ours_wall, ours_cpu), (gen_wall, gen_cpu) = rates["sample"], rates["generate"]
        where = "lazy (streamed)" if lazy else "in RAM"
        rows.append(
            f"| {where}, {label} | {ours_wall:.1f} | {gen_wall:.1f} | {ours_wall / gen_wall:.2f} "
            f"| {ours_cpu:.1f} | {gen_cpu:.1f} | **{ours_cpu / gen_cpu:.2f}** |"
        )
    part.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/llm_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    sep = work / "sep-lazy"
    sw.convert(make_checkpoint(work), sep, progress=False)  # skipped when already complete
    before = loadavg()
    rows = [row for lazy in (False, True) for row in bench(sep, lazy, args.new_tokens, args.rounds)]
    after = loadavg()
    command = (
        f"python benchmarks/bench_as_transformers.py --rounds {args.rounds} --new-tokens {args.new_tokens} "
        f"--threads {args.threads}"
    )
    print(
        f"`{command}` on {cpu_model()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch threads {args.threads}, "
        f"load average before {before} and after {after}."
    )
    print()
    print(
        f"Qwen2.5-0.5B-shaped random checkpoint (bf16), batch 1, {PROMPT}-token prompt; decode tok/s = "
        f"(N - 1) / (t(N={args.new_tokens}) - t(1)), medians of {args.rounds} interleaved runs after a warm-up."
    )
    print()
    print(
        "| part, settings | `sample` tok/s (wall) | `generate` tok/s (wall) | ratio (wall) "
        "| `sample` tok/s (CPU time) | `generate` tok/s (CPU time) | ratio (CPU time; goal <= 1.1) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
