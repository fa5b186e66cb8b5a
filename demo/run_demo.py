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
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
DATA = HERE / "data"
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


# ------------------------------------------------------------------------------------------ step 4
PROMPTS = ["Which continent is France in?", "Once upon a time there was"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt_ids(sep: Path) -> list[list[int]]:
    """Two prompts of different lengths (a left-padded batch), from the model's own tokenizer."""
    if not (sep / "tokenizer.json").is_file():
        return [list(range(10, 22)), list(range(30, 37))]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(sep / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]


def _decode_rate(stream: Iterator[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """(B, n) tokens, seconds to the first token, decode tokens/s: measured as llm-pipeline does."""
    t0 = time.perf_counter()
    steps, t_first = [], 0.0
    for tokens in stream:  # (B,) per step; the first one comes after the prefill
        steps.append(tokens)
        t_first = t_first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    new = torch.stack(steps, dim=1)  # (B, n)
    return new, t_first, (new.shape[1] - 1) * new.shape[0] / (elapsed - t_first)


def run_ranks(cmd: list[str], work: Path, limit: float) -> tuple[str, str]:
    """Run `cmd` as ranks 0 and 1 on localhost, with the variables torchrun would set; return
    rank 0's stdout and stderr. RuntimeError with both ranks' logs if either fails or runs too long.
    """
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    world.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    logs = [(work / f"pipeline.rank{r}.out", work / f"pipeline.rank{r}.err") for r in (0, 1)]
    procs = []
    for r, (out, err) in enumerate(logs):
        env = {**os.environ, **world, "RANK": str(r), "LOCAL_RANK": str(r)}
        with out.open("w") as fo, err.open("w") as fe:
            procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env))
    deadline = time.monotonic() + limit
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0, 0]:
        why = f"exit codes {codes}" if codes else f"still running after {limit:.0f} s"
        tails = "\n".join(f"--- {err}:\n{err.read_text()[-1500:]}" for _, err in logs)
        raise RuntimeError(f"the 2-process pipeline failed ({why}); rank logs:\n{tails}")
    return logs[0][0].read_text(), logs[0][1].read_text()


def pipeline_generate(sep: Path, work: Path, n: int, timeout: float) -> dict[str, Any]:
    """Greedy generation with the model split over 2 processes (gloo on localhost) by the
    llm-pipeline CLI, and the same in this process; both as JSON-ready numbers and token ids."""
    from llm_lazy_qwen import IncrementalPart, load_part
    from llm_sampler import CachedForward, pad_left, sample_stream

    layers = json.loads((sep / "config.json").read_text())["num_hidden_layers"]
    half = max(1, layers // 2)
    specs = [f"b 0-{half}", f"{half}-{layers} e"]
    prompts = _prompt_ids(sep)
    cli = [
        "-m",
        "llm_pipeline.cli",
        "generate",
        "--model",
        str(sep),
        "--parts",
        ",".join(specs),
    ]
    cli += ["--temperature", "0", "--max-new-tokens", str(n), "--ignore-eos", "--json"]
    cli += ["--timeout", str(timeout), "--join-timeout", str(timeout)]
    for p in prompts:
        cli += ["--prompt-ids", " ".join(map(str, p))]
    print(f"stages: rank 0 '{specs[0]}', rank 1 '{specs[1]}'")
    print("the same as: torchrun --nproc-per-node 2 " + shlex.join(cli))
    t0 = time.perf_counter()
    out, err = run_ranks([sys.executable, *cli], work, limit=2 * timeout + 30)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    speed = re.search(r"first token ([\d.]+) s, decode ([\d.]+) tokens/s", err)

    # the reference: the whole model in this process, same prompts, same padding, greedy
    part = load_part(sep, "f")
    pad = part.config.pad_token_id if part.config.pad_token_id is not None else 0
    ids, mask = pad_left(prompts, pad_token_id=pad)  # (B, T), left padding
    warm = CachedForward(IncrementalPart(part))  # its own cache: no prefix reused below
    next(sample_stream(warm, ids, 1, temperature=0, attention_mask=mask))
    fwd = CachedForward(IncrementalPart(part))
    stream = sample_stream(fwd, ids, n, temperature=0, attention_mask=mask)
    single, first_s, decode_tok_s = _decode_rate(stream)
    return {
        "parts": ",".join(specs),
        "prompt_ids": prompts,
        "pipeline_new_ids": [r["new_ids"] for r in rows],
        "single_new_ids": single.tolist(),
        "equal": [r["new_ids"] for r in rows] == single.tolist(),
        "pipeline_first_s": float(speed[1]) if speed else None,
        "pipeline_decode_tok_s": float(speed[2]) if speed else None,
        "pipeline_wall_s": wall,
        "single_first_s": first_s,
        "single_decode_tok_s": decode_tok_s,
    }


# ------------------------------------------------------------------------------------------ step 5
def best_ms(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Best time of each function in ms; runs interleaved, so load from elsewhere hits all alike."""
    times = [[] for _ in fns]
    for _ in range(reps + 1):  # the first round warms up
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e3 * min(t[1:]) for t in times]


def bsm_attention(sep: Path, tokens: int, reps: int) -> dict[str, Any]:
    """llm_bsm_kernel's bundles on layer 0's attention weights against torch doing the same products
    one after another: q/k/v projections (3 items), then the scores QK^T/sqrt(d) per KV head."""
    import llm_sepweight as sw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import llm_bsm_kernel as bk

        w = sw.SepWeights(sep).layer(0)
        wq, wk, wv = (w[f"self_attn.{n}_proj.weight"] for n in "qkv")  # (out, in)
        dtype = wq.dtype if wq.dtype in (torch.float32, torch.bfloat16) else torch.float32
        wq, wk, wv = wq.to(dtype), wk.to(dtype), wv.to(dtype)
        config = json.loads((sep / "config.json").read_text())
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        d = wk.shape[0] // kv_heads
        x = torch.randn(tokens, wq.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.to(dtype)  # (T, hidden): stands in for the layer's input hidden states

        def bundles(
            matmul: Callable[[list[tuple]], list[torch.Tensor]],
        ) -> list[torch.Tensor]:
            q, k, v = matmul([(x, wq, 1.0, "nt"), (x, wk, 1.0, "nt"), (x, wv, 1.0, "nt")])
            qh = q.view(tokens, heads, d).transpose(0, 1)  # (heads, T, d), a view
            kh = k.view(tokens, kv_heads, d)  # (T, kv_heads, d)
            g = heads // kv_heads  # query heads per KV head (GQA)
            items = [(qh[g * i : g * i + g], kh[:, i], d**-0.5, "nt") for i in range(kv_heads)]
            return [q, k, v, *matmul(items)]  # scores: (g, T, T) per KV head

        def one_by_one(items: list[tuple]) -> list[torch.Tensor]:
            return [scale * (a @ b.mT) for a, b, scale, _ in items]

        with torch.no_grad():
            got, want = bundles(bk.bsm), bundles(one_by_one)
            fns = [lambda: bundles(bk.bsm), lambda: bundles(one_by_one)]
            bsm_ms, torch_ms = best_ms(fns, reps)
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want))
    name = str(dtype).removeprefix("torch.")
    info = bk.backend_info()
    return {
        "backend": bk.backend(name),
        "gemm": info[name],
        "fallback_reason": info["fallback_reason"],
        "warnings": [str(c.message) for c in caught],
        "dtype": name,
        "items": 3 + kv_heads,
        "tokens": tokens,
        "max_rel_err": err,
        "equal": err < (2e-2 if dtype == torch.bfloat16 else 1e-5),
        "bsm_ms": bsm_ms,
        "torch_ms": torch_ms,
    }


def show_pipeline(pipe: dict[str, Any]) -> tuple[str, str]:
    """Print step 4's table and tokens; return its summary row."""
    first, decode = pipe["pipeline_first_s"], pipe["pipeline_decode_tok_s"]
    batch, n = len(pipe["prompt_ids"]), len(pipe["single_new_ids"][0])
    print(f"greedy, {batch} prompts x {n} new tokens (decode tok/s counts all prompts)")
    print(f"{'':<34}{'prefill + 1st token s':>22}{'decode tok/s':>14}")
    if decode is not None:  # parsed from llm-pipeline's last stderr line
        print(f"{'2 processes x 1 thread (pipeline)':<34}{first:>22.3f}{decode:>14.1f}")
    single = pipe["single_decode_tok_s"]
    print(f"{'1 process x 2 threads':<34}{pipe['single_first_s']:>22.3f}{single:>14.1f}")
    rows = zip(pipe["prompt_ids"], pipe["pipeline_new_ids"], pipe["single_new_ids"])
    for p, a, b in rows:
        print(f"prompt of {len(p)} tokens -> {a[:10]}... {'==' if a == b else '!='} 1 process")
    wall = pipe["pipeline_wall_s"]
    print(f"2 processes started, joined, generated and exited in {wall:.1f} s")
    print("on one host a pipeline saves memory per process, not time (see llm_pipeline's README)")
    same = "==" if pipe["equal"] else "!="
    speed = "?" if decode is None else f"{decode:.1f}"
    row = f"'{pipe['parts']}': greedy tokens {same} 1 process; "
    return (
        "pipeline (2 processes)",
        row + f"decode {speed} tok/s (1 process: {single:.1f})",
    )


def show_bsm(bsm: dict[str, Any]) -> tuple[str, str]:
    """Print step 5's checks and times; return its summary row."""
    for w in bsm["warnings"]:
        print(f"warning: {w}")
    if bsm["backend"] == "fallback":
        print(f"no compiled kernel: per-item fallback ({bsm['fallback_reason']})")
    print(f"backend for {bsm['dtype']}: {bsm['gemm']}")
    print(
        f"layer 0, {bsm['tokens']} tokens: q/k/v projections, then scores per KV head "
        f"({bsm['items']} products in 2 bundles)"
    )
    ok = "equal to torch" if bsm["equal"] else "DIFFERENT from torch"
    print(f"{ok}: max relative error {bsm['max_rel_err']:.1e}")
    ms, torch_ms = bsm["bsm_ms"], bsm["torch_ms"]
    ratio = ms / torch_ms
    print(f"best of runs: bsm {ms:.3f} ms, torch one by one {torch_ms:.3f} ms ({ratio:.2f}x)")
    same = "==" if bsm["equal"] else "!="
    row = f"{bsm['items']} attention products of layer 0 {same} torch; "
    row += f"{ms:.2f} ms vs {torch_ms:.2f} ms torch ({ratio:.2f}x)"
    return (f"bsm kernel ({bsm['backend']})", row)


# ------------------------------------------------------------------------------------------ step 7
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
