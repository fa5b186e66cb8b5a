"""tokenizer.json and tokenizer_config.json from a GGUF model's metadata, as transformers builds them.

Equals transformers' ``integrations/gguf/gguf_tokenizer_mapping.py`` for byte-level BPE vocabularies
(``tokenizer.ggml.model == "gpt2"``: Qwen2/Qwen3, Llama 3, SmolLM): the BPE model of
``GPT2Tokenizer`` over the file's tokens (re-spelled in the byte alphabet where needed) and merges,
GPT-2's byte-level pre-tokenizer or the split regex of the file's ``tokenizer.ggml.pre``; for
sentencepiece vocabularies (``"llama"``: Llama 2, Mistral) ``LlamaTokenizer``'s byte-fallback BPE
with merges rebuilt from the token scores. Control tokens become special added tokens, user-defined
ones plain added tokens, and BOS/EOS are added per ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import SepweightError
from .gguf_reader import GGUFModel

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# tokenizer.ggml.pre -> split regex (transformers' GGUF_PRE_TOKENIZER_SPLITS, the entries for our models);
# any other value keeps GPT-2's byte-level regex, as transformers does (e.g. "smollm", "gpt2")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_SPECIAL = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_tokenizer(model: GGUFModel) -> tuple[str, dict[str, Any]]:
    """``(tokenizer.json text, tokenizer_config.json dict)`` of a GGUF model's vocabulary.

    Example::

        text, tok_config = gguf_tokenizer(open_gguf("model.gguf"))
        Tokenizer.from_str(text).encode("Hello").ids
    """
    try:
        from tokenizers import AddedToken, processors
    except ImportError:
        raise SepweightError(
            "building tokenizer.json needs the tokenizers package: pip install 'llm_sepweight[gguf]'"
        ) from None
    meta = model.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise SepweightError(
            f"{model.paths[0]}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2': Qwen, Llama 3, "
            "SmolLM) and sentencepiece BPE ('llama') vocabularies are converted"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    tok, vocab, allowed = _byte_level(meta) if kind == "gpt2" else _sentencepiece(meta)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in _SPECIAL.items():
        token_id = meta.get(key)
        config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    # control tokens (and the special ones transformers adds from the config) stay whole, as special tokens;
    # a control token outside the byte alphabet is a llama.cpp mislabel that transformers skips
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and allowed(t)]
    control += [t for name in _SPECIAL if (t := config[name]) is not None and t in vocab and t not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise (so does transformers)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and config["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and config["eos_token"] is not None
    config["add_bos_token"], config["add_eos_token"] = add_bos, add_eos
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    # BOS/EOS as transformers' TokenizersBackend.update_post_processor writes them
    bos, eos = config["bos_token"], config["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok.to_str(), config


def _byte_level(meta: dict[str, Any]) -> tuple[Any, dict[str, int], Callable[[str], bool]]:
    """GPT2Tokenizer's BPE over the file's tokens (re-spelled in the byte alphabet where needed) and merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    bpe = models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok, vocab, lambda t: set(t) <= alphabet


def _sentencepiece(meta: dict[str, Any]) -> tuple[Any, dict[str, int], Callable[[str], bool]]:
    """LlamaTokenizer's BPE (byte fallback, Metaspace) with merges rebuilt from the scores, as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [])))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok, vocab, lambda t: True


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first (transformers' ``generate_merges``)."""
    merges = []
    for merge, score in scores.items():
        local = [
            (merge[:i], merge[i:], score) for i in range(1, len(merge)) if merge[:i] in vocab and merge[i:] in vocab
        ]
        merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
