"""Demo step 3: chat, streamed token by token from a lazy part (one layer resident), with the model's own template.

The prompt is the model's chat template (``chat_template.jinja`` or ``tokenizer_config.json``) rendered
in jinja2's sandbox by llm_lazy_qwen, as transformers' ``apply_chat_template`` renders it; tokens come
from llm_sampler's ``sample_stream`` and are printed as text by its ``TextStream`` (never half a character).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# a two-turn conversation: the second question only makes sense with the first answer in the context
TURNS = ["What is the capital of France?", "And what is the capital of Italy?"]


def load_chat_tokenizer(folder: Path) -> tuple[Any, list[int]]:
    """The folder's tokenizer and the ids that end an answer (its eos token and config.json's eos ids)."""
    from llm_sft import load_tokenizer

    tok, specials = load_tokenizer(folder)
    eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    ends = [eos] if isinstance(eos, int) else list(eos or [])
    if specials.get("eos_token") and tok.token_to_id(specials["eos_token"]) is not None:
        ends.append(tok.token_to_id(specials["eos_token"]))
    return tok, sorted(set(ends))


def prompt_ids(folder: Path, tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation rendered with the folder's chat template (+ the assistant's turn), as token ids;
    a folder without a template gets the messages as plain text."""
    from llm_lazy_qwen import read_chat_template, read_special_tokens, render_chat

    template = read_chat_template(folder)
    if template is None:  # a base model (--model): the conversation as plain text
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    else:
        text = render_chat(template, messages, add_generation_prompt=True, special_tokens=read_special_tokens(folder))
    return tok.encode(text, add_special_tokens=False).ids  # as apply_chat_template(tokenize=True)


def stream_answer(
    part: torch.nn.Module,
    tok: Any,
    ids: list[int],
    ends: list[int],
    max_new: int,
    echo: bool = True,
) -> tuple[list[int], float]:
    """Greedy answer to a prompt, printed as it is sampled (``echo``); returns (new ids without the end token,
    decode tok/s)."""
    from llm_lazy_qwen import IncrementalPart
    from llm_sampler import CachedForward, TextStream, sample_stream

    text, new = TextStream(tok), []
    t_first = t_last = 0.0
    with torch.inference_mode():
        fwd = CachedForward(IncrementalPart(part))
        for step in sample_stream(fwd, [ids], max_new, temperature=0, stop_tokens=ends):
            t_last = time.perf_counter()
            t_first = t_first or t_last
            token = int(step[0])
            if token in ends:
                break
            new.append(token)
            if echo:
                print(text.push(token), end="", flush=True)
    if echo:
        print(text.flush())
    decode_s = t_last - t_first  # the first token comes after the prefill
    return new, (len(new) - 1) / decode_s if decode_s > 0 else float("nan")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (None: unchanged) inside the block, restored after.

    The demo decodes on 1 thread: a decode step of a small model is many small products, and on this
    2-core box with other work running 2 threads decoded SmolLM2 at 3 tok/s, 1 thread at 14 (each
    product waits for whichever thread was descheduled).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chat(folder: Path, max_new: int, dtype: str, threads: int | None = None) -> dict[str, Any]:
    """The TURNS conversation with a lazy part of ``folder`` on ``threads`` torch threads; the answers
    are streamed to stdout."""
    with torch_threads(threads):
        return _chat(folder, max_new, dtype)


def _chat(folder: Path, max_new: int, dtype: str) -> dict[str, Any]:
    from llm_lazy_qwen import load_part

    tok, ends = load_chat_tokenizer(folder)
    part = load_part(folder, "f", lazy=True, dtype=dtype).eval()
    messages: list[dict[str, str]] = []
    answers, ids_out, rates = [], [], []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        ids = prompt_ids(folder, tok, messages)
        print(f"user> {question}\nassistant> ", end="", flush=True)
        new, tok_s = stream_answer(part, tok, ids, ends, max_new)
        answer = tok.decode(new).strip()
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        ids_out.append(new)
        rates.append(tok_s)
    part.close()
    return {"answers": answers, "ids": ids_out, "tok_s": min(rates), "messages": messages}


def show_chat(result: dict[str, Any], dtype: str) -> tuple[str, str]:
    """Print step 3's footer; return its summary row."""
    print(f"lazy part (one layer resident), {dtype} compute, greedy; decode >= {result['tok_s']:.1f} tok/s")
    first = result["answers"][0].replace("\n", " ")
    return ("chat (lazy, streamed)", f"'{first[:48]}' ... {len(result['answers'])} turns, {result['tok_s']:.1f} tok/s")
