"""llm_bsm_kernel inside the models, end to end: matmul="torch" (anchor) vs matmul="bsm", same run.

llm_lazy_qwen: the whole Qwen2.5-0.5B-shaped model (benchmarks/_ckpt.py; bf16 stored, in RAM), computing
in bf16 and in fp32. Prefill of 256 and 512 tokens (batch 1, logits of the last position, as generation
asks); decode = median of --decode single-token steps with the KV cache after a 64-token prompt.
llm_lora_mmap: forward + backward of a 4-layer part of the same checkpoint (r=8 on all 7 projections,
256 tokens, input hidden states requiring grad, a middle stage of a training step): LoRA layers and
part on the torch path (anchor), LoRA layers on the bsm path, both on the bsm path.

Both paths live in one process, interleaved over --rounds rounds (which one goes first alternates);
tables show medians. torch.set_num_threads(2), and the kernel's OpenMP pool is the same runtime.
fp32 bundles run on scipy's OpenBLAS: compare `OPENBLAS_CORETYPE=Haswell` (AVX2 kernels, as this
machine's environment sets it) with it unset (AVX-512 kernels): `env -u OPENBLAS_CORETYPE python ...`.

    python benchmarks/bench_bsm_integration.py [--rounds 5] [--decode 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _ckpt import make_checkpoint
from _mem import loadavg

import llm_bsm_kernel as bk
import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable

PATHS = ("torch", "bsm")
LORA_PATHS = {
    "torch": ("torch", "torch"),
    "LoRA bsm": ("torch", "bsm"),
    "LoRA + part bsm": ("bsm", "bsm"),
}


def timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def model_times(model: torch.nn.Module, ids: torch.Tensor, decode: int) -> dict[str, float]:
    """Prefill 256 / 512 (s) and decode (s/token) of one model, without autograd."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for n in (256, 512):
            out[f"prefill {n}"] = timed(lambda n=n: model(ids[:, :n], logits_to_keep=1))
        cache = model.new_cache()
        logits = model(ids[:, :64], cache=cache, logits_to_keep=1)
        steps = []
        for _ in range(decode):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(timed(lambda nxt=nxt: model(nxt, cache=cache)))
            # the timed call's logits are dropped: the same token goes in once more
            logits = model(nxt, cache=cache)
        out["decode"] = statistics.median(steps)
    return out


def lora_step(part: torch.nn.Module, h0: torch.Tensor) -> dict[str, float]:
    """One forward + backward (s) of a LoRA-wrapped part."""
    x = h0.clone().requires_grad_(True)
    t = timed(lambda: (part(x).float() ** 2).mean().backward())
    part.zero_grad(set_to_none=True)
    return {"step": t}


def interleaved(fns: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    names = list(fns)
    # round 0 warms up (page cache, oneDNN primitives, OpenMP pool)
    for r in range(rounds + 1):
        for name in names if r % 2 else names[::-1]:
            result = fns[name]()
            if r:
                runs[name].append(result)
    return {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/llm_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    src = make_checkpoint(work)
    sep = work / "sep"
    sw.convert(src, sep, progress=False)
    print("## llm_bsm_kernel in llm_lazy_qwen and llm_lora_mmap: matmul='torch' vs 'bsm'\n")
    print(
        f"loadavg before: {loadavg()}; {args.threads} threads; rounds: {args.rounds} (medians); "
        f"kernel GEMMs: fp32 {bk.backend('float32')}, bf16 {bk.backend('bfloat16')}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n"
    )
    ids = torch.randint(0, 151936, (1, 512), generator=torch.Generator().manual_seed(0))
    print("Qwen2.5-0.5B-shaped model, in RAM, batch 1 (ratio = bsm / torch; below 1 bsm is faster):\n")
    print("| compute dtype | prefill 256 s: torch / bsm / ratio | prefill 512 s | decode s/token |")
    print("|---|---|---|---|")
    for dtype in ("bf16", "fp32"):
        models = {m: load_part(sep, "f", dtype=dtype, matmul=m) for m in PATHS}
        fns = {m: functools.partial(model_times, models[m], ids, args.decode) for m in PATHS}
        med = interleaved(fns, args.rounds)
        t, b = med["torch"], med["bsm"]
        cells = [f"{t[k]:.3f} / {b[k]:.3f} / **{b[k] / t[k]:.2f}**" for k in ("prefill 256", "prefill 512", "decode")]
        print(f"| {dtype} | " + " | ".join(cells) + " |")
        del models
    print("\nLoRA forward + backward, 4 layers, r=8 on all 7 projections, 256 tokens (s per step):\n")
    print("| compute dtype | " + " | ".join(LORA_PATHS) + " | ratios to torch |")
    print("|---|---|---|---|---|")
    h0 = torch.randn(1, 256, 896, generator=torch.Generator().manual_seed(1))
    # fp32: the bf16 stored weights are cast per matmul (llm_lora_mmap's main case)
    for dtype in ("bf16", "fp32"):
        parts = {}
        for name, (part_mm, lora_mm) in LORA_PATHS.items():
            part = load_part(sep, "0-4", matmul=part_mm)  # stored bf16, zero-copy
            apply_lora(part, r=8, lora_alpha=16, init_lora_weights="gaussian", matmul=lora_mm)
            mark_only_lora_trainable(part)
            parts[name] = part.train()
        x = h0.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        fns = {k: functools.partial(lora_step, parts[k], x) for k in parts}
        med = interleaved(fns, args.rounds)
        t = med["torch"]["step"]
        ratios = " / ".join(f"{med[k]['step'] / t:.2f}" for k in list(LORA_PATHS)[1:])
        times = " | ".join(f"{med[k]['step']:.3f}" for k in LORA_PATHS)
        print(f"| {dtype} | {times} | **{ratios}** |")
    print(f"\nloadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
