"""Conversion throughput vs `cp`, conversion peak RSS, and mmap layer-load memory (llm_sepweight).

A Qwen2.5-0.5B-shaped random checkpoint (bf16, tied head, one 988 MB model.safetensors, written in
HF's layout) is converted N times, interleaved with `cp` of the same file (the anchor, same run,
both from a warm page cache). Each conversion runs in a fresh process that has just imported torch,
so its memory above that baseline is the conversion's own.

    python benchmarks/bench_sepweight.py [--rounds 5] [--workdir /tmp/llm_bench]
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
from _ckpt import SHAPE, make_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {here!r})
import torch
import llm_sepweight as sw
from _mem import PeakMemory
with PeakMemory() as peak:
    t0 = time.perf_counter()
    sw.convert({src!r}, {dst!r}, progress=False, fsync={fsync}, dtype={dtype!r})
    dt = time.perf_counter() - t0
print(json.dumps(dict(seconds=dt, peak_anon=peak.anon_mb, peak_file=peak.file_mb, peak_total=peak.total_mb,
                      base_anon=peak.base_anon_mb, base_file=peak.base_file_mb)))
"""

LOAD_LAYER = """
import json, sys
sys.path.insert(0, {here!r})
import torch
import llm_sepweight as sw
from _mem import status_kb
w = sw.SepWeights({dst!r})
before = status_kb()
layer = w.layer(5)
touched = [t.view(torch.uint8).max() for t in layer.values()]  # reads every byte, allocates nothing big
after = status_kb()
nbytes = sum(t.numel() * t.element_size() for t in layer.values())
print(json.dumps(dict(anon_kb=after["RssAnon"] - before["RssAnon"], file_kb=after["RssFile"] - before["RssFile"], layer_mb=nbytes / 2**20)))
"""


def run_child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_cp(src: Path, dst: Path, fsync: bool) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        subprocess.run(["sync", str(dst)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/llm_bench")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _mem import loadavg

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(root)
    weights = src / "model.safetensors"
    size_mb = weights.stat().st_size / 1e6
    subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
    largest_mb = SHAPE["vocab"] * SHAPE["hidden"] * 2 / 2**20
    load_before = loadavg()

    rows: dict[str, list] = {k: [] for k in ("cp", "cp+fsync", "convert", "convert+fsync", "convert fp16")}
    mem: list[dict] = []
    dst = root / "sep"
    copy = root / "copy.safetensors"
    for _ in range(args.rounds):
        for fsync in (False, True):
            rows["cp+fsync" if fsync else "cp"].append(timed_cp(weights, copy, fsync))
            copy.unlink()
            shutil.rmtree(dst, ignore_errors=True)
            r = run_child(CHILD.format(here=str(HERE), src=str(src), dst=str(dst), fsync=fsync, dtype=None))
            rows["convert+fsync" if fsync else "convert"].append(r["seconds"])
            mem.append(r)
    for _ in range(max(1, args.rounds // 2)):
        shutil.rmtree(dst, ignore_errors=True)
        rows["convert fp16"].append(
            run_child(CHILD.format(here=str(HERE), src=str(src), dst=str(dst), fsync=False, dtype="fp16"))["seconds"]
        )
    shutil.rmtree(dst, ignore_errors=True)
    run_child(CHILD.format(here=str(HERE), src=str(src), dst=str(dst), fsync=False, dtype=None))
    layer = run_child(LOAD_LAYER.format(here=str(HERE), dst=str(dst)))

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print(f"## llm_sepweight conversion ({size_mb:.0f} MB Qwen2.5-0.5B-shaped bf16 checkpoint, warm page cache)\n")
    print(
        f"loadavg before: {load_before}, after: {loadavg()}; rounds: {args.rounds} (median; cp and convert interleaved)\n"
    )
    print("| what | median s | MB/s | throughput ÷ anchor |")
    print("|---|---|---|---|")
    for k, anchor in (
        ("cp", None),
        ("convert", "cp"),
        ("cp+fsync", None),
        ("convert+fsync", "cp+fsync"),
        ("convert fp16", "cp"),
    ):
        ratio = f"{med[anchor] / med[k]:.2f} (vs {anchor})" if anchor else "anchor"
        print(f"| {k} | {med[k]:.3f} | {size_mb / med[k]:.0f} | {ratio} |")
    peak_anon = statistics.median(m["peak_anon"] - m["base_anon"] for m in mem)
    peak_file = statistics.median(m["peak_file"] - m["base_file"] for m in mem)
    base = statistics.median(m["base_anon"] + m["base_file"] for m in mem)
    peak_total = statistics.median(m["peak_total"] for m in mem)
    print(
        f"\nPeak RSS of a conversion process (median): total {peak_total:.0f} MB; baseline after `import torch` {base:.0f} MB;"
    )
    print(
        f"above baseline: anonymous {peak_anon:.0f} MB, file-backed {peak_file:.0f} MB, "
        f"sum {peak_anon + peak_file:.0f} MB = {(peak_anon + peak_file) / largest_mb:.2f}x the largest tensor "
        f"(embed_tokens, {largest_mb:.0f} MB); goal <= 2x.\n"
    )
    print(
        f"Loading layer 5 with mmap and reading every byte ({layer['layer_mb']:.1f} MB): RssAnon +{layer['anon_kb'] / 1024:.1f} MB, "
        f"RssFile +{layer['file_kb'] / 1024:.1f} MB."
    )


if __name__ == "__main__":
    main()
