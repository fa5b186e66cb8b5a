"""Command line: ``llm-sft train --model M --data F --out DIR`` (LoRA SFT, PEFT adapter + loss log + curve).

llm-sft train --model Qwen/Qwen2.5-0.5B --data alpaca_data_cleaned.json --out my-adapter --lazy
torchrun --nproc-per-node 2 -m llm_sft.cli train --model qwen-sep --data data.jsonl --out my-adapter
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from llm_lazy_qwen import (
    ConfigError,
    QwenConfig,
    QwenPart,
    cache_folder,
    from_pretrained,
    load_part,
    size_argument,
)
from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
from llm_sepweight import SepweightError, SepWeights

from .checkpoint import write_atomic
from .data import TEMPLATES, prepare_dataset, read_records
from .distributed import barrier, init_distributed
from .memory import training_reserve
from .report import write_loss_log
from .schedule import warmup_cosine
from .trainer import sft, steps_per_epoch

ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sft",
        description="Supervised fine-tuning (LoRA) of Qwen models, one layer resident.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a LoRA adapter on instruction data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = t.add_argument_group("model and data")
    io.add_argument(
        "--model",
        required=True,
        help="HF checkpoint folder, hub id (e.g. Qwen/Qwen2.5-0.5B) or sepweight folder",
    )
    io.add_argument(
        "--data",
        required=True,
        help=".jsonl, .json (array) or .csv with instruction / input / output columns",
    )
    io.add_argument(
        "--out",
        required=True,
        help="adapter folder (PEFT format) + loss_log.csv/json + loss_curve.png",
    )
    io.add_argument("--eval-data", help="held-out file in the same layout; its loss is logged")
    io.add_argument(
        "--eval-every",
        type=int,
        help="evaluate every N steps (default: end of each epoch)",
    )
    io.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model's)")
    io.add_argument(
        "--cache-dir",
        help="where an HF checkpoint is converted to sepweight (default: llm_lazy_qwen's cache)",
    )
    io.add_argument(
        "--template",
        choices=TEMPLATES,
        default="auto",
        help="auto: the model's own chat template (as transformers' apply_chat_template), else ChatML",
    )
    io.add_argument("--system-prompt", help="system message (default: the chat template's own; ChatML: none)")
    io.add_argument("--max-seq-len", type=int, default=1024)
    io.add_argument("--instruction-column", default="instruction")
    io.add_argument("--input-column", default="input")
    io.add_argument("--output-column", default="output")
    lora = t.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument("--targets", default=ALL7, help="comma-separated module names, or all-linear")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (per rank)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    opt.add_argument("--seed", type=int, default=0)
    run = t.add_argument_group("memory and run")
    run.add_argument(
        "--lazy",
        action="store_true",
        help="stream layers from disk: one layer resident (lowest memory)",
    )
    run.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="lazy: layers read ahead by a background thread (each one more layer in RAM)",
    )
    run.add_argument(
        "--memory-budget",
        type=size_argument,
        default=None,
        help="e.g. 6GiB or 800MB (implies --lazy): layers that fit stay in RAM, the rest streams, and the "
        "process stays within it (llm_lazy_qwen's memory_budget, planned for --batch-size x --max-seq-len)",
    )
    run.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="fp32",
        help="compute dtype (bf16 is slow on most CPUs)",
    )
    run.add_argument(
        "--head-chunk-size",
        type=int,
        default=8192,
        help="vocabulary rows per head chunk",
    )
    run.add_argument("--device", default="cpu")
    run.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    run.add_argument("--checkpoint-dir", help="default: OUT/checkpoints")
    run.add_argument(
        "--save-every",
        type=int,
        default=100,
        help="checkpoint every N optimizer steps (and at the end)",
    )
    run.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    run.add_argument("--no-progress", action="store_true")
    return parser


def _load_model(args: argparse.Namespace, rank: int) -> tuple[QwenPart, Path]:
    """The whole model as a QwenPart, and the folder holding its tokenizer."""
    src = Path(args.model)
    sepweight = (src / "manifest.json").is_file()  # already a sepweight folder
    # where an HF folder, a hub id or a .gguf file is converted (once); it gets the tokenizer files too
    dst = src if sepweight else Path(args.cache_dir) if args.cache_dir else cache_folder(args.model, "f")

    def load(**kwargs: object) -> QwenPart:
        if sepweight:
            return load_part(src, "f", **kwargs)  # type: ignore[arg-type]
        return from_pretrained(args.model, "f", cache_dir=dst, **kwargs)

    kwargs: dict[str, object] = {
        "device": args.device,
        "dtype": _DTYPES[args.dtype],
        "lazy": args.lazy,
        "prefetch": args.prefetch,
        "head_chunk_size": args.head_chunk_size,
    }
    if not sepweight and rank != 0:
        barrier()  # rank 0 converts first; the others then find the conversion complete
    if args.memory_budget is not None:
        # a training forward is one whole batch with no KV cache to chunk through: the plan's forward is it
        kwargs.update(
            memory_budget=args.memory_budget,
            max_context=args.max_seq_len,
            max_batch=args.batch_size,
            max_tokens=args.max_seq_len,
        )
        # training state on top of the forward the plan counts (LoRA + AdamW, saved inputs, backward);
        # the config of a model not yet converted: from a lazy load, which converts it (once) and reads nothing
        probe = None if sepweight else load(lazy=True)
        kwargs["reserve"] = training_reserve(
            QwenConfig.from_folder(SepWeights(src)) if probe is None else probe.config,
            batch=args.batch_size,
            seq=args.max_seq_len,
            r=args.r,
            targets=_targets(args),
            dtype=_DTYPES[args.dtype],
            head_chunk_size=args.head_chunk_size,
        )
        if probe is not None:
            probe.close()
    part = load(**kwargs)
    if not sepweight and rank == 0:
        barrier()
    # a hub id or a .gguf file: the converted folder holds the tokenizer files (copied, or built from
    # the GGUF metadata), where the hub cache would need the network and a .gguf has no folder of its own
    return part, src if sepweight or src.is_dir() else dst


def _targets(args: argparse.Namespace) -> str | list[str]:
    return args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]


# flags a resumed run must share with the run that wrote the checkpoint (besides sft's own settings)
_RESUME_FLAGS = (
    "model",
    "tokenizer",
    "template",
    "system_prompt",
    "max_seq_len",
    "instruction_column",
    "input_column",
    "output_column",
    "r",
    "alpha",
    "dropout",
    "targets",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "epochs",
    "max_grad_norm",
    "dtype",
)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _resume_settings(args: argparse.Namespace) -> dict[str, object]:
    """What the checkpoint records and a resumed run must match, under the flags' names."""
    flags = {f"--{k.replace('_', '-')}": getattr(args, k) for k in _RESUME_FLAGS}
    flags["--data (sha256)"] = _file_sha256(args.data)
    flags["--eval-data (sha256)"] = _file_sha256(args.eval_data) if args.eval_data else None
    return flags


def train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed(args.device)
    torch.manual_seed(args.seed)  # LoRA init, dropout
    part, tok_dir = _load_model(args, rank)
    if part.memory_plan is not None and rank == 0:
        print(f"llm-sft: {part.memory_plan}", file=sys.stderr)
    tokenizer = args.tokenizer or tok_dir
    columns = {
        "instruction_column": args.instruction_column,
        "input_column": args.input_column,
        "output_column": args.output_column,
    }
    common = {
        "max_seq_len": args.max_seq_len,
        "template": args.template,
        "system_prompt": args.system_prompt,
    }
    dataset = prepare_dataset(tokenizer, **read_records(args.data, **columns), **common)
    eval_dataset = (
        prepare_dataset(tokenizer, **read_records(args.eval_data, **columns), **common) if args.eval_data else None
    )

    targets = _targets(args)
    apply_lora(part, targets, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout)
    params = mark_only_lora_trainable(part)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch(len(dataset), args.batch_size, args.grad_accum, world)
    scheduler = warmup_cosine(optimizer, args.warmup_steps, total, args.min_lr_ratio)
    out = Path(args.out)
    if rank == 0:
        n_lora = sum(p.numel() for p in params)
        s = dataset.stats
        print(
            f"llm-sft: {len(dataset)} examples ({s.truncated} truncated, {s.dropped_too_long + s.dropped_empty} dropped), "
            f"{total} steps, {n_lora / 1e6:.2f}M LoRA parameters, {world} rank(s)",
            file=sys.stderr,
        )
    history = sft(
        part,
        dataset,
        optimizer,
        batch_size=args.batch_size,
        epochs=args.epochs,
        grad_accum_steps=args.grad_accum,
        lr_scheduler=scheduler,
        eval_dataset=eval_dataset,
        checkpoint_dir=args.checkpoint_dir or out / "checkpoints",
        save_every=args.save_every,
        resume=not args.no_resume,
        max_grad_norm=args.max_grad_norm or None,
        eval_every=args.eval_every,
        seed=args.seed,
        progress=not args.no_progress,
        resume_settings=_resume_settings(args),
    )
    if rank == 0:
        save_adapter(part, out, base_model_name_or_path=args.model)
        config = {k: v for k, v in vars(args).items() if k != "command"}
        config["dataset"] = {
            "examples": len(dataset),
            "truncated": dataset.stats.truncated,
            "dropped": dataset.stats.dropped_too_long + dataset.stats.dropped_empty,
        }
        write_atomic(out / "train_config.json", (json.dumps(config, indent=1) + "\n").encode())  # before the plot
        paths = write_loss_log(history, out)
        last = history[-1] if history else None
        summary = (
            f"final loss {last.loss:.4f}"
            + (f", eval loss {last.eval_loss:.4f}" if last and last.eval_loss is not None else "")
            if last
            else "no steps"
        )
        print(
            f"llm-sft: {summary}; adapter in {out}, loss log {paths['csv'].name}"
            + (f" / {paths['png'].name}" if "png" in paths else " (no curve: see the message above)"),
            file=sys.stderr,
        )
    barrier()
    part.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return train(args)
    except (ValueError, TypeError, FileNotFoundError, ConfigError, SepweightError) as e:
        print(f"llm-sft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
