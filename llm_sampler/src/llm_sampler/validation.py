"""Up-front checks of user input. Every message names the parameter and says what is valid."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

TokenIds = Tensor | Sequence[int] | Sequence[Sequence[int]]


def check_sampling_params(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
) -> None:
    """Raise `ValueError` for any sampling setting outside its valid range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        msg = f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}"
        raise ValueError(msg)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        msg = f"top_k must be an integer >= 1, or None for no top-k filtering; got {top_k!r}"
        raise ValueError(msg)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        msg = f"top_p must be in (0, 1], or None for no nucleus filtering; got {top_p!r}"
        raise ValueError(msg)
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        msg = f"min_p must be in [0, 1], or None for no min-p filtering; got {min_p!r}"
        raise ValueError(msg)
    if repetition_penalty is not None and not (
        isinstance(repetition_penalty, (int, float)) and math.isfinite(repetition_penalty) and repetition_penalty > 0
    ):
        msg = f"repetition_penalty must be a finite number > 0 (1.0 means no penalty), or None; got {repetition_penalty!r}"
        raise ValueError(msg)


def check_count(name: str, value: int, minimum: int) -> int:
    """Return `value` if it is an integer >= `minimum`, else raise `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return value


StopTokens = Sequence[int | Sequence[int]] | Tensor
Stops = tuple[tuple[int, ...], ...]  # one tuple per stop; a single-token stop is a 1-tuple


def _token_id(value: object, where: str) -> int:
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{where} must be a token id (int), got {type(value).__name__}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"{where} must be a token id (int), got {type(value).__name__}") from err


def _stop_entry(entry: object, i: int) -> tuple[int, ...]:
    """One stop: a token id, or a non-empty sequence of ids that must appear in a row, in order."""
    if isinstance(entry, (str, bytes)):
        msg = (
            f"stop_tokens[{i}] is a {type(entry).__name__}; stop_tokens takes token ids (tokenize the text, or "
            f"use stream_text(..., stop_strings=[...]))"
        )
        raise TypeError(msg)
    if isinstance(entry, Tensor) and entry.ndim == 1:
        entry = entry.tolist()
    if isinstance(entry, Sequence):
        if len(entry) == 0:
            raise ValueError(f"stop_tokens[{i}] is an empty stop sequence; give at least one token id")
        return tuple(_token_id(t, f"stop_tokens[{i}][{k}]") for k, t in enumerate(entry))
    return (_token_id(entry, f"stop_tokens[{i}]"),)


def check_stop_tokens(stop_tokens: StopTokens, pad_token_id: int | None) -> tuple[Stops, int]:
    """Return the stops, each a tuple of ids (1 for a single token), and the pad id (default: the last id of
    the first stop, i.e. the first stop token when it is a single one).

    `[2, [13, 198]]` stops on token 2 or on 13 followed by 198; a 2-D tensor holds one stop sequence per row.
    """
    if isinstance(stop_tokens, Tensor):
        if stop_tokens.dtype.is_floating_point or stop_tokens.dtype.is_complex or stop_tokens.dtype == torch.bool:
            raise TypeError(f"stop_tokens must hold integer token ids, got dtype {stop_tokens.dtype}")
        if stop_tokens.ndim > 2:
            msg = (
                f"a stop_tokens tensor must be 1-D (single-token stops) or 2-D (one stop sequence per row), "
                f"got shape {tuple(stop_tokens.shape)}"
            )
            raise ValueError(msg)
        stop_tokens = stop_tokens.reshape(-1).tolist() if stop_tokens.ndim < 2 else stop_tokens.tolist()
    if isinstance(stop_tokens, (str, bytes)):
        stop_tokens = [stop_tokens]  # reported by _stop_entry
    stops = tuple(_stop_entry(entry, i) for i, entry in enumerate(stop_tokens))
    if any(t < 0 for stop in stops for t in stop):
        shown = [list(stop) if len(stop) > 1 else stop[0] for stop in stops]
        msg = f"stop_tokens must be token ids >= 0, got {shown[0] if len(shown) == 1 else shown}"
        raise ValueError(msg)
    if pad_token_id is None:
        return stops, stops[0][-1] if stops else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        msg = f"pad_token_id must be a token id >= 0 or None (use the first stop token), got {pad_token_id!r}"
        raise ValueError(msg)
    return stops, pad_token_id


def as_token_tensor(name: str, ids: TokenIds) -> Tensor:
    """Turn a tensor or (nested) list of ids into an integer tensor; lists must be rectangular."""
    if isinstance(ids, Tensor):
        tensor = ids
    else:
        try:
            tensor = torch.as_tensor(ids, dtype=torch.long)
        except (ValueError, TypeError) as err:
            msg = f"{name} must be a tensor or a rectangular list of token ids (use pad_left for ragged rows): {err}"
            raise ValueError(msg) from err
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        msg = f"{name} must hold integer token ids, got dtype {tensor.dtype}"
        raise ValueError(msg)
    return tensor.long()


def check_prompt(input_ids: TokenIds, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Return `(input_ids (B, T), attention_mask (B, T) or None)` after checking shapes and left padding."""
    ids = as_token_tensor("input_ids", input_ids)
    if ids.ndim == 1:
        ids = ids[None]  # (1, T)
    if ids.ndim != 2:
        msg = f"input_ids must be 1-D (T,) or 2-D (B, T), got shape {tuple(ids.shape)}"
        raise ValueError(msg)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        msg = f"input_ids is empty (shape {tuple(ids.shape)}); the prompt needs at least one token per row"
        raise ValueError(msg)
    if attention_mask is None:
        return ids, None
    mask = attention_mask[None] if attention_mask.ndim == 1 else attention_mask
    if mask.shape != ids.shape:
        msg = f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}"
        raise ValueError(msg)
    if not bool(((mask == 0) | (mask == 1)).all()):
        msg = "attention_mask must hold only 0 (padding) and 1 (token)"
        raise ValueError(msg)
    mask = mask.to(device=ids.device, dtype=torch.long)
    # Left padding means each row is 0..0 1..1: the mask never falls from 1 back to 0.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        msg = "attention_mask must be left-padded (each row 0...0 1...1); pad prompts on the left, e.g. with pad_left"
        raise ValueError(msg)
    if not bool(mask[:, -1].all()):
        empty = int((mask[:, -1] == 0).nonzero()[0])
        msg = f"row {empty} of attention_mask is all padding; every prompt needs at least one token"
        raise ValueError(msg)
    return ids, mask


def check_logits(logits: object, batch: int, length: int, needed: int, source: str = "forward_func") -> Tensor:
    """Check that `logits` is `(B, k, V)` with `needed <= k <= T` and return it."""
    if not isinstance(logits, Tensor):
        msg = (
            f"{source} must return a logits tensor (B, T, V), got {type(logits).__name__}; for a "
            f"transformers model use transformers_forward(model) or lambda ids: model(ids).logits"
        )
        raise TypeError(msg)
    shape = tuple(logits.shape)
    if logits.ndim != 3 or shape[0] != batch or not 1 <= shape[1] <= length or shape[2] < 1:
        msg = (
            f"{source} must return logits of shape (B, T, V) = ({batch}, {length}, V), or the last k positions "
            f"(B, k, V) with 1 <= k <= T; got {shape} for input_ids of shape ({batch}, {length})"
        )
        raise ValueError(msg)
    if shape[1] < needed:
        msg = (
            f"{source} returned logits for the last {shape[1]} positions but {needed} are needed; return all "
            f"positions (B, T, V) or accept a logits_to_keep= keyword"
        )
        raise ValueError(msg)
    if not logits.dtype.is_floating_point:
        msg = f"{source} must return floating-point logits, got dtype {logits.dtype}"
        raise ValueError(msg)
    return logits


def check_finite(logits: Tensor, source: str = "forward_func") -> None:
    """Reject NaN and +inf logits, and rows that are all -inf (-inf alone is a legitimate "banned token")."""
    if bool(torch.isfinite(logits).all()):
        return  # the common case costs one reduction
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        msg = f"{source} returned NaN or +inf logits; check the model's dtype (fp16 overflow) and its inputs"
        raise ValueError(msg)
    if bool(torch.isneginf(logits).all(dim=-1).any()):
        msg = f"{source} returned a row of logits that is -inf everywhere; at least one token must stay possible"
        raise ValueError(msg)
