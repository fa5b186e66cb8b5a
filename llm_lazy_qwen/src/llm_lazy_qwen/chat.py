"""A chat over a whole-model part: the model's own chat template, streamed answers, the history kept.

Each turn renders the whole conversation with the template as transformers'
``apply_chat_template(messages, add_generation_prompt=True)`` does, encodes it without added special
tokens (the template writes them) and samples through llm_sampler's ``sample_stream`` over a
``CachedForward``: the rendered conversation extends the previous turn's, so the KV cache of the
earlier turns is reused and a turn runs only its new tokens. Needs ``pip install 'llm_lazy_qwen[chat]'``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from llm_sampler import CachedForward, SamplingParams, TextStream, sample_stream

from .chat_template import render_chat
from .incremental import IncrementalPart
from .part import QwenPart

PROMPT = ">>> "
COMMANDS = {"/reset": "forget the conversation", "/exit": "quit (also Ctrl-D)"}


class ChatSession:
    """A conversation with a model; ``reply`` streams the answer to a user message and records both.

    Example::

        session = ChatSession(load_part("qwen-sep", "f"), Tokenizer.from_file("qwen-sep/tokenizer.json"),
                              read_chat_template("qwen-sep"), stop_ids=[151645], params=SamplingParams(0))
        for chunk in session.reply("Hi!"):
            print(chunk, end="", flush=True)
    """

    def __init__(
        self,
        part: QwenPart,
        tokenizer: Any,  # a tokenizers.Tokenizer: encode(text, add_special_tokens=...).ids, decode(ids)
        template: str,
        *,
        special_tokens: dict[str, str] | None = None,
        template_vars: dict[str, Any] | None = None,
        stop_ids: Sequence[int] = (),
        system: str | None = None,
        params: SamplingParams | None = None,
        max_new_tokens: int = 512,
        generator: torch.Generator | None = None,
    ) -> None:
        if system is not None:
            _check_utf8(system, "the system message")
        self.tokenizer, self.template, self.system = tokenizer, template, system
        self.special_tokens = dict(special_tokens or {})
        self.template_vars = dict(template_vars or {})  # e.g. {"enable_thinking": False} for Qwen3
        self.stop_ids = tuple(int(t) for t in stop_ids)
        self.params = params or SamplingParams()
        self.max_new_tokens, self.generator = max_new_tokens, generator
        self.forward = CachedForward(IncrementalPart(part))  # KV cache kept across turns
        # the longest sequence the model serves (YaRN stretches it; dynamic NTK has no limit)
        self.max_positions, self.device = part.config.max_positions or sys.maxsize, part.device
        self.messages: list[dict[str, str]] = []
        self.last_prompt_ids: list[int] = []  # what the last turn ran: the conversation, rendered
        self.last_answer_ids: list[int] = []  # the tokens it sampled, without the stop token
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and empty the KV cache."""
        # "" is an empty system message, as apply_chat_template renders it (Qwen2.5's default one is then absent)
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.forward.reset()

    def prompt_ids(self, user: str) -> list[int]:
        """The ids the model sees for the next turn: the conversation plus `user`, with the generation prompt."""
        _check_utf8(user, "the message")
        text = render_chat(
            self.template,
            [*self.messages, {"role": "user", "content": user}],
            True,
            self.special_tokens,
            self.template_vars,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to `user` as text chunks; the turn joins the history when it ends or is interrupted.

        An interrupted answer (KeyboardInterrupt, or ``close()`` on this iterator) is kept as far as it
        was shown; a failed turn (an exception) leaves the history as it was.
        """
        ids = self.prompt_ids(user)  # a template error is raised here, before anything changes
        if len(ids) >= self.max_positions:
            raise ValueError(
                f"the conversation is {len(ids)} tokens and the model serves at most "
                f"{self.max_positions} positions; /reset starts a new one (ChatSession.reset())"
            )
        asked = {"role": "user", "content": user}
        self.messages.append(asked)
        self.last_prompt_ids, self.last_answer_ids = ids, []
        shown: list[str] = []
        try:
            for chunk in self._stream(ids):
                shown.append(chunk)
                yield chunk
        except Exception:
            self.messages.pop()  # as if it was never asked
            raise
        finally:
            if self.messages and self.messages[-1] is asked:  # finished or interrupted
                self.messages.append({"role": "assistant", "content": "".join(shown)})

    def _stream(self, ids: list[int]) -> Iterator[str]:
        p = self.params
        steps = sample_stream(
            self.forward,
            torch.tensor([ids], device=self.device),  # (1, T)
            min(self.max_new_tokens, self.max_positions - len(ids)),  # the answer ends at the model's last position
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            stop_tokens=list(self.stop_ids),
            generator=self.generator,
        )
        text = TextStream(self.tokenizer)  # never splits a multi-byte character
        for step in steps:  # (1,) per token
            token = int(step[0])
            if token in self.stop_ids:
                break
            self.last_answer_ids.append(token)
            chunk = text.push(token)
            if chunk:
                yield chunk
        tail = text.flush()
        if tail:
            yield tail


def _check_utf8(text: str, what: str) -> None:
    """Refuse text a tokenizer cannot take: lone surrogates, e.g. the undecodable bytes of a stdin line
    (Python reads them as U+DC80..U+DCFF, 'surrogateescape')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:  # the bytes that were undecodable
            bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # other lone surrogates (from Python code)
            bad = text[e.start : e.end].encode("utf-8", "backslashreplace")
        raise ValueError(f"{what} is not valid UTF-8 (bytes {bad!r} at character {e.start}); send UTF-8 text") from None


def generation_defaults(folder: str | Path) -> dict[str, Any]:
    """Sampling settings of generation_config.json as transformers' ``generate`` reads them.

    ``do_sample`` false or absent: greedy (``temperature=0``); true: its temperature / top_k (transformers'
    default 50) / top_p / min_p. ``repetition_penalty`` applies either way. Values that switch a processor
    off (top_k 0, top_p 1.0, penalty 1.0) become None, as llm_sampler writes them.
    """
    gen = Path(folder) / "generation_config.json"
    g = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else {}
    out: dict[str, Any] = {"temperature": 0.0, "top_k": None, "top_p": None, "min_p": None}
    if g.get("do_sample"):
        top_k = g.get("top_k", 50)
        top_p = g.get("top_p", 1.0)
        out = {
            "temperature": float(g.get("temperature", 1.0)),
            "top_k": top_k or None,
            "top_p": None if top_p is None or top_p >= 1.0 else top_p,
            "min_p": g.get("min_p"),
        }
    penalty = g.get("repetition_penalty")
    out["repetition_penalty"] = None if penalty in (None, 1.0) else penalty
    return out


def _is_command(line: str) -> bool:
    return line.startswith("/") and len(line.split()) == 1 and line[1:].isalpha()


def run_chat(
    session: ChatSession,
    turns: Iterable[str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stats: bool = False,
) -> int:
    """The chat loop: `turns` (scripted user messages, e.g. stdin lines), or the terminal when None.

    Ctrl-C stops the current answer and returns to the prompt; at the prompt it asks to press it
    again, which quits. Returns the exit status (0).
    """
    out, err = out or sys.stdout, err or sys.stderr
    lines = iter(turns) if turns is not None else None
    if lines is None:
        try:
            import readline  # noqa: F401  # line editing and history for input()
        except ImportError:
            pass
    armed = False  # Ctrl-C was pressed at the prompt once
    while True:
        try:
            line = next(lines, None) if lines is not None else input(PROMPT)
        except EOFError:
            line = None
        except KeyboardInterrupt:
            if armed:
                print(file=out)
                return 0
            armed = True
            print("\n(Ctrl-C again or /exit to quit)", file=err, flush=True)
            continue
        if line is None:  # end of the script, or Ctrl-D
            if lines is None:
                print(file=out)
            return 0
        armed = False
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if _is_command(line.strip()):
            command = line.strip()
            if command == "/exit":
                return 0
            if command == "/reset":
                session.reset()
                print("(conversation cleared)", file=err, flush=True)
            else:
                known = ", ".join(f"{c} ({what})" for c, what in COMMANDS.items())
                print(f"unknown command {command}; the commands are {known}", file=err, flush=True)
            continue
        _answer(session, line, out, err, stats)


def _answer(session: ChatSession, line: str, out: TextIO, err: TextIO, stats: bool) -> None:
    t0 = time.perf_counter()
    stream, note = session.reply(line), ""
    try:
        for chunk in stream:
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        stream.close()  # keeps what was shown in the history
        note = "[answer stopped]"
    except ValueError as e:  # the template refused the messages, or the conversation is too long
        note = f"error: {e}"
    print(file=out, flush=True)  # every answer ends with a newline on stdout
    if note:
        print(note, file=err, flush=True)
    if stats:
        n, seconds = len(session.last_answer_ids), time.perf_counter() - t0
        print(f"[{len(session.last_prompt_ids)} prompt + {n} new tokens, {seconds:.2f} s]", file=err, flush=True)
