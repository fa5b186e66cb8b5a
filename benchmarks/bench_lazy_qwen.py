"""llm_lazy_qwen vs HF transformers in RAM and Accelerate disk offload, side by side in one run.

Qwen2.5-0.5B-shaped random checkpoint, bf16, 2 threads. Each engine runs in its own fresh process
(memory above the `import torch` baseline is the engine's own); engines are interleaved over
`--rounds` rounds and medians are reported.

    python benchmarks/bench_lazy_qwen.py [--rounds 3] [--prefill 512] [--large]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _ckpt import make_checkpoint  # noqa: E402
from _mem import loadavg  # noqa: E402

ENGINES = {
    "hf": "HF transformers, in RAM",
    "accelerate": "Accelerate disk offload (24 layers on disk)",
    "ram": "llm_lazy_qwen, in RAM (lazy=False)",
    "lazy": "llm_lazy_qwen, lazy (defaults: mmap + 2 MiB pages, prefetch=1)",
    "lazy_copy": "llm_lazy_qwen, lazy, stream_mode='copy' (pread into reused buffers), prefetch=1",
}
LARGE = dict(hidden=2048, inter=11008, layers=36, heads=16, kv_heads=2, vocab=151936)  # Qwen2.5-3B-shaped


def run(engine: str, src: Path, sep: Path, work: Path, args: argparse.Namespace, cold: bool = False) -> dict:
    offload = work / "offload"
    if engine == "accelerate":
        shutil.rmtree(offload, ignore_errors=True)
    cfg = dict(
        engine=engine,
        src=str(src),
        sep=str(sep),
        offload=str(offload) if engine == "accelerate" else None,
        threads=2,
        prefill=args.prefill,
        prefill_runs=2,
        decode=args.decode,
        cold=cold,
    )
    out = subprocess.run(
        [sys.executable, str(HERE / "_lazy_child.py"), json.dumps(cfg)], capture_output=True, text=True
    )
    if out.returncode != 0:
        return {"engine": engine, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_read_gbps(folder: Path) -> float:
    """Sequential read bandwidth of this disk after evicting the files (the disk-read floor)."""
    from _lazy_child import evict

    evict(folder)
    total, t0 = 0, time.perf_counter()
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(32 * 2**20):
                total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=12)
    ap.add_argument("--workdir", default="/tmp/llm_bench")
    ap.add_argument("--large", action="store_true", help="also a Qwen2.5-3B-shaped checkpoint (~6 GB), lazy vs in RAM")
    args = ap.parse_args()
    import llm_sepweight as sw

    work = Path(args.workdir)
    src = make_checkpoint(work)
    sep = work / "sep-lazy"
    sw.convert(src, sep, progress=False)
    print("## llm_lazy_qwen vs anchors (Qwen2.5-0.5B-shaped, bf16, 2 threads, warm page cache)\n")
    print(
        f"loadavg before: {loadavg()}; rounds: {args.rounds}; prefill {args.prefill} tokens; decode = median of "
        f"{args.decode} single-token steps with KV cache after a 16-token prompt\n"
    )
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for _ in range(args.rounds):
        for e in ENGINES:
            results[e].append(run(e, src, sep, work, args))
    errors = {e: r[0]["error"] for e, r in results.items() if "error" in r[0]}
    med = {
        e: {
            k: statistics.median(x[k] for x in rs)
            for k in ("decode_s", "prefill_s", "peak_anon_mb", "peak_file_mb", "load_s")
        }
        for e, rs in results.items()
        if e not in errors
    }
    hf = med["hf"]
    hf_mem = hf["peak_anon_mb"] + hf["peak_file_mb"]
    print(
        "| engine | decode s/token | ÷ HF | prefill s | ÷ HF | peak RSS above baseline: anon / file MB | ÷ HF | load s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e, m in med.items():
        mem = m["peak_anon_mb"] + m["peak_file_mb"]
        print(
            f"| {ENGINES[e]} | {m['decode_s']:.3f} | {m['decode_s'] / hf['decode_s']:.2f} | {m['prefill_s']:.2f} | "
            f"{m['prefill_s'] / hf['prefill_s']:.2f} | {m['peak_anon_mb']:.0f} / {m['peak_file_mb']:.0f} | "
            f"{mem / hf_mem:.2f} | {m['load_s']:.1f} |"
        )
    for e, err in errors.items():
        print(f"| {ENGINES[e]} | failed: {err} | | | | | | |")
    base = statistics.median(x["base_mb"] for x in results["hf"])
    print(f"\nBaseline (fresh process after `import torch`): {base:.0f} MB. loadavg after: {loadavg()}")

    # cold page cache: one decode step right after evicting the weight files
    gbps = cold_read_gbps(sep)
    cold = run("lazy", src, sep, work, args, cold=True)
    per_token = (
        sum(p.stat().st_size for p in sep.glob("mid.*.safetensors")) + (sep / "begin.safetensors").stat().st_size
    )
    floor = per_token / (gbps * 1e9)
    if "cold_step_s" in cold:
        print(
            f"\nCold page cache (files evicted with posix_fadvise DONTNEED): lazy decode step {cold['cold_step_s']:.3f} s; "
            f"disk-read floor {floor:.3f} s ({per_token / 1e6:.0f} MB of layers + head at {gbps:.2f} GB/s measured "
            f"cold sequential read) -> {cold['cold_step_s'] / floor:.2f}x the floor"
        )

    if args.large:
        big = make_checkpoint(work, LARGE, name="qwen2.5-3b-shaped")
        big_sep = work / "sep-3b"
        sw.convert(big, big_sep, progress=False)
        small = args.prefill
        args.prefill = 64
        rows = {e: run(e, big, big_sep, work, args) for e in ("ram", "lazy")}  # the default lazy mode
        args.prefill = small
        print("\nLarger model (Qwen2.5-3B-shaped, bf16, 5.8 GB): RSS stays flat in lazy mode")
        print("| engine | decode s/token | peak RSS above baseline: anon / file MB |")
        print("|---|---|---|")
        for e, r in rows.items():
            if "error" in r:
                print(f"| {ENGINES[e]} | failed: {r['error']} | |")
            else:
                print(f"| {ENGINES[e]} | {r['decode_s']:.3f} | {r['peak_anon_mb']:.0f} / {r['peak_file_mb']:.0f} |")


if __name__ == "__main__":
    main()
