"""A memory budget vs the page cache, in a box smaller than the model (llm_lazy_qwen's ``memory_budget``).

A Qwen2.5-1.5B-shaped random bf16 model with an untied head (3.55 GB, built once under ``--work``) is
decoded in a ``../shared/tools/memlimit BOX`` (a memory cgroup that charges the page cache) with its
files evicted first, by these children, one at a time:

- ``r``: the reference, ``load_part(sep, lazy=True)`` with no limit (the model stays in the page cache);
- ``lazy``: ``load_part(sep, lazy=True)`` in the box: mmap streaming, the page cache decides what stays;
- ``budget``: ``load_part(sep, memory_budget=BUDGET)``: the plan decides, the page cache is dropped as read;
- ``floor``: the disk's cold read bandwidth with the engine's own reader (``SepWeights.read_into`` with
  the same concurrency, page cache dropped as read) over the model's layers.

Decode = median of ``--decode`` single-token steps after a ``--prefill``-token prefill and a warm-up
token; bytes read per token from /proc/self/io ``read_bytes``. floor = bytes the plan must read per
token / the cold bandwidth; for ``lazy`` the whole model is what the page cache makes it read.

    python benchmarks/bench_budget.py [--box 2560M] [--budget 1.75GiB] [--prefill 16] [--decode 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MEMLIMIT = HERE.parent.parent / "shared" / "tools" / "memlimit"
SHAPE = dict(hidden=1536, inter=8960, layers=28, heads=12, kv_heads=2, vocab=151936)  # Qwen2.5-1.5B, untied


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


# ---------------------------------------------------------------------------------------------- children
def child_decode(cfg: dict) -> dict:
    import torch

    from llm_lazy_qwen import load_part

    torch.set_num_threads(cfg["threads"])
    lazy = {"lazy": True}
    kw = lazy if cfg["engine"] in ("lazy", "r") else {"memory_budget": cfg["budget"], "max_context": cfg["max_context"]}
    t0 = time.perf_counter()
    part = load_part(cfg["sep"], "f", dtype="bf16", **kw)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 1000, (1, cfg["prefill"]), generator=torch.Generator().manual_seed(0))
    steps, reads = [], []
    with torch.no_grad():
        cache = part.new_cache()
        t0 = time.perf_counter()
        logits = part(ids, cache=cache, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        tokens = []
        for k in range(cfg["decode"] + 1):  # the first is the warm-up token
            tok = logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
            r0, t0 = read_bytes(), time.perf_counter()
            logits = part(tok, cache=cache)
            if k:
                steps.append(time.perf_counter() - t0)
                reads.append(read_bytes() - r0)
    plan = part.memory_plan
    part.close()
    return {
        "engine": cfg["engine"],
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": statistics.median(steps),
        "decode_all_s": steps,
        "read_per_token": statistics.mean(reads),
        "plan_read_per_token": plan.read_per_token if plan else None,
        "plan": str(plan) if plan else None,
        "tokens": tokens,
        "peak_rss_mib": peak_rss_mib(),
    }


def child_floor(cfg: dict) -> dict:
    """Cold reads of the layers with the engine's reader: READERS concurrent preads, page cache dropped."""
    import torch

    from llm_lazy_qwen.streaming import READERS
    from llm_sepweight import SepWeights

    source = SepWeights(cfg["sep"])
    # with READ_SLACK spare bytes the reads are O_DIRECT, as the engine's
    buf = torch.empty(max(source.nbytes(i) for i in range(source.num_layers)) + source.READ_SLACK, dtype=torch.uint8)
    seconds, total = {READERS: 0.0, 1: 0.0}, {READERS: 0, 1: 0}
    for i in range(source.num_layers):  # alternating, so both see the same disk (it is shared here)
        threads = READERS if i % 2 == 0 else 1
        t0 = time.perf_counter()
        source.read_into(i, buf, threads=threads, drop_cache=True)
        seconds[threads] += time.perf_counter() - t0
        total[threads] += source.nbytes(i)
    return {
        "gbps_readers": total[READERS] / seconds[READERS] / 1e9,
        "gbps_one": total[1] / seconds[1] / 1e9,
        "readers": READERS,
    }


# ---------------------------------------------------------------------------------------------- parent
def build(work: Path) -> Path:
    sep = work / "sep-bf16"
    if (sep / "manifest.json").exists():
        return sep
    sys.path.insert(0, str(HERE))
    from _big_model import build_hf

    import llm_sepweight as sw

    hf = build_hf(work / "hf", SHAPE)
    sw.convert(hf, sep, dtype="bf16", progress=True)
    shutil.rmtree(hf)  # the sepweight folder is all the benchmark reads
    return sep


def run(cfg: dict, box: str, sep: Path) -> dict:
    cmd = [str(MEMLIMIT), box, "--evict", str(sep), "--", sys.executable, __file__, "--child", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in reversed(out.stderr.splitlines()) if ln.startswith("memlimit:")), "")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    res = json.loads(last) if out.returncode == 0 and last.startswith("{") else {"error": out.stderr[-800:]}
    res["box"] = line.removeprefix("memlimit: ")
    m = re.search(r"peak ([0-9.]+) GiB", line)
    res["box_peak_gib"] = float(m[1]) if m else None
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", default="/work/cache/bench_budget")
    p.add_argument("--box", default="2560M")
    p.add_argument("--budget", default="1.75GiB")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=16)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="floor,r,lazy,budget")
    args = p.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(child_floor(cfg) if cfg["engine"] == "floor" else child_decode(cfg)))
        return
    sep = build(Path(args.work))
    model = sum(f.stat().st_size for f in sep.glob("*.safetensors"))
    print(f"Command: `python benchmarks/bench_budget.py {' '.join(sys.argv[1:])}`")
    print(
        f"model {model / 1e9:.2f} GB (Qwen2.5-1.5B shape, untied head, bf16), box {args.box}, budget {args.budget}, "
        f"max_context {args.max_context}, prefill {args.prefill}, decode {args.decode}, {args.threads} threads, "
        f"loadavg {os.getloadavg()[0]:.1f}\n"
    )
    base = {
        "sep": str(sep),
        "budget": args.budget,
        "max_context": args.max_context,
        "prefill": args.prefill,
        "decode": args.decode,
        "threads": args.threads,
    }
    # r: the reference, plain lazy mode with no limit (a box as large as the machine)
    res = {e: run({**base, "engine": e}, "64G" if e == "r" else args.box, sep) for e in args.engines.split(",")}
    print(json.dumps(res, indent=1), file=sys.stderr)
    floor = res.get("floor", {})
    gbps = floor.get("gbps_readers")
    if gbps:
        print(f"cold read: {gbps:.2f} GB/s with {floor['readers']} readers, {floor['gbps_one']:.2f} GB/s with one\n")
    print("| engine | decode s/token | read per token (GB) | floor s/token | decode / floor | box peak | tokens |")
    print("|---|---|---|---|---|---|---|")
    for e in ("r", "lazy", "budget"):
        r = res.get(e)
        if r is None:
            continue
        if "error" in r:
            print(f"| {e} | failed: {r['error'][-200:]!r} | | | | {r['box']} | |")
            continue
        must = r["plan_read_per_token"] if r["plan_read_per_token"] is not None else (model if e == "lazy" else 0)
        fl = must / 1e9 / gbps if gbps else float("nan")
        ratio = f"{r['decode_s'] / fl:.2f}" if fl > 0 else "-"
        print(
            f"| {e} | {r['decode_s']:.2f} | {r['read_per_token'] / 1e9:.2f} (must: {must / 1e9:.2f}) | {fl:.2f} | "
            f"{ratio} | {r['box_peak_gib']} GiB | {r['tokens']} |"
        )
    if "budget" in res and res["budget"].get("plan"):
        print(f"\n{res['budget']['plan']}")


if __name__ == "__main__":
    main()
