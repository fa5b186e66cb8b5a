"""One LoRA SFT optimizer step: llm_sft's layer-wise engine vs HF transformers + PEFT, side by side in one run.

Qwen2.5-0.5B-shaped random checkpoint (bf16 on disk, tied head), batch 4 x 256 tokens (the first 64 of
each row are prompt: label -100), LoRA r=8, lora_alpha=16 on all 7 projections, AdamW.

- ours: llm_sft.LayerwiseEngine on an llm_lazy_qwen part streamed from a sepweight folder
  (``lazy=True, prefetch=0``), fp32 compute (each bf16 layer is upcast while it is resident).
- ours with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment (glibc returns freed temporaries).
- anchor: ``AutoModelForCausalLM.from_pretrained(dtype=float32)`` + ``get_peft_model``, gradient
  checkpointing on (``use_reentrant=False``), ``model(ids, labels=...).loss.backward()``.

Each engine runs in its own fresh process: load, one warm-up step, then ``--steps`` measured steps.
Memory: peak RssAnon / RssFile during a step (sampled every 2 ms by a thread), above the baseline
taken right after ``import torch``; so the anchor's resident fp32 weights count, as do our imports.
Time: wall time of a step (forward + backward + optimizer). Medians over the measured steps and
over ``--rounds`` processes per engine (engines alternate).

    python benchmarks/bench_sft.py [--rounds 1] [--steps 3] [--threads 2] [--shapes 0.5b,1.5b] [--engines hf,ours]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _ckpt import SHAPE, make_checkpoint
from _mem import PeakMemory, loadavg, status_kb

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # name -> (label, shape for _ckpt.make_checkpoint)
    "0.5b": ("Qwen2.5-0.5B", SHAPE),
    "1.5b": (
        "Qwen2.5-1.5B",
        {
            "hidden": 1536,
            "inter": 8960,
            "layers": 28,
            "heads": 12,
            "kv_heads": 2,
            "vocab": 151936,
        },
    ),
}
BATCH, SEQ, PROMPT = 4, 256, 64
ENGINES = {  # name -> (description, engine built by the child, extra environment)
    "hf": ("HF + PEFT, fp32, gradient checkpointing", "hf", {}),
    "ours": ("llm_sft layer-wise, lazy, fp32", "ours", {}),
    "ours-malloc": (
        "llm_sft, same + MALLOC_MMAP_THRESHOLD_=1048576",
        "ours",
        {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    ),
}


# ------------------------------------------------------------------------------------- child side
def _batch():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151936, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def build(engine: str, cfg: dict):
    """``step() -> loss`` running one optimizer step, and what must stay alive."""
    import torch

    ids, labels = _batch()
    if engine == "ours":
        from llm_lazy_qwen import load_part
        from llm_lora_mmap import apply_lora, mark_only_lora_trainable
        from llm_sft import Batch, LayerwiseEngine

        part = load_part(
            cfg["sep"],
            "f",
            lazy=True,
            prefetch=0,
            dtype=torch.float32,
            head_chunk_size=8192,
        )
        apply_lora(part, TARGETS, r=8, lora_alpha=16)
        opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=1e-4)
        engine_ = LayerwiseEngine(part.train())
        batch = Batch(ids, labels, torch.ones_like(ids), torch.arange(SEQ).expand(BATCH, SEQ))

        def step() -> float:
            out = engine_.forward_backward(batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.mean

        return step, (part, opt)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["hf"], dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, (model, opt)


def child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    base = status_kb()
    t0 = time.perf_counter()
    step, _keep = build(ENGINES[cfg["engine"]][1], cfg)
    load_s = time.perf_counter() - t0
    first_loss = step()  # warm-up: page faults, oneDNN kernels, lazy optimizer state
    times, anon, file = [], [], []
    for _ in range(cfg["steps"]):
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        anon.append(peak.anon_mb - base["RssAnon"] / 1024)
        file.append(peak.file_mb - base["RssFile"] / 1024)
    return {
        "times": times,
        "anon_mb": anon,
        "file_mb": file,
        "load_s": load_s,
        "first_loss": first_loss,
    }


# ------------------------------------------------------------------------------------- parent side
def spawn(cfg: dict) -> dict:
    env = dict(os.environ, **ENGINES[cfg["engine"]][2])
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {cfg['engine']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(root: Path, shape: dict | None, name: str) -> tuple[Path, Path]:
    import llm_sepweight as sw

    hf = make_checkpoint(root, shape, name)
    sep = root / f"{name}-sep"
    sw.convert(hf, sep, progress=False)  # resumable: a no-op once complete
    return hf, sep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per engine")
    ap.add_argument(
        "--steps",
        type=int,
        default=3,
        help="measured optimizer steps per process (after one warm-up)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated subset of " + ", ".join(ENGINES),
    )
    ap.add_argument(
        "--shapes",
        default="0.5b",
        help="comma-separated: 0.5b, 1.5b (a larger model: ours stays flat)",
    )
    ap.add_argument(
        "--work",
        default=str(HERE / "_out"),
        help="where the checkpoints are written (kept for re-runs)",
    )
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not set(args.shapes.split(",")) <= set(SHAPES):
        ap.error(f"--shapes takes a comma-separated subset of {list(SHAPES)}, got {args.shapes!r}")
    shapes = [(*SHAPES[k], f"qwen2.5-{k}-shaped") for k in args.shapes.split(",")]
    before = loadavg()
    rows = []
    for label, shape, name in shapes:
        hf, sep = prepare(work, shape, name)
        res: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(args.rounds):
            for engine in engines[:: 1 if r % 2 == 0 else -1]:
                cfg = {
                    "engine": engine,
                    "hf": str(hf),
                    "sep": str(sep),
                    "threads": args.threads,
                    "steps": args.steps,
                }
                res[engine].append(spawn(cfg))
        rows.append((label, res))
    after = loadavg()

    def med(res: list[dict], key: str) -> float:
        return statistics.median(statistics.median(r[key]) for r in res)

    print("## llm_sft: one LoRA SFT optimizer step, layer-wise engine vs HF transformers + PEFT\n")
    print(
        f"Random Qwen2.5-shaped checkpoints (bf16 on disk, tied head); batch {BATCH} x {SEQ} tokens ({PROMPT} prompt "
        f"tokens per row masked), LoRA r=8 / alpha 16 on all 7 projections, AdamW; {args.threads} threads. Each "
        "engine in a fresh process; memory = peak during a step above the `import torch` baseline (sampled every "
        f"2 ms); medians of {args.steps} steps x {args.rounds} process(es) per engine, after one warm-up step."
    )
    command = " ".join(["python benchmarks/bench_sft.py", *sys.argv[1:]])
    print(f"Command: `{command}`")
    print(f"loadavg before: {before}, after: {after} (2 shared cores: timings move by 10-20% between runs).\n")
    print(
        "| model | engine | step s | peak anon MB | peak file MB | peak RSS MB "
        "| RSS ratio (goal <= 0.2) | time ratio (goal <= 1.5) | loss of step 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, res in rows:
        total = {e: med(res[e], "anon_mb") + med(res[e], "file_mb") for e in res}
        t = {e: med(res[e], "times") for e in res}
        for e in engines:
            desc, has_anchor = ENGINES[e][0], "hf" in res
            ratio_m = "anchor" if e == "hf" else f"**{total[e] / total['hf']:.3f}**" if has_anchor else "-"
            ratio_t = "anchor" if e == "hf" else f"**{t[e] / t['hf']:.2f}**" if has_anchor else "-"
            first = statistics.median(r["first_loss"] for r in res[e])
            anon, file = med(res[e], "anon_mb"), med(res[e], "file_mb")
            print(
                f"| {label} | {desc} | {t[e]:.1f} | {anon:.0f} | {file:.0f} | {total[e]:.0f} | {ratio_m} | {ratio_t} "
                f"| {first:.4f} |"
            )
    print(
        "\nPeak RSS = peak anonymous + peak file-backed (each sampled separately: an upper bound). Ours holds the LoRA "
        "state, every layer's input hidden states (L x B x T x H fp32), one upcast layer with its recompute graph and "
        "one (targets x 8192) block of logits; the anchor holds the whole model in fp32 plus full logits. Equal step-1 "
        "losses: both compute the same thing. `MALLOC_MMAP_THRESHOLD_` makes glibc serve allocations >= 1 MB with "
        "mmap and return them on free, instead of keeping freed temporaries in its heap."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
