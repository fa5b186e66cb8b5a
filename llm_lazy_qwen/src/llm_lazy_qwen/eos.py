"""The token ids that end generation for a model folder: what transformers' ``generate`` stops on.

``generation_config.json``'s ``eos_token_id`` (one id or a list), else the model config's (a sepweight
folder's copy in ``manifest.json``, else ``config.json``); a chat also stops on the tokenizer's
``eos_token`` (the template's end of turn). Plain JSON reads: the tokenizers package is needed only to
look that token up, by the caller who passes a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sepweight import SepWeights

from .chat_template import read_special_tokens


def eos_token_ids(folder: str | Path, tokenizer: Any | None = None) -> list[int]:
    """End-of-sequence ids of the model in `folder` (an HF or sepweight folder); [] when it names none.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (anything with ``token_to_id``): then the id of
            ``tokenizer_config.json``'s ``eos_token`` (e.g. ``<|im_end|>``) is added when missing.

    Example::

        eos_token_ids("qwen-sep")                    # [151645, 151643]: generation_config.json's
        eos_token_ids("qwen-sep", Tokenizer.from_file("qwen-sep/tokenizer.json"))   # + <|im_end|> if absent
    """
    folder = Path(folder)
    gen = folder / "generation_config.json"
    where, eos = str(gen), _read(gen).get("eos_token_id")
    if eos is None:
        where, eos = _model_config(folder)
    ids = _ids(eos, where)
    if tokenizer is not None:
        end = read_special_tokens(folder).get("eos_token")
        end_id = tokenizer.token_to_id(end) if end else None
        if end_id is not None and end_id not in ids:
            ids.append(int(end_id))
    return ids


def _model_config(folder: Path) -> tuple[str, Any]:
    """(where, eos_token_id) of the model config: a sepweight folder's manifest copy, else config.json."""
    if (folder / "manifest.json").is_file():
        return f"{folder / 'manifest.json'} (config)", SepWeights(folder).config.get("eos_token_id")
    config = folder / "config.json"
    return str(config), _read(config).get("eos_token_id")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore the model's copy of this file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _ids(eos: Any, where: str) -> list[int]:
    """eos_token_id as a list: an int, a list of ints or None (none)."""
    if eos is None:
        return []
    items = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
    return list(items)
