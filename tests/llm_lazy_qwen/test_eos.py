"""eos_token_ids(folder): generation_config.json's eos_token_id (transformers' generate), else the model
config's, plus a given tokenizer's eos_token; the one reader behind the chat and pipeline CLIs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from llm_lazy_qwen import eos_token_ids


class Vocab:
    """A tokenizer as the function uses one: token_to_id."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def write(folder, name, value) -> None:
    (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.mark.parametrize(
    ("gen", "config", "want"),
    [
        ({"eos_token_id": [7, 3]}, {"eos_token_id": 2}, [7, 3]),  # generate's setting wins
        ({"eos_token_id": 7}, {"eos_token_id": [2, 3]}, [7]),
        ({"do_sample": True}, {"eos_token_id": [2, 3]}, [2, 3]),  # no eos there: the config's
        (None, {"eos_token_id": 2}, [2]),
        (None, {}, []),
        (None, None, []),
    ],
)
def test_generation_config_then_config(tmp_path, gen, config, want):
    if gen is not None:
        write(tmp_path, "generation_config.json", gen)
    if config is not None:
        write(tmp_path, "config.json", config)
    assert eos_token_ids(tmp_path) == want


def test_tokenizer_eos_token_added_once(tmp_path):
    write(tmp_path, "generation_config.json", {"eos_token_id": [2]})
    write(tmp_path, "tokenizer_config.json", {"eos_token": {"content": "<|im_end|>"}})
    assert eos_token_ids(tmp_path, Vocab({"<|im_end|>": 9})) == [2, 9]  # the template's end of turn
    assert eos_token_ids(tmp_path, Vocab({"<|im_end|>": 2})) == [2]
    assert eos_token_ids(tmp_path, Vocab({})) == [2]  # a token the tokenizer does not know
    assert eos_token_ids(tmp_path) == [2]  # no tokenizer: generate's ids only (the pipeline CLI)


def test_sepweight_folder_reads_the_manifest_config(sep, tmp_path, monkeypatch):
    """A converted folder's config is manifest.json's copy; no tokenizers package is needed."""
    path, _ = sep("qwen2")
    folder = tmp_path / "m"
    shutil.copytree(path, folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` fails from here on
    assert eos_token_ids(folder) == [2]  # the fixture's eos_token_id
    (folder / "config.json").unlink()  # kept for transformers only
    assert eos_token_ids(folder) == [2]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            '{"eos_token_id": "2"}',
            r"generation_config.json: eos_token_id must be a token id or a list of token ids, got '2'",
        ),
        ('{"eos_token_id": [2, true]}', r"eos_token_id must be a token id or a list of token ids, got \[2, True\]"),
        ('{"eos_token_id": -1}', r"got -1"),
        ('{"eos_token_id": [2,', r"generation_config.json: not valid JSON \(.*\); restore the model's copy"),
        ("[2]", r"generation_config.json: expected a JSON object, got list"),
    ],
)
def test_bad_files_are_named(tmp_path, text, match):
    write(tmp_path, "generation_config.json", text)
    with pytest.raises(ValueError, match=match):
        eos_token_ids(tmp_path)


def test_bad_config_is_named(tmp_path):
    write(tmp_path, "config.json", {"eos_token_id": 2.0})
    with pytest.raises(ValueError, match=r"config.json: eos_token_id must be a token id .*got 2.0"):
        eos_token_ids(tmp_path)
