"""Instruction data -> token ids and labels: the model's chat template / ChatML / Alpaca, truncation, file readers.

An example is ``prompt + response + end token``. Labels are ``-100`` on the prompt (and, once
batched, on padding), so the loss covers the response and its end token only: the model learns
what to answer and when to stop (TRL's completion-only loss; the end token stays in the labels).

Prompt and response are tokenised separately and concatenated, which is what the model sees at
inference (the prompt is encoded, then generation continues from its last token).

With ``template="auto"`` (the default) a model that ships a chat template (``chat_template.jinja``
or ``tokenizer_config.json``) is trained on exactly what that template renders, as transformers'
``apply_chat_template`` does (Qwen2.5's inserts its default system message, Qwen3's an empty think
block): the prompt is the conversation rendered with ``add_generation_prompt=True``, the response
is what the full conversation adds to it, cut after its end token. Without a template the built-in
ChatML is used; its special tokens are inserted by id, so it equals Qwen's template whether or not
the tokenizer registers them as added tokens.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, overload

from tokenizers import Tokenizer

from llm_lazy_qwen import read_chat_template, read_special_tokens, render_chat

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TEMPLATES = ("auto", "chatml", "alpaca")

# litgpt's prompts.Alpaca == tloen/alpaca-lora's template
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataWarning(UserWarning):
    """Examples were truncated or dropped, or look suspicious; the message gives the counts."""


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``labels`` is ``input_ids`` with ``-100`` on the prompt."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PrepareStats:
    """What :func:`prepare_dataset` did with the rows it was given."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0  # response cut to fit max_seq_len (its end token is then lost)
    response_tokens_cut: int = 0
    dropped_too_long: int = 0  # the prompt alone leaves no room for a response token
    dropped_empty: int = 0  # empty response
    dropped_rows: list[int] = field(default_factory=list)


class SFTDataset(Sequence[Example]):
    """Tokenised examples plus the pad id the batches use (padding is masked, never trained on).

    Example::

        ds = prepare_dataset("qwen-folder", ["Say hi"], ["Hi!"], max_seq_len=256)
        ds[0].input_ids, ds[0].labels, ds.pad_id, ds.stats.truncated
    """

    def __init__(
        self,
        examples: Sequence[Example],
        pad_id: int,
        stats: PrepareStats | None = None,
    ) -> None:
        self.examples = list(examples)
        self.pad_id = pad_id
        self.stats = stats or PrepareStats(rows=len(self.examples), kept=len(self.examples))

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> SFTDataset: ...
    def __getitem__(self, i: int | slice) -> Example | SFTDataset:
        if isinstance(i, slice):
            return SFTDataset(self.examples[i], self.pad_id)
        return self.examples[i]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    def __repr__(self) -> str:
        return f"SFTDataset({len(self)} examples, pad_id={self.pad_id})"


# ------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(
    tokenizer: Tokenizer | str | Path,
) -> tuple[Tokenizer, dict[str, str]]:
    """A ``tokenizers.Tokenizer`` and the special tokens (``eos_token``, ``pad_token``, ...) of its ``tokenizer_config.json``.

    Args:
        tokenizer: a Tokenizer, a ``tokenizer.json`` file, or a folder holding one (an HF checkpoint
            or sepweight folder); ``tokenizer_config.json`` next to it is read when present.

    Example::

        tok, specials = load_tokenizer("Qwen2.5-0.5B-Instruct")   # specials: {"eos_token": "<|im_end|>", ...}
    """
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, {}
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json here; give a tokenizers.Tokenizer, a tokenizer.json or its folder"
        )
    return Tokenizer.from_file(str(file)), read_special_tokens(file.parent)


def _special_id(tok: Tokenizer, token: str, why: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise ValueError(
            f"the tokenizer has no {token!r} token, which {why}; use a tokenizer that has it (Qwen's) or another template"
        )
    return token_id


# ------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class _Special:
    token: str


Piece = str | _Special


def _prompt_pieces(template: str, instruction: str, input: str, system: str | None) -> list[Piece]:
    """The prompt as text pieces and special tokens, ending where the model starts to answer."""
    if template == "chatml":  # Qwen's chat template with add_generation_prompt=True
        user = f"{instruction}\n\n{input}" if input else instruction
        pieces: list[Piece] = []
        if system:
            pieces += [_Special(IM_START), f"system\n{system}", _Special(IM_END), "\n"]
        return pieces + [
            _Special(IM_START),
            f"user\n{user}",
            _Special(IM_END),
            "\n",
            _Special(IM_START),
            "assistant\n",
        ]
    text = (
        ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        if input
        else ALPACA_NO_INPUT.format(instruction=instruction)
    )
    return [system + "\n\n" + text] if system else [text]


def _check_types(instructions: Sequence[Any], responses: Sequence[Any], inputs: Sequence[Any] | None) -> None:
    bad: list[str] = []
    for name, column, optional in (
        ("instruction", instructions, False),
        ("response", responses, False),
        ("input", inputs or (), True),
    ):
        rows = [i for i, v in enumerate(column) if not (isinstance(v, str) or (optional and v is None))]
        if rows:
            kinds = sorted({type(column[i]).__name__ for i in rows})
            bad.append(
                f"{len(rows)} non-string {name}(s) ({', '.join(kinds)}) at rows {rows[:5]}{' ...' if len(rows) > 5 else ''}"
            )
    if bad:
        raise TypeError("every instruction, input and response must be a string (input may be None): " + "; ".join(bad))


def _warn(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)


def _tokenizer_folder(tokenizer: Tokenizer | str | Path) -> Path | None:
    if isinstance(tokenizer, Tokenizer):
        return None
    path = Path(tokenizer)
    return path if path.is_dir() else path.parent


def _messages(instruction: str, input: str, system: str | None) -> list[dict[str, str]]:
    user = f"{instruction}\n\n{input}" if input else instruction
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _render_rows(
    jinja: str, rows: list[tuple[str, str, str]], system: str | None, specials: dict[str, str], end_token: str | None
) -> tuple[list[str], list[str], str]:
    """Prompt and response texts of each (instruction, input, response) and the end token they end with.

    The prompt is the conversation rendered with ``add_generation_prompt=True``; the response is what
    rendering the conversation with the assistant's answer adds to it (TRL's prompt-completion split),
    cut after its last end token (what follows, e.g. Qwen's "\\n", is never generated).
    """
    prompts, completions = [], []
    for instruction, input, response in rows:
        messages = _messages(instruction, input, system)
        prompt = render_chat(jinja, messages, True, specials)
        full = render_chat(jinja, [*messages, {"role": "assistant", "content": response}], False, specials)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders a conversation with an answer that does not start with its generation "
                f"prompt (prompt {prompt[-60:]!r}, conversation {full[len(prompt) - 60 : len(prompt) + 20]!r}); "
                "pass template='chatml' or chat_template= with a template that does"
            )
        prompts.append(prompt)
        completions.append(full[len(prompt) :])
    candidates = [end_token] if end_token else [IM_END, specials.get("eos_token"), "<|endoftext|>"]
    end = next((c for c in candidates if c and c in completions[0]), None) or next(c for c in candidates if c)
    cut = []
    for text in completions:
        at = text.rfind(end)
        cut.append(text[: at + len(end)] if at >= 0 else text + end)
    return prompts, cut, end


def prepare_dataset(
    tokenizer: Tokenizer | str | Path,
    instructions: Sequence[str],
    responses: Sequence[str],
    inputs: Sequence[str | None] | None = None,
    max_seq_len: int = 1024,
    template: str = "auto",
    system_prompt: str | None = None,
    end_token: str | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
) -> SFTDataset:
    """Format, tokenise and label instruction data; prompt tokens get label -100.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, a ``tokenizer.json`` or a folder with one.
        inputs: optional extra context per example (Alpaca's "input"); None or "" = none.
        max_seq_len: longest example in tokens. A longer one keeps its prompt and loses the end of
            its response; one whose prompt leaves no room for a response token is dropped.
            Both are counted in a :class:`DataWarning` and in ``dataset.stats``.
        template: ``"auto"`` (default): the model's own chat template (``chat_template.jinja`` or
            ``tokenizer_config.json``, rendered as transformers' ``apply_chat_template``; Qwen2.5's
            adds its default system message when ``system_prompt`` is None), else ChatML.
            ``"chatml"``: the built-in ChatML (``<|im_start|>user ... <|im_end|>``, no system message
            unless given; response ends with ``<|im_end|>``). ``"alpaca"``: litgpt/alpaca-lora
            text, response ends with the tokenizer's eos_token.
        system_prompt: chat: a system message (default: the template's own, ChatML: none);
            Alpaca: a line before the prompt.
        end_token: the token ending each response; default ``<|im_end|>`` for chat templates
            (else the ``eos_token``), the ``eos_token`` of ``tokenizer_config.json`` (else
            ``<|endoftext|>``) for Alpaca.
        pad_token: default the config's ``pad_token``, else ``<|endoftext|>``, else the end token.
        chat_template: Jinja text used instead of the model's template (``template="auto"`` only).

    Example::

        ds = prepare_dataset("Qwen2.5-0.5B", ["Capital of France?"], ["Paris."], max_seq_len=512)
        ds[0].labels      # [-100, ..., -100, <Paris.>, <|im_end|>]
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if chat_template is not None and template != "auto":
        raise ValueError(f"chat_template= is used with template='auto' only, got template={template!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(
            f"max_seq_len must be an integer >= 2 (prompt + at least one response token), got {max_seq_len!r}"
        )
    if len(instructions) != len(responses) or (inputs is not None and len(inputs) != len(instructions)):
        sizes = f"{len(instructions)} instructions, {len(responses)} responses" + (
            f", {len(inputs)} inputs" if inputs is not None else ""
        )
        raise ValueError(f"instructions, responses and inputs must have the same length; got {sizes}")
    if len(instructions) == 0:
        raise ValueError("the dataset is empty: no instructions given")
    _check_types(instructions, responses, inputs)
    tok, specials = load_tokenizer(tokenizer)
    jinja: str | None = None
    if template == "auto":
        folder = _tokenizer_folder(tokenizer)
        jinja = chat_template or (read_chat_template(folder) if folder is not None else None)
        template = "jinja" if jinja else "chatml"

    end: str | None
    if template == "chatml":
        end = end_token or IM_END
        for t in (IM_START, IM_END):
            _special_id(tok, t, "the ChatML template needs")
    elif template == "alpaca":
        end = (
            end_token
            or specials.get("eos_token")
            or ("<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None)
        )
        if end is None:
            raise ValueError(
                "the tokenizer names no eos_token (tokenizer_config.json) and has no <|endoftext|>; pass end_token="
            )
    else:
        end = None  # the template's own, found below

    stats = PrepareStats(rows=len(instructions))
    rows = []
    for i, (_instruction, response) in enumerate(zip(instructions, responses)):
        if not response.strip():
            stats.dropped_empty += 1
            stats.dropped_rows.append(i)
            continue
        rows.append(i)
    if stats.dropped_empty:
        _warn(
            f"{stats.dropped_empty} of {stats.rows} examples have an empty response and were dropped (rows {stats.dropped_rows[:10]})"
        )
    if not rows:
        raise ValueError(f"no example left: all {stats.rows} responses are empty")

    prompt_ids: list[list[int]] = []
    if jinja is not None:
        texts = [(instructions[i], (inputs[i] if inputs else None) or "", responses[i]) for i in rows]
        prompt_texts, answer_texts, end = _render_rows(jinja, texts, system_prompt, specials, end_token)
        end_id = _special_id(tok, end, "ends every response of the chat template")
        encoded = [e.ids for e in tok.encode_batch(prompt_texts + answer_texts, add_special_tokens=False)]
        prompt_ids, answer_ids = encoded[: len(rows)], encoded[len(rows) :]
        for a in answer_ids:  # the tokenizer does not know `end` as one token: end with its id
            if not a or a[-1] != end_id:
                raise ValueError(
                    f"the tokenizer does not encode {end!r} (the chat template's end token) as one token; pass end_token="
                )
    assert end is not None
    end_id = _special_id(tok, end, f"ends every response of the {template} template")
    pad = (
        pad_token
        or specials.get("pad_token")
        or ("<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else end)
    )
    pad_id = _special_id(tok, pad, "pads the batches")
    specials_in_text = [
        i
        for i in rows
        if any(
            s in t
            for s in (IM_START, IM_END, end)
            for t in (
                instructions[i],
                responses[i],
                (inputs[i] if inputs else None) or "",
            )
        )
    ]
    if specials_in_text:
        _warn(
            f"{len(specials_in_text)} examples contain a special token ({IM_START}, {IM_END} or {end}) as text (rows "
            f"{specials_in_text[:10]}); the tokenizer encodes it as that special token"
        )

    if jinja is None:
        # tokenise every text piece in one batch call, then assemble ids per example
        prompts = [
            _prompt_pieces(
                template,
                instructions[i],
                (inputs[i] if inputs else None) or "",
                system_prompt,
            )
            for i in rows
        ]
        texts_ = [p for pieces in prompts for p in pieces if isinstance(p, str)] + [responses[i] for i in rows]
        stream = iter(e.ids for e in tok.encode_batch(texts_, add_special_tokens=False))
        special_ids = (
            {t: _special_id(tok, t, "the template needs") for t in (IM_START, IM_END)} if template == "chatml" else {}
        )
        for pieces in prompts:
            ids: list[int] = []
            for p in pieces:
                ids += [special_ids[p.token]] if isinstance(p, _Special) else next(stream)
            prompt_ids.append(ids)
        answer_ids = [next(stream) + [end_id] for _ in rows]

    examples = []
    too_long: list[int] = []
    for row, prompt, answer in zip(rows, prompt_ids, answer_ids):
        room = max_seq_len - len(prompt)
        if room < 1:
            too_long.append(row)
            continue
        if len(answer) > room:
            stats.truncated += 1
            stats.response_tokens_cut += len(answer) - room
            answer = answer[:room]
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    stats.dropped_too_long = len(too_long)
    stats.dropped_rows = sorted(stats.dropped_rows + too_long)
    stats.kept = len(examples)
    if not examples:
        shortest = min(len(p) for p in prompt_ids)
        raise ValueError(
            f"max_seq_len={max_seq_len} is too small to hold any response: the shortest prompt has {shortest} tokens; "
            f"raise max_seq_len above {shortest}"
        )
    if too_long:
        _warn(
            f"{len(too_long)} of {stats.rows} examples were dropped: their prompt alone fills max_seq_len={max_seq_len} (rows {too_long[:10]})"
        )
    if stats.truncated:
        _warn(
            f"{stats.truncated} of {stats.rows} examples were truncated to max_seq_len={max_seq_len} "
            f"({stats.response_tokens_cut} response tokens cut; they lose their end token)"
        )
    return SFTDataset(examples, pad_id, stats)


# ------------------------------------------------------------------------------------- files
class Records(TypedDict):
    """Columns read from a file, named as :func:`prepare_dataset`'s arguments."""

    instructions: list[Any]
    inputs: list[Any] | None
    responses: list[Any]


def _rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a .jsonl / .json / .csv file and the line (or item) number of each."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            records = list(reader)
        return records, [i + 2 for i in range(len(records))]  # line 1 is the header
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".json" and text.lstrip().startswith("["):  # one JSON array (yahma/alpaca-cleaned's file)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        lines = list(range(len(records)))
    elif suffix in (".jsonl", ".ndjson", ".json"):
        records, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({e}); a .jsonl file holds one JSON object per line"
                ) from None
            lines.append(n)
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json (an array of objects) or .csv")
    not_objects = [n for r, n in zip(records, lines) if not isinstance(r, dict)]
    if not_objects:
        raise ValueError(f"{path}: {len(not_objects)} records are not JSON objects (lines/items {not_objects[:5]})")
    return records, lines


def read_records(
    path: str | Path,
    instruction_column: str = "instruction",
    input_column: str = "input",
    output_column: str = "output",
) -> Records:
    """Read instruction data from a .jsonl, .json (array) or .csv file: the yahma/alpaca-cleaned layout.

    Returns ``{"instructions", "inputs", "responses"}`` (``inputs`` is None when the file has no
    input column), ready for ``prepare_dataset(tokenizer, **read_records(path))``. Values are not
    converted: a non-string field is reported by :func:`prepare_dataset` with its row.

    Example::

        ds = prepare_dataset("Qwen2.5-0.5B", **read_records("alpaca_data_cleaned.json"), max_seq_len=512)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records, lines = _rows(path)
    if not records:
        raise ValueError(f"{path}: holds no records")
    found = sorted({k for r in records for k in r})
    for column in (instruction_column, output_column):
        missing = [n for r, n in zip(records, lines) if column not in r]
        if missing:
            raise ValueError(
                f"{path}: column {column!r} is missing in {len(missing)} of {len(records)} records (lines/items "
                f"{missing[:5]}); the file has columns {found}. Name the columns with instruction_column= / output_column="
            )
    has_input = any(input_column in r for r in records)
    return {
        "instructions": [r[instruction_column] for r in records],
        "inputs": [r.get(input_column) for r in records] if has_input else None,
        "responses": [r[output_column] for r in records],
    }
