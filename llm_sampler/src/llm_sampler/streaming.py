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
from llm_sampler.validation import TokenIds, check_prompt, check_stop_tokens

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
    stop_tokens: Sequence[int] | Tensor = (),
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Sample one prompt (batch 1) and yield its text as it grows; the stop token's text is not yielded.

    Sampling arguments are those of `sample`. Chunks never end inside a multi-byte character; for a
    byte-level tokenizer, joined they equal `tokenizer.decode(generated ids without the stop token)`.

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
    return _texts(tokens, TextStream(tokenizer), set(stops))


def _texts(tokens: Iterator[Tensor], stream: TextStream, stops: set[int]) -> Iterator[str]:
    for step in tokens:
        token = int(step[0])
        if token in stops:
            break
        text = stream.push(token)
        if text:
            yield text
    tail = stream.flush()
    if tail:
        yield tail
