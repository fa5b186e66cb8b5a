"""``llm-lazy-qwen chat MODEL``: chat with a model in the terminal, streamed, with its own chat template.

    llm-lazy-qwen chat Qwen/Qwen2.5-0.5B-Instruct                  # a hub id: downloaded and converted once
    llm-lazy-qwen chat SmolLM2-135M-Instruct.Q4_1.gguf --lazy      # converted once into a folder next to it
    llm-lazy-qwen chat qwen7b-sep --memory-budget 6GiB --adapter my-adapter --temperature 0.7
    echo "Capital of France?" | llm-lazy-qwen chat qwen-sep        # one answer per stdin line, then exit

In the chat: /reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the current answer
(twice at the prompt: quit). Sampling defaults come from the model's generation_config.json as
transformers' generate reads them (greedy when it says nothing); the flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .budget import MAX_TOKENS, size_argument
from .chat_template import CHATML, read_chat_template, read_special_tokens
from .eos import eos_token_ids
from .loading import cache_folder, from_pretrained, load_part
from .part import QwenPart

EXIT_BAD_INPUT = 2


class ChatError(ValueError):
    """A bad argument or model: printed as one line, exit status 2."""


def _template_var(text: str) -> tuple[str, Any]:
    name, eq, value = text.partition("=")
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. enable_thinking=false)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # plain text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-lazy-qwen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat with a model (streamed, its own chat template)", description=__doc__)
    c.formatter_class = argparse.RawDescriptionHelpFormatter
    c.add_argument("model", help="a sepweight folder, an HF checkpoint folder or hub id (owner/name), or a .gguf file")
    c.add_argument("--system", default=None, help="system message (default: the template's own, if any)")
    c.add_argument(
        "--prompt", action="append", default=[], help="answer this and exit (repeat for a scripted conversation)"
    )
    c.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (adapter_config.json + weights)")
    c.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME_OR_FILE",
        help="one of the model's named templates (additional_chat_templates/NAME.jinja, e.g. tool_use; as "
        "apply_chat_template(chat_template=NAME)), or a Jinja file used instead of the model's template",
    )
    c.add_argument(
        "--template-var",
        action="append",
        default=[],
        type=_template_var,
        metavar="NAME=VALUE",
        help="a variable for the chat template, as apply_chat_template(NAME=VALUE); VALUE is JSON (true, 3, "
        '"x") or else text; e.g. enable_thinking=false for Qwen3 (repeat for more)',
    )
    load = c.add_argument_group("loading")
    load.add_argument("--lazy", action="store_true", help="stream layers from disk (one resident)")
    load.add_argument(
        "--memory-budget",
        type=size_argument,
        default=None,
        help="e.g. 6GiB (implies --lazy): layers that fit stay in RAM, the rest streams",
    )
    load.add_argument("--max-context", type=int, default=4096, help="with --memory-budget: tokens the KV cache holds")
    load.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help="with --memory-budget: tokens of the largest forward it makes room for; longer prompts are "
        "prefilled in chunks of this many (each streams the weights again); smaller leaves more to weights",
    )
    load.add_argument("--dtype", default=None, help="compute dtype: bf16, fp16, fp32 (default: stored)")
    load.add_argument("--device", default="cpu")
    load.add_argument(
        "--storage-dtype", default=None, help="when converting: bf16, fp16, fp32 (default: the source's; GGUF bf16)"
    )
    load.add_argument(
        "--cache-dir",
        default=None,
        help="when converting: the folder to convert into (default: next to a .gguf, else "
        "~/.cache/llm_microlibs/sepweight/NAME-HASH); a finished conversion is reused",
    )
    s = c.add_argument_group("sampling (llm_sampler; default: the model's generation_config.json)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    s.add_argument("--max-new-tokens", type=int, default=512, help="per answer")
    c.add_argument("--stats", action="store_true", help="print token counts and seconds per answer (stderr)")
    return p


def model_folder(model: str, cache_dir: str | None, storage_dtype: str | None) -> tuple[Path, bool]:
    """The sepweight folder `model` is (or is converted into), and whether it needs converting."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        return path, False
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ChatError(f"{model}: no such GGUF file")
        if cache_dir is None and os.access(path.parent, os.W_OK):
            return path.with_name(path.stem + ("-sepweight" if storage_dtype is None else f"-{storage_dtype}")), True
    elif not path.exists() and (model.count("/") != 1 or model.startswith(("/", ".", "~"))):
        raise ChatError(f"{model}: no such folder or file, and not a hub id of the form owner/name")
    elif path.is_file():
        raise ChatError(f"{model}: a file that is not a .gguf; give a model folder, a hub id or a .gguf file")
    return (Path(cache_dir) if cache_dir is not None else cache_folder(model, "f", storage_dtype)), True


def _load(args: argparse.Namespace) -> tuple[QwenPart, Path]:
    folder, convert = model_folder(args.model, args.cache_dir, args.storage_dtype)
    how: dict[str, Any] = {"lazy": args.lazy, "dtype": args.dtype, "device": args.device}
    if args.memory_budget is not None:
        how |= {"memory_budget": args.memory_budget, "max_context": args.max_context, "max_tokens": args.max_tokens}
    if convert:  # resumable; a complete folder is not converted again (progress bar on stderr)
        part = from_pretrained(args.model, "f", cache_dir=folder, storage_dtype=args.storage_dtype, **how)
    else:
        part = load_part(folder, "f", **how)
    if args.adapter is not None:
        from llm_lora_mmap import load_adapter

        load_adapter(part, args.adapter)
        part.eval()  # dropout off: the same answer for the same seed
    return part, folder


def _tokenizer(folder: Path) -> Any:
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ChatError(f"{file} not found: chatting needs the model's tokenizer (tokenizer.json)")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


def _template(folder: Path, given: str | None) -> str:
    """The model's default template, one of its named ones, or a Jinja file (a name wins, as in transformers)."""
    if given is None:
        template = read_chat_template(folder)
        if template is None:
            print(f"llm-lazy-qwen: {folder} has no chat template; using ChatML", file=sys.stderr)
        return template or CHATML
    try:
        named = read_chat_template(folder, given)
    except ValueError as e:
        if Path(given).is_file():
            return Path(given).read_text(encoding="utf-8")
        raise ChatError(f"--chat-template {given!r} is no file, nor a template of the model: {e}") from None
    assert named is not None  # a name gives its text or raises
    return named


def _session(args: argparse.Namespace, part: QwenPart, folder: Path) -> Any:
    from llm_sampler import SamplingParams

    from .chat import ChatSession, generation_defaults

    tokenizer = _tokenizer(folder)
    template = _template(folder, args.chat_template)
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    settings = generation_defaults(folder) | {k: v for k, v in given.items() if v is not None}
    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return ChatSession(
        part,
        tokenizer,
        template,
        special_tokens=read_special_tokens(folder),
        template_vars=dict(args.template_var),
        stop_ids=eos_token_ids(folder, tokenizer),
        system=args.system,
        params=SamplingParams(**settings),
        max_new_tokens=args.max_new_tokens,
        generator=torch.Generator().manual_seed(args.seed) if args.seed is not None else None,
    )


def _chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    part, folder = _load(args)
    session = _session(args, part, folder)
    scripted = args.prompt or (None if sys.stdin.isatty() else sys.stdin)
    if scripted is None:
        mode = "lazy" if part.memory_plan is not None or args.lazy else "in RAM"
        print(
            f"llm-lazy-qwen: {folder} ({part.config.num_hidden_layers} layers, {mode}, {part.dtype}); "
            "/reset forgets, /exit quits, Ctrl-C stops an answer",
            file=sys.stderr,
        )
    try:
        return run_chat(session, scripted, stats=args.stats)
    finally:
        part.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-lazy-qwen``; returns the exit status (2 on a bad argument or model)."""
    args = _parser().parse_args(argv)
    try:
        return _chat(args)
    except ImportError as e:
        print(f"llm-lazy-qwen: error: {e}; install the chat extra: pip install 'llm_lazy_qwen[chat]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as e:  # ConfigError, SepweightError, LoraError, a bad sampling flag ...
        print(f"llm-lazy-qwen: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # while loading
        print(file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
