"""The main job, end to end, on an embedded default that needs no download.

    hatch run demo                       # a few minutes on 2 CPU cores
    hatch run demo --quick               # a reduced size (what the CI test runs)
    hatch run demo --model PATH_OR_ID    # steps 2-5 on a real HF checkpoint folder or hub id

1. build a small Qwen2-architecture checkpoint (fixed seed) with transformers' save_pretrained and a
   byte-level BPE tokenizer trained with `tokenizers` on demo/data/corpus.txt (ChatML tokens included)
2. convert it with llm_sepweight and show its parts
3. generate with llm_lazy_qwen + llm_sampler, lazily and fully in RAM: tokens/s and peak RSS
4. split it into 2 stages by sepweight specs and generate across 2 processes with llm_pipeline (gloo on
   localhost): the greedy tokens equal the single-process ones; tokens/s of both
5. run llm_bsm_kernel's bundled scaled matmul on one attention layer's products: equal to torch, its
   backend, its time against torch doing the same products one by one
6. fine-tune LoRA adapters with llm_sft (llm_lora_mmap) on demo/data/continents.jsonl: loss curve,
   PEFT-format adapter
7. answer the questions again with the adapter: before / after, fraction correct

Steps 4 and 5 also write their results to WORKDIR/pipeline.json and WORKDIR/bsm.json. The exit status
is 1 when a check fails (pipeline tokens differ, or the 2 processes fail; bsm differs from torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))  # the step modules next to this script (also when imported by the tests)

from step_bsm import bsm_attention, show_bsm  # noqa: E402
from step_pipeline import pipeline_generate, show_pipeline  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ------------------------------------------------------------------------------------------ step 1
def build_checkpoint(path: Path, quick: bool) -> Path:
    """A small random Qwen2 + a BPE tokenizer trained on shipped text, in HF's layout."""
    if (path / "config.json").exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(DATA / "corpus.txt")], trainer)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128 if quick else 256,
        intermediate_size=256 if quick else 512,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        # wider random init than HF's 0.02: random features a small LoRA can learn from in seconds
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ step 3
GEN_WORKER = """
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
from _mem import PeakMemory
from llm_lazy_qwen import IncrementalPart, load_part
from llm_sampler import CachedForward, sample
torch.manual_seed(0)
with torch.inference_mode(), PeakMemory() as peak:
    part = load_part({sep!r}, "f", lazy={lazy})
    fwd = CachedForward(IncrementalPart(part))
    prompt = torch.randint(0, part.config.vocab_size, (1, 16))
    sample(fwd, prompt, 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    new = sample(fwd, prompt, {n}, temperature=0.8, top_p=0.95, generator=torch.Generator().manual_seed(0))
    dt = time.perf_counter() - t0
print(json.dumps(dict(tok_s=new.shape[1] / dt, anon=peak.anon_above_mb, file=peak.file_above_mb)))
"""


def generate_stats(sep: Path, lazy: bool, n: int) -> dict[str, float]:
    """Generation in a fresh process so its peak RSS is its own."""
    code = GEN_WORKER.format(bench=str(HERE.parent / "benchmarks"), sep=str(sep), lazy=lazy, n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def answer(part: torch.nn.Module, tok: object, questions: list[str], max_new: int = 8) -> list[str]:
    """Greedy answers to ChatML questions, cut at <|im_end|>."""
    from llm_lazy_qwen import IncrementalPart
    from llm_sampler import CachedForward, pad_left, sample

    end = tok.token_to_id("<|im_end|>")  # type: ignore[attr-defined]
    prompts = [tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids for q in questions]  # type: ignore[attr-defined]
    ids, mask = pad_left(prompts, tok.token_to_id("<|endoftext|>"))  # type: ignore[attr-defined]
    with torch.inference_mode():
        fwd = CachedForward(IncrementalPart(part))
        new = sample(
            fwd,
            ids,
            max_new,
            temperature=0,
            attention_mask=mask,
            stop_tokens=[end],
            pad_token_id=end,
        )
    out = []
    for row in new.tolist():
        row = row[: row.index(end)] if end in row else row
        out.append(tok.decode(row).strip())  # type: ignore[attr-defined]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        help="HF checkpoint folder or hub id for steps 2-5 (default: build a small Qwen2)",
    )
    ap.add_argument("--workdir", default="demo_out", help="where checkpoints and outputs go")
    ap.add_argument("--quick", action="store_true", help="a reduced size (CI)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    import llm_sepweight as sw
    from llm_sepweight.cli import info_text

    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str]] = []
    t_all = time.perf_counter()

    print("== 1. checkpoint", flush=True)
    src = args.model or str(build_checkpoint(work / "hf-qwen2-small", args.quick))
    print(f"source: {src}")

    print("\n== 2. convert with llm_sepweight", flush=True)
    sep = work / "sep"
    t0 = time.perf_counter()
    sw.convert(src, sep)
    print(info_text(sep))
    summary.append(
        (
            "convert",
            f"{time.perf_counter() - t0:.1f} s, {len(sw.SepWeights(sep).manifest.files)} part files",
        )
    )

    print("\n== 3. generate (llm_lazy_qwen + llm_sampler)", flush=True)
    n = 16 if args.quick else 64
    stats = {mode: generate_stats(sep, mode == "lazy", n) for mode in ("in RAM", "lazy")}
    print(f"{'mode':<8}{'tokens/s':>10}{'peak RSS above baseline: anon / file MB':>42}")
    for mode, s in stats.items():
        print(f"{mode:<8}{s['tok_s']:>10.1f}{s['anon']:>30.1f} / {s['file']:.1f}")
        summary.append(
            (
                f"generate ({mode})",
                f"{s['tok_s']:.1f} tok/s, peak RSS +{s['anon']:.0f} MB anon / +{s['file']:.0f} MB file",
            )
        )

    print("\n== 4. pipeline over 2 processes (llm_pipeline)", flush=True)
    try:
        pipe = pipeline_generate(sep, work, 8 if args.quick else 32, timeout=60.0)
    except RuntimeError as e:
        print(f"llm_pipeline step FAILED: {e}")
        summary.append(("pipeline (2 processes)", "FAILED (see step 4)"))
        failed = True
    else:
        (work / "pipeline.json").write_text(json.dumps(pipe, indent=1))
        summary.append(show_pipeline(pipe))
        failed = not pipe["equal"]

    print("\n== 5. bundled scaled matmul (llm_bsm_kernel)", flush=True)
    bsm = bsm_attention(sep, 64 if args.quick else 256, reps=20 if args.quick else 50)
    (work / "bsm.json").write_text(json.dumps(bsm, indent=1))
    summary.append(show_bsm(bsm))
    failed = failed or not bsm["equal"]
    if args.model:
        return _print_summary(summary, t_all, failed)

    print("\n== 6. fine-tune LoRA with llm_sft", flush=True)
    from llm_lazy_qwen import load_part
    from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
    from llm_sft import (
        load_tokenizer,
        prepare_dataset,
        read_records,
        sft,
        steps_per_epoch,
        warmup_cosine,
        write_loss_log,
    )

    tok, _ = load_tokenizer(sep)
    records = read_records(DATA / "continents.jsonl")
    questions, truths = records["instructions"], records["responses"]
    part = load_part(sep, "f", lazy=True, dtype=torch.float32).eval()
    shown = questions[:: max(1, len(questions) // 6)][:6]
    before = answer(part, tok, questions)
    ds = prepare_dataset(sep, **records, max_seq_len=64)
    apply_lora(part, "all-linear", r=16, lora_alpha=32)
    params = mark_only_lora_trainable(part)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    epochs = args.epochs or (3 if args.quick else 15)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=steps_per_epoch(len(ds), 8) * epochs)
    t0 = time.perf_counter()
    log = sft(
        part,
        ds,
        opt,
        batch_size=8,
        epochs=epochs,
        lr_scheduler=sched,
        max_grad_norm=1.0,
        progress=True,
    )
    train_s = time.perf_counter() - t0
    losses = [s.loss for s in log]
    every = max(1, len(losses) // 8)
    print(
        "loss:",
        " ".join(f"{losses[i]:.3f}" for i in range(0, len(losses), every)),
        f"... {losses[-1]:.3f}",
    )
    adapter = work / "adapter"
    save_adapter(part, adapter)
    files = write_loss_log(log, work)
    print(f"adapter (PEFT format): {adapter}; loss log and curve: {', '.join(str(p) for p in files.values())}")
    summary.append(
        (
            "fine-tune",
            f"{len(log)} steps in {train_s:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}",
        )
    )

    print("\n== 7. answers before / after fine-tuning", flush=True)
    part.eval()
    after = answer(part, tok, questions)
    print(f"{'question':<40}{'before':<20}{'after':<20}truth")
    for q in shown:
        i = questions.index(q)
        print(f"{q:<40}{before[i][:18]:<20}{after[i][:18]:<20}{truths[i]}")
    acc_before = sum(b == t for b, t in zip(before, truths)) / len(truths)
    acc_after = sum(a == t for a, t in zip(after, truths)) / len(truths)
    print(f"correct: before {acc_before:.0%}, after {acc_after:.0%} of the {len(truths)} training questions")
    summary.append(
        (
            "answers correct",
            f"{acc_before:.0%} before -> {acc_after:.0%} after ({len(truths)} training questions)",
        )
    )
    part.close()
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
