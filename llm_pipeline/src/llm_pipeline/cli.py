"""``llm-pipeline``: generate from a sepweight folder with its parts on several processes or hosts.

    torchrun --nproc-per-node 2 -m llm_pipeline.cli generate --model qwen-sep --prompt "Hello" --lazy
    torchrun --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500 --nproc-per-node 1 \\
        -m llm_pipeline.cli generate --model qwen-sep --prompt-ids "9707 11 1879" --parts "b 0-12,12-24 e"
    llm-pipeline split --model qwen-sep --stages 3          # show the automatic split

Rank 0 prints the results (text, or ids with --json); every other rank serves its part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm_lazy_qwen import eos_token_ids, size_argument
from llm_sampler import pad_left
from llm_sepweight import SepWeights

from .comm import PipelineError
from .generate import generate_stream
from .pipeline import Pipeline
from .spec import part_sizes, stage_specs
from .stage import load_stage


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate through the pipeline (run every rank with torchrun)")
    g.add_argument(
        "--model",
        required=True,
        help="sepweight folder (llm-sepweight convert SRC DST)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt text (needs tokenizer.json in the folder); repeat for a batch",
    )
    g.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        help="prompt token ids, '1 2 3' or '1,2,3'; repeat for a batch",
    )
    g.add_argument(
        "--parts",
        default="auto",
        help="'auto' or one spec per rank: 'b 0-8,8-16,16-24 e'",
    )
    g.add_argument(
        "--balance",
        choices=["bytes", "layers"],
        default="bytes",
        help="how 'auto' splits (default bytes)",
    )
    g.add_argument(
        "--lazy",
        action="store_true",
        help="stream layers from disk (one resident + --prefetch)",
    )
    g.add_argument("--prefetch", type=int, default=1)
    g.add_argument(
        "--memory-budget",
        type=size_argument,
        default=None,
        help="per rank, e.g. 6GiB or 800MB (implies --lazy): layers that fit stay in RAM, the rest "
        "streams, and the process stays within it (llm_lazy_qwen's memory_budget)",
    )
    g.add_argument(
        "--max-context",
        type=int,
        default=4096,
        help="with --memory-budget: tokens per prompt the KV cache is planned for",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="with --memory-budget: tokens per row of the largest forward it plans for (default 512); "
        "a longer prompt is prefilled in chunks of this many, each streaming the weights again",
    )
    g.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: bf16, fp16, fp32 (default: stored)",
    )
    g.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, cuda:LOCAL_RANK)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (torchrun sets 1)",
    )
    g.add_argument(
        "--pin-cpus",
        action="store_true",
        help="give each rank of this host its own share of the CPUs (see README)",
    )
    g.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches per forward (default: #stages)",
    )
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--stop-tokens",
        type=int,
        nargs="*",
        default=None,
        help="default: the model's eos_token_id",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="always generate --max-new-tokens tokens",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds any rank waits for a message before it gives up",
    )
    g.add_argument(
        "--join-timeout",
        type=float,
        default=300.0,
        help="seconds for every rank to join and load its part",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per prompt: prompt_ids, new_ids, text",
    )

    s = sub.add_parser("split", help="print the automatic split of a model into stages")
    s.add_argument("--model", required=True)
    s.add_argument("--stages", type=int, required=True)
    s.add_argument("--balance", choices=["bytes", "layers"], default="bytes")
    return p


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected integers like '1 2 3' or '1,2,3'") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _tokenizer(model: Path) -> Any:
    path = model / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: --prompt needs the tokenizer; give --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--prompt needs the tokenizers package: pip install 'llm_pipeline[text]'") from None
    return Tokenizer.from_file(str(path))


def _generate(args: argparse.Namespace) -> None:
    model = Path(args.model)
    # everything a rank can get wrong is checked on every rank before anyone waits for the others
    if bool(args.prompt) == bool(args.prompt_ids):
        raise ValueError("give the prompts as --prompt TEXT or as --prompt-ids IDS (repeat either for a batch)")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise ValueError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    prompts = [_prompt_ids(t) for t in args.prompt_ids]
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = {}
    if args.memory_budget is not None:
        rows = len(args.prompt) + len(args.prompt_ids)
        budget = {"memory_budget": args.memory_budget, "max_context": args.max_context, "max_batch": rows}
        if args.max_tokens is not None:
            budget["max_tokens"] = args.max_tokens
    stage = load_stage(
        model,
        args.parts,
        balance=args.balance,
        lazy=args.lazy,
        prefetch=args.prefetch,
        device=args.device,
        dtype=args.dtype,
        timeout=args.timeout,
        join_timeout=args.join_timeout,
        pin_cpus=args.pin_cpus,
        **budget,
    )
    if stage.part.memory_plan is not None:
        print(f"llm-pipeline rank {stage.rank}: {stage.part.memory_plan}", file=sys.stderr)
    try:
        if stage.rank == 0:
            # an error inside the with block stops the other ranks too
            with Pipeline(stage, args.micro_batches) as pipe:
                _drive(pipe, args, prompts)
        else:
            stage.serve()
    finally:
        stage.close()


def _drive(pipe: Pipeline, args: argparse.Namespace, prompts: list[list[int]]) -> None:
    """Rank 0: tokenize, generate through the pipeline, print the results and the speed."""
    model, config = Path(args.model), pipe.stage.part.config
    tok = _tokenizer(model) if args.prompt else None
    if tok is not None:
        prompts = [tok.encode(t).ids for t in args.prompt]
    # generation_config.json's eos_token_id (what generate uses), else the config's
    stops = args.stop_tokens if args.stop_tokens is not None else eos_token_ids(model)
    stops = [] if args.ignore_eos else stops
    pad = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    ids, mask = pad_left(prompts, pad_token_id=pad)  # (B, T), left padding
    stream = generate_stream(
        pipe,
        ids,
        args.max_new_tokens,
        attention_mask=mask,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop_tokens=stops,
        generator=torch.Generator().manual_seed(args.seed),
    )
    t0 = time.perf_counter()
    steps, t_first = [], 0.0
    for tokens in stream:  # (B,) per step; the first one comes after the prefill
        steps.append(tokens)
        t_first = t_first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    # (B, n) new tokens
    new = torch.stack(steps, dim=1) if steps else ids.new_empty(len(prompts), 0)
    for prompt, row in zip(prompts, new.tolist()):
        if stops and any(s in row for s in stops):  # cut after the first stop token
            row = row[: min(row.index(s) for s in stops if s in row) + 1]
        text = tok.decode(row) if tok is not None else None
        if args.json:
            print(
                json.dumps({"prompt_ids": prompt, "new_ids": row, "text": text}),
                flush=True,
            )
        else:
            print(text if text is not None else " ".join(map(str, row)), flush=True)
    n, stage = new.shape[1], pipe.stage
    decode = f", decode {(n - 1) * new.shape[0] / (elapsed - t_first):.1f} tokens/s" if n > 1 else ""
    print(
        f"llm-pipeline: {stage.num_stages} stages {[str(s) for s in stage.specs]}, {new.shape[0]} prompts, "
        f"{min(pipe.micro_batches, new.shape[0])} micro-batches: prefill + first token {t_first:.2f} s{decode}",
        file=sys.stderr,
    )


def _split(args: argparse.Namespace) -> None:
    source = SepWeights(args.model)
    specs = stage_specs("auto", args.stages, source, args.balance)
    try:
        sizes = part_sizes(source)
    except ValueError:
        sizes = None
    for i, s in enumerate(specs):
        if sizes is None:
            print(f"stage {i}: {s}")
            continue
        layers = list(s.layers or ())
        total = (sizes[0] if s.begin else 0) + sum(sizes[j + 1] for j in layers) + (sizes[-1] if s.end else 0)
        print(f"stage {i}: {s}  ({total / 2**20:.1f} MiB)")
    print(",".join(str(s) for s in specs))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llm-pipeline``; returns the exit status (1 on a bad input or a failed rank)."""
    args = _parser().parse_args(argv)
    try:
        _generate(args) if args.command == "generate" else _split(args)
    except (PipelineError, ValueError) as e:
        print(f"llm-pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
