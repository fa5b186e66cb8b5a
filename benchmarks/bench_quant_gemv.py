"""llm_bsm_kernel's int4 / int8 decode GEMV against torch's CPU int kernels, a bf16 matmul and the memory floor.

The linear shapes of a Qwen2.5-7B (q/o 3584 -> 3584, k/v 3584 -> 512, gate/up 3584 -> 18944, down 18944 -> 3584)
at M = 1 and 4 rows, activations bf16. Each cell: median ms of `--reps` calls after a warm-up; each call
takes the next of several copies of the weight (at least `--cycle-mb` MB in all), so the weights come from
memory as in a real decode step, not from the L3 cache. Ratios are measured in the same run. Columns:

- ``ours int4`` / ``ours int8``: ``llm_bsm_kernel.int4_matmul`` (g=64, this CPU's layout, prepared scales) /
  ``int8_matmul`` (x quantized to int16 on the fly, integer dot products), default threads (OpenMP, shared
  with torch);
- ``torch int4`` / ``torch int8``: ``aten._weight_int4pack_mm_for_cpu`` / ``aten._weight_int8pack_mm``
  with scales as llm_lazy_qwen prepares them (bf16);
- ``bf16``: ``F.linear`` with a bf16 weight (what an unquantized model does);
- ``floor``: bytes of the int4 weight (packed + bf16 scales) / the read bandwidth measured in this run
  (a ``sum`` over a 1 GiB buffer, same threads and clock).

``--interleave`` times the engines rep by rep (one call of each in turn) instead of all reps of one engine, then
the next: on a shared box a burst of load then hits every column alike. ``--int8-baseline PATH`` adds ``base int8``: the int8 GEMV of another build of llm_bsm_kernel's ``_kernel`` module
(e.g. a copy of an older commit's ``.so``) timed in the same run, and the ratio ``ours int8/base``.

Then a per-token estimate for the 7B int4 / int8 shape: 28 layers x (q, k, v, o, gate, up, down) at M=1,
plus the head (3584 -> 152064, `--no-head` to skip), linears only (no attention, norms or sampling).

    nice -n 19 python benchmarks/bench_quant_gemv.py [--reps 9] [--rows 1,4] [--threads 1] [--no-head]

On a shared box a parallel call waits for its slowest thread, which the scheduler may have preempted for a
whole time slice: wall times then come in multiples of ~4 ms. ``--threads 1`` times one core in CPU time
(``time.thread_time``), which preemption does not inflate: the per-core comparison of the loops; ``--stat min``
reports the best call instead of the median (with several threads: a call no thread of which was preempted).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import llm_bsm_kernel as bk
from llm_sepweight import int4_layout

SHAPES = {"q/o": (3584, 3584), "k/v": (3584, 512), "gate/up": (3584, 18944), "down": (18944, 3584)}  # (K, N)
HEAD = (3584, 152064)
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
LAYERS = 28
G = 64


CLOCK = {"fn": time.perf_counter}  # time.thread_time with --threads 1: CPU time, blind to preemption
STAT = {"fn": statistics.median}  # --stat min: the best call, when no thread of the call was preempted


def interleaved_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Like median_ms for each, but rep by rep across the engines: a burst of load hits them all alike."""
    clock = CLOCK["fn"]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: STAT["fn"](v) * 1e3 for name, v in times.items()}


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    clock = CLOCK["fn"]
    times = []
    for _ in range(reps):
        t = clock()
        fn()
        times.append(clock() - t)
    return STAT["fn"](times) * 1e3


def cycling(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def weights(K: int, N: int, copies: int, seed: int = 0) -> dict[str, list]:
    """`copies` independent random weights of each kind: int4 (packed, prepared, torch's scales), int8, bf16."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {"int4": [], "int8": [], "bf16": []}
    for _ in range(copies):
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)  # this CPU's layout
        del q
        sz = (torch.rand(N, K // G, 2, generator=gen) * 1e-2).bfloat16()
        out["int4"].append((packed, bk.prepare_int4_scales(sz), sz.transpose(0, 1).contiguous()))
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        out["int8"].append((q8, (torch.rand(N, generator=gen) * 1e-3).bfloat16()))
        out["bf16"].append((torch.randn(N, K, generator=gen) * 0.02).bfloat16())
    return out


def read_bandwidth(reps: int) -> float:
    """GB/s of a threaded sum over a 1 GiB buffer (a lower bound of what a GEMV can stream)."""
    buf = torch.ones(2**28, dtype=torch.float32)
    ms = median_ms(lambda: buf.sum(), reps)
    return buf.numel() * 4 / ms / 1e6


def baseline_int8(path: Path) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``int8_matmul(x, q, s)`` through the ``int8_gemv`` of the extension module at `path` (AVX2, torch's threads)."""
    spec = importlib.util.spec_from_file_location("llm_bsm_kernel._kernel", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--int8-baseline {path}: not an extension module")
    kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel)

    def matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], q.shape[0])
        args = [1, x.shape[0], q.shape[0], q.shape[1], x.data_ptr(), int(x.dtype == torch.bfloat16), q.data_ptr()]
        args += [s.data_ptr(), y.data_ptr(), torch.get_num_threads()]
        try:
            kernel.int8_gemv(*args)  # the fp32 loop's signature (before the int16 one)
        except TypeError:
            kernel.int8_gemv(*args, bk.quant_gemv.INT8_X_BLOCK)
        return y

    return matmul


def row(
    K: int,
    N: int,
    M: int,
    w: dict[str, list],
    reps: int,
    base: Callable[..., torch.Tensor] | None = None,
    interleave: bool = False,
) -> dict[str, float]:
    x = torch.randn(M, K).bfloat16()
    layout = int4_layout()
    cells = {
        "ours int4": cycling([lambda p=p, s=s: bk.int4_matmul(x, p, s, G, layout) for p, s, _ in w["int4"]]),
        "torch int4": cycling(
            [lambda p=p, t=t: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, G, t) for p, _, t in w["int4"]]
        ),
        "ours int8": cycling([lambda q=q, s=s: bk.int8_matmul(x, q, s) for q, s in w["int8"]]),
        "torch int8": cycling([lambda q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in w["int8"]]),
        "bf16": cycling([lambda b=b: F.linear(x, b) for b in w["bf16"]]),
    }
    if base is not None:
        s32 = [(q, s.float()) for q, s in w["int8"]]
        cells["base int8"] = cycling([lambda q=q, s=s: base(x, q, s) for q, s in s32])
    if interleave:
        return interleaved_ms(cells, reps)
    return {name: median_ms(fn, reps) for name, fn in cells.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--cycle-mb", type=float, default=96.0, help="MB of int4 weights cycled per shape")
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch's and ours (default: torch's default)")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="of the reps, per cell")
    ap.add_argument("--interleave", action="store_true", help="time the engines rep by rep, not one after another")
    ap.add_argument("--int8-baseline", type=Path, default=None, help="another build's _kernel .so: its int8 GEMV")
    args = ap.parse_args()
    STAT["fn"] = min if args.stat == "min" else statistics.median
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)  # ours follows: one OpenMP runtime
    if torch.get_num_threads() == 1:
        CLOCK["fn"] = time.thread_time
    rows = [int(r) for r in args.rows.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu} ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads ({'CPU time of the calling thread' if torch.get_num_threads() == 1 else 'wall'}), capability {torch.backends.cpu.get_cpu_capability()}, int4 layout "
        f"{int4_layout()} g={G}, ours: isa {bk.quant_gemv_isa()}, activations bf16, {args.stat} of {args.reps}; "
        f"loadavg {os.getloadavg()[0]:.1f}"
    )
    gbs = read_bandwidth(args.reps)
    print(f"read bandwidth (sum over 1 GiB): {gbs:.1f} GB/s\n")
    base = baseline_int8(args.int8_baseline) if args.int8_baseline else None
    cols = ["ours int4", "torch int4", "ours int8", "torch int8", "bf16"] + (["base int8"] if base else [])
    extra = " ours int8/base |" if base else ""
    print("| shape (K x N) | M | " + " | ".join(f"{c} ms" for c in cols) + " | int4 ours/torch | int8 ours/torch |"
          " ours int4/bf16 | ours int8/bf16 | int4 floor ms | ours int4/floor |" + extra)  # fmt: skip
    print("|---|---|" + "---|" * (len(cols) + 6 + bool(base)))
    per_token: dict[str, float] = dict.fromkeys(cols, 0.0)
    shapes = dict(SHAPES)
    if not args.no_head:
        shapes["head"] = HEAD
    for name, (K, N) in shapes.items():
        int4_bytes = N * K // 2 + N * (K // G) * 2 * 2
        copies = 1 if name == "head" else max(1, math.ceil(args.cycle_mb * 1e6 / int4_bytes))
        w = weights(K, N, copies)
        floor = int4_bytes / gbs / 1e6
        for M in rows:
            ms = row(K, N, M, w, args.reps, base, args.interleave)
            if M == 1:
                for c in cols:
                    per_token[c] += ms[c] * (1 if name == "head" else LAYERS * PER_LAYER[name])
            r4, r8 = ms["ours int4"] / ms["torch int4"], ms["ours int8"] / ms["torch int8"]
            cells = [f"{ms[c]:.2f}" for c in cols]
            cells += [
                f"{r4:.2f}",
                f"{r8:.2f}",
                f"{ms['ours int4'] / ms['bf16']:.2f}",
                f"{ms['ours int8'] / ms['bf16']:.2f}",
            ]
            cells += [f"{floor:.2f}"]
            cells += [f"{ms['ours int4'] / floor:.2f}"] + ([f"{ms['ours int8'] / ms['base int8']:.2f}"] if base else [])
            print(f"| {name} ({K} x {N}) | {M} | " + " | ".join(cells) + " |", flush=True)
        del w
    what = f"{LAYERS} layers" + ("" if args.no_head else " + head")
    print(f"\nPer-token estimate, 7B shape, M=1, linears only ({what}): sum of the cells above")
    print("| " + " | ".join(cols) + " | int4 ours/torch | int8 ours/torch | ours int8/bf16 |" + extra)
    print("|" + "---|" * (len(cols) + 3 + bool(base)))
    cells = [f"{per_token[c] / 1e3:.3f} s" for c in cols]
    cells += [f"{per_token['ours int4'] / per_token['torch int4']:.2f}"]
    cells += [f"{per_token['ours int8'] / per_token['torch int8']:.2f}"]
    cells += [f"{per_token['ours int8'] / per_token['bf16']:.2f}"]
    cells += [f"{per_token['ours int8'] / per_token['base int8']:.2f}"] if base else []
    print("| " + " | ".join(cells) + " |")
    print(f"\nloadavg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
