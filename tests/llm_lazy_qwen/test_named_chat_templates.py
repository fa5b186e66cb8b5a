"""Named chat templates (``additional_chat_templates/NAME.jinja``, transformers 5's layout): read and rendered
as transformers' ``apply_chat_template(chat_template=NAME)``, and picked in the chat with ``--chat-template NAME``.

The tokenizer is saved by transformers itself (``tokenizer.chat_template = {...}; save_pretrained``), the
model converted with llm_sepweight; every prompt is compared with transformers on the reloaded tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chat_templates import QWEN25

import llm_lazy_qwen.chat as chat_mod
import llm_sepweight as sw
from llm_lazy_qwen import read_chat_template, read_special_tokens, render_chat
from llm_lazy_qwen.cli import main

transformers = pytest.importorskip("transformers")

TOOL_USE = "<|im_start|>system\nYou can call tools.<|im_end|>\n" + (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RAG = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def folders(qwen_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder saved by transformers with a default and two named templates, its sepweight conversion)."""
    ckpt = qwen_checkpoints("qwen2")
    root = tmp_path_factory.mktemp("named")
    ckpt.model.save_pretrained(root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt.path)
    tok.chat_template = {"default": QWEN25, "tool_use": TOOL_USE, "rag": RAG}
    tok.save_pretrained(root / "hf")
    assert (root / "hf" / "additional_chat_templates" / "tool_use.jinja").is_file()  # transformers 5's layout
    sw.convert(root / "hf", root / "sep", progress=False)
    return root / "hf", root / "sep"


def _ours(folder: Path, name: str | None, add_generation_prompt: bool = True) -> str:
    template = read_chat_template(folder, name)
    assert template is not None
    return render_chat(template, MESSAGES, add_generation_prompt, read_special_tokens(folder))


@pytest.mark.parametrize("where", ["hf", "sep"])
@pytest.mark.parametrize("name", [None, "default", "tool_use", "rag"])
def test_each_template_renders_as_apply_chat_template(folders, where, name) -> None:
    folder = folders[0] if where == "hf" else folders[1]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for gen in (True, False):
        want = tok.apply_chat_template(MESSAGES, chat_template=name, tokenize=False, add_generation_prompt=gen)
        assert _ours(folder, name, gen) == want


def test_unknown_name_lists_the_templates(folders) -> None:
    with pytest.raises(ValueError, match=r"no chat template named 'nope'; its templates are \['default', 'rag', "):
        read_chat_template(folders[1], "nope")


def test_named_only_templates_win_over_the_config_as_in_transformers(folders, tmp_path) -> None:
    """Template files replace tokenizer_config.json's template: without chat_template.jinja there is no default."""
    hf, _ = folders
    folder = tmp_path / "named-only"
    shutil.copytree(hf, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": QWEN25}))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="multiple chat templates with no default"):
        tok.apply_chat_template(MESSAGES, tokenize=False)
    with pytest.raises(ValueError, match=r"additional_chat_templates: chat_template holds named templates \['rag', "):
        read_chat_template(folder)
    assert _ours(folder, "rag") == tok.apply_chat_template(MESSAGES, chat_template="rag", tokenize=False)


def test_config_list_of_named_templates(folders, tmp_path) -> None:
    """The older layout: tokenizer_config.json's chat_template as [{"name", "template"}]."""
    hf, _ = folders
    folder = tmp_path / "config-list"
    folder.mkdir()
    shutil.copy(hf / "tokenizer.json", folder)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    named = [{"name": "default", "template": QWEN25}, {"name": "tool_use", "template": TOOL_USE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": named}))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for name in (None, "tool_use"):
        assert _ours(folder, name) == tok.apply_chat_template(
            MESSAGES, chat_template=name, tokenize=False, add_generation_prompt=True
        )


@pytest.fixture
def prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids of every chat turn, recorded at llm_sampler's sample_stream seam."""
    seen: list[list[int]] = []
    real = chat_mod.sample_stream

    def recording(forward, input_ids, *args, **kwargs):
        seen.append(input_ids[0].tolist())
        yield from real(forward, input_ids, *args, **kwargs)

    monkeypatch.setattr(chat_mod, "sample_stream", recording)
    return seen


@pytest.mark.parametrize("name", ["tool_use", "rag", None])
def test_chat_picks_a_named_template(folders, prompts, capsys, name) -> None:
    hf, sep = folders
    pick = ["--chat-template", name] if name else []
    greedy = ["--temperature", "0", "--max-new-tokens", "2"]
    assert main(["chat", str(sep), *pick, "--system", "Be brief.", "--prompt", "Hi", *greedy]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    want = tok.apply_chat_template(MESSAGES, chat_template=name, add_generation_prompt=True, return_dict=True)
    assert prompts == [want["input_ids"]]
    capsys.readouterr()


def test_chat_refuses_an_unknown_name(folders, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file named "nope" either
    assert main(["chat", str(folders[1]), "--chat-template", "nope", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template 'nope' is no file, nor a template of the model" in err
    assert "its templates are ['default', 'rag', 'tool_use']" in err and "Traceback" not in err
