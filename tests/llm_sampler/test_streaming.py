"""Streaming text never splits a multi-byte UTF-8 character (toy byte-level tokenizers, no downloads)."""

from __future__ import annotations

import random

import pytest
import torch

from llm_sampler import TextStream, stream_text

TEXT = "Größe: 42 € — 東京 👋🏽 naïve café ∑x² done"


class ByteDecoder:
    """Byte-level tokenizer: token id = one byte, as at the bottom of Qwen's and GPT-2's BPE."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class ChunkDecoder:
    """Tokens are random byte chunks that cut across character boundaries, like BPE merges do."""

    def __init__(self, data: bytes, seed: int) -> None:
        rng = random.Random(seed)
        self.pieces: list[bytes] = []
        self.ids: list[int] = []
        i = 0
        while i < len(data):
            size = rng.randint(1, 5)
            self.ids.append(len(self.pieces))
            self.pieces.append(data[i : i + size])
            i += size

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream_all(decoder, ids: list[int]) -> list[str]:
    stream = TextStream(decoder)
    chunks = [stream.push(i) for i in ids]
    return [c for c in [*chunks, stream.flush()] if c]


def test_byte_tokens_never_split_a_character() -> None:
    chunks = _stream_all(ByteDecoder(), list(TEXT.encode()))
    assert "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)
    assert "👋" in chunks  # a 4-byte character arrives whole, once its last byte is in


@pytest.mark.parametrize("seed", range(10))
def test_chunk_tokens_never_split_a_character(seed: int) -> None:
    decoder = ChunkDecoder(TEXT.encode(), seed)
    chunks = _stream_all(decoder, decoder.ids)
    assert "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)


def test_invalid_trailing_bytes_come_out_at_flush() -> None:
    stream = TextStream(ByteDecoder())
    assert [stream.push(b) for b in b"ok\xe2\x82"] == ["o", "k", "", ""]
    assert stream.flush() == "\ufffd"


def test_stream_text_yields_the_generated_text_without_the_stop_token() -> None:
    script = [*TEXT.encode(), 0]  # byte 0 is the stop token

    def forward(ids: torch.Tensor) -> torch.Tensor:  # greedy follows the script
        return torch.nn.functional.one_hot(torch.tensor([[script[ids.shape[1]]]]), 256).float() * 10

    chunks = list(stream_text(forward, [script[0]], ByteDecoder(), 100, temperature=0, stop_tokens=[0]))
    assert TEXT[0] + "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)


def test_stream_text_is_batch_one() -> None:
    with pytest.raises(
        ValueError,
        match="stream_text streams one prompt; got input_ids with batch size 2",
    ):
        stream_text(lambda ids: ids, [[1], [2]], ByteDecoder(), 3)


def test_stream_text_needs_a_decoder() -> None:
    with pytest.raises(TypeError, match=r"tokenizer must have a decode\(list\[int\]\) -> str method"):
        stream_text(lambda ids: ids, [[1]], object(), 3)  # type: ignore[arg-type]


def test_real_byte_level_bpe_tokenizer() -> None:
    """A tokenizers ByteLevel BPE trained in-process on ASCII: non-ASCII text comes out as byte tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["hello world cafe naive size"] * 10, trainer)
    ids = tok.encode(TEXT).ids
    # "Gr" + the first byte of "ö": the tokenizer really splits characters
    assert "\ufffd" in tok.decode(ids[:3])
    chunks = _stream_all(tok, ids)
    assert "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)
