"""llm_pipeline: tokens/s of a 2-stage pipeline (2 processes on this machine, gloo) with and without
micro-batching vs the whole model in 1 process, and the cost of one hop of hidden states.

The model is a random Qwen2 built in-process (hidden 512, 8 layers, vocab 8192, fp32) and converted
with llm_sepweight. Job: greedy generation (llm_sampler, KV-cached) of NEW tokens for a batch of
B prompts of T tokens; tokens/s = B * NEW / wall time, prefill included. Every process runs 1 torch
thread, so the 2 stages can use the 2 cores; the 1-process anchor is measured with 1 thread and 2.

Rank 0 measures everything (the 1-process runs on its own while rank 1 waits, idle, in serve()),
alternating the configurations round by round after one warm-up each; the tables report medians.
Two measurements say how much parallelism there was to have:
- "both stages computing": the share of a pipelined run's wall time in which both ranks were
  inside their part's forward at once (timestamps of every stage call on both ranks): proof that
  the ranks overlap, whatever the machine gives them.
- "2-process slowdown": the same single-thread matmul loop run by both ranks at once vs by rank 0
  alone; 1.0 means two free cores, 2.0 means the two processes share one (a busy machine).
Per-hop overhead: a (B, T, hidden) fp32 tensor sent rank 0 -> 1 and back through the pipeline's
Link (header + payload, as a stage sends it); one hop = half the round trip.
Everything is measured twice: with the ranks free to run on any core (the default) and with each
rank pinned to its own core (`pin_cpus=True`).

    python benchmarks/bench_pipeline.py [--rounds 5] [--batch 16] [--prompt 64] [--new 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB = 512, 8, 8192
MICRO_BATCHES = [1, 2, 4]
HOP_SHAPES = [(1, 1), (16, 1), (4, 64), (16, 64)]  # (B, T) of (B, T, hidden) fp32


def build(path: Path) -> None:
    """A random Qwen2 with non-trivial norms and biases, saved by transformers, converted to sepweight."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import llm_sepweight as sw

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=3 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path / "hf")
    sw.convert(path / "hf", path / "sep", progress=False)


def timed(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(start, end) wall-clock times of each run, alternating round by round; one warm-up each first."""
    for run in runs.values():
        run()
    windows: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.time()
            run()
            windows[name].append((start, time.time()))
    return windows


def matmul_seconds() -> float:
    """A fixed single-thread matmul loop (about 4 GFLOP)."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    return time.perf_counter() - start


def rank_main(args: argparse.Namespace) -> None:
    """One rank of the 2-stage pipeline; prints its measurements as one JSON line."""
    import torch.distributed as dist

    from llm_lazy_qwen import IncrementalPart, load_part
    from llm_pipeline import Pipeline, generate, load_stage
    from llm_pipeline.comm import Header, Op
    from llm_sampler import CachedForward, sample

    torch.set_num_threads(1)
    all_cpus = os.sched_getaffinity(0)
    stage = load_stage(args.model, args.parts, timeout=600, pin_cpus=args.pin)
    link = stage.link
    assert link is not None
    # wall-clock (start, end) of every call of this rank's part
    spans: list[tuple[float, float]] = []
    run_part = stage.run

    def recorded(*a: object, **kw: object) -> torch.Tensor:
        start = time.time()
        out = run_part(*a, **kw)  # type: ignore[arg-type]
        spans.append((start, time.time()))
        return out

    stage.run = recorded  # type: ignore[method-assign]

    # how much two processes slow each other down on this machine right now
    matmul_seconds()
    dist.barrier()
    together = statistics.median(matmul_seconds() for _ in range(5))
    dist.barrier()
    alone = statistics.median(matmul_seconds() for _ in range(5)) if stage.rank == 0 else 0.0
    dist.barrier()

    hops = {}
    for B, T in HOP_SHAPES:  # ping-pong before the pipeline starts serving
        x = torch.randn(B, T, HIDDEN)
        times = []
        for _ in range(args.hops):
            start = time.perf_counter()
            if stage.rank == 0:
                link.send(1, Header(Op.FORWARD, 0, B, T), x)
                link.recv_header(1)
                link.recv(1, (B, T, HIDDEN), x.dtype, "ping")
            else:
                link.recv_header(0)
                y = link.recv(0, (B, T, HIDDEN), x.dtype, "ping")
                link.send(0, Header(Op.FORWARD, 0, B, T), y)
            times.append(time.perf_counter() - start)
        hops[f"{B}x{T}"] = statistics.median(times) / 2
    link.flush()
    if stage.rank != 0:
        stage.serve(idle_timeout=3600)
        stage.close()
        print(json.dumps({"spans": spans}))
        return

    ids = torch.randint(1, VOCAB, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    full = load_part(args.model)
    outputs: dict[str, torch.Tensor] = {}
    with Pipeline(stage) as pipe:

        def job(config: str, new: int) -> Callable[[], None]:
            """Greedy generation of `new` tokens for the batch in one configuration."""

            def run() -> None:
                if config.startswith("1 process"):
                    pinned = os.sched_getaffinity(0)
                    os.sched_setaffinity(0, all_cpus)  # the anchors may use every core
                    torch.set_num_threads(2 if "2 threads" in config else 1)
                    try:
                        forward = CachedForward(IncrementalPart(full))
                        out = sample(forward, ids, new, temperature=0)
                    finally:
                        torch.set_num_threads(1)
                        os.sched_setaffinity(0, pinned)
                else:
                    pipe.micro_batches = int(config.split("M=")[1])
                    out = generate(pipe, ids, new, temperature=0)
                outputs[f"{config}|{new}"] = out

            return run

        configs = ["1 process, 1 thread", "1 process, 2 threads"]
        configs += [f"2 stages, M={m}" for m in MICRO_BATCHES]
        runs = {f"{c}|{n}": job(c, n) for c in configs for n in (1, args.new)}
        windows = timed(runs, args.rounds)
    final = [o for k, o in outputs.items() if k.endswith(f"|{args.new}")]
    same = all(torch.equal(o, final[0]) for o in final)
    specs = [str(s) for s in stage.specs]
    stage.close()
    result = {
        "windows": windows,
        "configs": configs,
        "hops": hops,
        "same": same,
        "specs": specs,
    }
    result |= {"spans": spans, "slowdown": together / alone}
    print(json.dumps(result))


def overlap(window: tuple[float, float], a: list[list[float]], b: list[list[float]]) -> float:
    """Share of `window` in which a span of `a` and a span of `b` both run."""
    start, end = window
    a = [(max(s, start), min(e, end)) for s, e in a if e > start and s < end]
    b = [(max(s, start), min(e, end)) for s, e in b if e > start and s < end]
    both = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
    return both / (end - start)


def launch(args: argparse.Namespace, model: Path, parts: str, pin: bool) -> dict:
    """Run the 2 ranks; rank 0's result with rank 1's spans merged in."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env |= {"RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env |= {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        argv = [
            sys.executable,
            __file__,
            "--rank",
            "--model",
            str(model),
            "--parts",
            parts,
        ]
        argv += [f"--{k}={getattr(args, k)}" for k in ("rounds", "batch", "prompt", "new")]
        argv += [f"--hops={args.hops}", *(["--pin"] if pin else [])]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(argv, env=env, text=True, **pipes))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a rank failed (exit {p.returncode}):\n{err[-3000:]}")
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    result["spans1"] = json.loads(outs[1][0].strip().splitlines()[-1])["spans"]
    return result


def report(args: argparse.Namespace, res: dict, load: tuple[list[str], list[str]], pin: bool) -> None:
    B, T, N = args.batch, args.prompt, args.new
    med = {k: statistics.median(e - s for s, e in w) for k, w in res["windows"].items()}
    load_before, load_after = load
    print()
    if pin:
        print("### Each rank pinned to its own core (`pin_cpus=True`, `--pin-cpus`; the anchors may use both)")
    else:
        print("### Ranks not pinned (the default)")
    print()
    print(f"loadavg before: {' '.join(load_before)}, after: {' '.join(load_after)}; rounds: {args.rounds} (median, "
          "configurations interleaved); 1 torch thread per process unless noted. 2-process slowdown "
          f"(a matmul loop on both ranks at once vs on one): {res['slowdown']:.2f} (1.0 = two free cores, "
          "2.0 = one core's worth between them)")  # fmt: skip
    print()
    print(f"Greedy generation (llm_sampler, KV-cached) for a batch of {B} prompts x {T} tokens; stages "
          f"`{','.join(res['specs'])}` (auto split by bytes); M = micro-batches per forward. prefill = "
          f"generating 1 token ({B * T} prompt tokens / s); decode = the {N - 1} further tokens per row "
          f"(difference of the two medians); total = {B * N} new tokens / wall time of the whole generation; "
          "both computing = share of the wall time in which both ranks ran their part at once (prefill / total):")  # fmt: skip
    print()
    print("| configuration | prefill tok/s | decode tok/s | total tok/s | total vs 1 process, 1 thread "
          "| total vs 1 process, 2 threads | both computing |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    anchor1, anchor2 = (med[f"1 process, {t}|{N}"] for t in ("1 thread", "2 threads"))
    for config in res["configs"]:
        t1, tn = med[f"{config}|1"], med[f"{config}|{N}"]
        decode = f"{B * (N - 1) / (tn - t1):.0f}" if tn > t1 else "n/a"
        both = "-"
        if config.startswith("2 stages"):
            shares = [
                statistics.median(overlap(w, res["spans"], res["spans1"]) for w in res["windows"][f"{config}|{n}"])
                for n in (1, N)
            ]  # fmt: skip
            both = f"{shares[0]:.0%} / {shares[1]:.0%}"
        print(f"| {config} | {B * T / t1:.0f} | {decode} | {B * N / tn:.1f} | {anchor1 / tn:.2f} | "
              f"{anchor2 / tn:.2f} | {both} |")  # fmt: skip
    assert res["same"], "configurations generated different tokens"
    print()
    print("Every configuration generated the same tokens.")
    print()
    print(f"Per hop of hidden states (B, T, {HIDDEN}) fp32 between the 2 processes (gloo over localhost TCP, "
          f"header + payload as a stage sends them; median of {args.hops} round trips / 2):")  # fmt: skip
    print()
    print("| B x T | MB | per hop ms | MB/s |")
    print("|---|---|---|---|")
    for shape, sec in res["hops"].items():
        b, t = map(int, shape.split("x"))
        mb = b * t * HIDDEN * 4 / 1e6
        print(f"| {b} x {t} | {mb:.3f} | {sec * 1e3:.3f} | {mb / sec:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--hops", type=int, default=200)
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--parts", help=argparse.SUPPRESS)
    p.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank_main(args)
        return
    print(
        f"## llm_pipeline: 2 stages on one machine (random Qwen2: hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, fp32)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        for pin in (False, True):
            before = Path("/proc/loadavg").read_text().split()[:3]
            res = launch(args, Path(tmp) / "sep", "auto", pin)
            after = Path("/proc/loadavg").read_text().split()[:3]
            report(args, res, (before, after), pin)


if __name__ == "__main__":
    main()
