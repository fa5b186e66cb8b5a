"""Streaming text: turn sampled ids into text chunks that never split a multi-byte UTF-8 character.

Byte-level BPE (Qwen, GPT-2) can end a token in the middle of a character; decoding such a prefix gives a
trailing U+FFFD. `TextStream` decodes a short window of recent ids, releases only the new text, and holds
it back while it ends in U+FFFD (the incremental detokenizer of text-generation-inference and vLLM).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from llm_sampler.forward import ForwardFunc
from llm_sampler.sampling import sample_stream
from llm_sampler.stops import matched_stop, partial_stop
from llm_sampler.validation import Stops, StopTokens, TokenIds, check_prompt, check_stop_tokens

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """Anything with `decode(list[int]) -> str`, e.g. a `tokenizers.Tokenizer` or a transformers tokenizer."""

    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Incremental detokenizer: `push` ids one at a time, get back the text they complete.

    Example:
        >>> stream = TextStream(tokenizer)
        >>> text = "".join(stream.push(t) for t in ids) + stream.flush()
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the decode window starts here; one released chunk of context keeps spaces right
        self._read = 0  # ids before this have been released as text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        released = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(released) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]

    def flush(self) -> str:
        """Release whatever is held back (at the end of generation a trailing U+FFFD is real)."""
        released = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(released) :]


def stream_text(
    forward_func: ForwardFunc,
    input_ids: TokenIds,
    tokenizer: Decoder,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: StopTokens = (),
    stop_strings: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Sample one prompt (batch 1) and yield its text as it grows; the stop's text is not yielded.

    Sampling arguments are those of `sample`. Chunks never end inside a multi-byte character; for a
    byte-level tokenizer, joined they equal `tokenizer.decode(generated ids without the stop)`. Ids that
    may begin a stop sequence are held back until they complete it (then dropped) or cannot.

    `stop_strings` (e.g. `["\\n\\n", "</answer>"]`) stop generation after the first token whose text
    completes one of them, wherever the token boundaries fall; the text from that string on is not
    yielded, and text that may begin one is held back until it cannot.

    Example:
        >>> for chunk in stream_text(forward, tokenizer.encode("Once").ids, tokenizer, 50, temperature=0.8):
        ...     print(chunk, end="", flush=True)
    """
    ids, _ = check_prompt(input_ids, None)
    if ids.shape[0] != 1:
        msg = f"stream_text streams one prompt; got input_ids with batch size {ids.shape[0]} (use sample_stream)"
        raise ValueError(msg)
    if not callable(getattr(tokenizer, "decode", None)):
        msg = f"tokenizer must have a decode(list[int]) -> str method, got {type(tokenizer).__name__}"
        raise TypeError(msg)
    stops, _ = check_stop_tokens(stop_tokens, None)
    strings = _check_stop_strings(stop_strings)
    tokens = sample_stream(
        forward_func,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_tokens=stops,
        generator=generator,
    )
    return _cut_at_strings(_texts(tokens, TextStream(tokenizer), stops), strings)


def _check_stop_strings(stop_strings: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop_strings, str):
        msg = f"stop_strings must be a list of strings, got the string {stop_strings!r}; write [{stop_strings!r}]"
        raise TypeError(msg)
    strings = tuple(stop_strings)
    if not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(strings)!r}")
    return strings


def _texts(tokens: Iterator[Tensor], stream: TextStream, stops: Stops) -> Iterator[str]:
    generated: list[int] = []
    released = 0  # generated[:released] went into the TextStream
    for step in tokens:
        generated.append(int(step[0]))
        if matched_stop(generated, stops):
            break  # the held-back ids were the stop: never shown
        held = partial_stop(generated, stops, len(generated) - released)
        for token in generated[released : len(generated) - held]:
            text = stream.push(token)
            if text:
                yield text
        released = len(generated) - held
    else:  # max_new_tokens reached: a partial stop was only text
        for token in generated[released:]:
            text = stream.push(token)
            if text:
                yield text
    tail = stream.flush()
    if tail:
        yield tail


def _cut_at_strings(chunks: Iterator[str], strings: tuple[str, ...]) -> Iterator[str]:
    """Yield the text before the first stop string; closing `chunks` there ends the sampling."""
    if not strings:
        yield from chunks
        return
    pending = ""  # text not yet yielded: it may begin a stop string
    for chunk in chunks:
        pending += chunk
        found = [i for i in (pending.find(s) for s in strings) if i >= 0]
        if found:
            if min(found):
                yield pending[: min(found)]
            chunks.close()  # type: ignore[attr-defined]  # stops the token stream: no more forwards
            return
        held = max((k for s in strings for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > held:
            yield pending[: len(pending) - held]
            pending = pending[len(pending) - held :]
    if pending:
        yield pending
