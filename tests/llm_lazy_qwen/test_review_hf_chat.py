"""Defects an outside review found in the chat CLI, the chat templates and as_transformers, each against the
reference (transformers' ``apply_chat_template`` / ``generate``) or a clear error.

- a stdin line that is not UTF-8 crashed the chat with a traceback (TypeError from the tokenizer);
- ``special_tokens_map.json`` (tokenizer folders without ``added_tokens_decoder``) was ignored: templates
  rendered ``bos_token`` / ``eos_token`` empty where transformers fills them, and the chat missed the eos stop;
- templates with ``{% generation %}`` blocks (transformers' assistant-token marker) failed to render;
- ``--system ""`` (an empty system message, how Qwen2.5's default one is switched off) got the default one.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from chat_templates import QWEN3, QWEN25
from tokenizers import Tokenizer

from llm_lazy_qwen import ChatSession, eos_token_ids, load_part, read_special_tokens, render_chat
from llm_lazy_qwen.cli import main
from llm_sampler import SamplingParams

transformers = pytest.importorskip("transformers")
GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


@pytest.fixture
def folder(qwen_checkpoints, tmp_path):
    """A copy of the tiny Qwen2 checkpoint's tokenizer files (tokenizer_config.json without bos_token)."""
    src = qwen_checkpoints("qwen2").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def _hf(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_non_utf8_stdin_line_is_reported_and_the_chat_goes_on(sep, capsys, monkeypatch):
    path, _ = sep("qwen2")

    def run(raw: bytes) -> tuple[int, str, str]:
        # what a real stdin gives for undecodable bytes (Python's default on a UTF-8 locale)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), "utf-8", errors="surrogateescape"))
        status = main(["chat", str(path), *GREEDY])
        out, err = capsys.readouterr()
        return status, out, err

    status, out, err = run(b"Hi\n\xff\xfe bad \xe9t\xe9\nAgain\n")
    assert status == 0, err
    assert "Traceback" not in err
    assert "error: the message is not valid UTF-8 (bytes b'\\xff\\xfe' at character 0)" in err
    good_status, good_out, _ = run(b"Hi\nAgain\n")
    first, second = good_out.split("\n", 1)
    assert out == first + "\n\n" + second  # the bad line answered nothing and changed nothing
    session = ChatSession(load_part(path), Tokenizer.from_file(str(path / "tokenizer.json")), QWEN25)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        next(session.reply("caf\udce9"))
    assert session.messages == []
    with pytest.raises(ValueError, match=r"the system message is not valid UTF-8"):
        ChatSession(load_part(path), Tokenizer.from_file(str(path / "tokenizer.json")), QWEN25, system="\udcff")


SPECIALS = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"


@pytest.mark.parametrize("layout", ["legacy", "no_config", "modern"])
def test_special_tokens_map_json_as_transformers(folder, layout):
    """Without added_tokens_decoder in tokenizer_config.json, transformers takes special_tokens_map.json's
    tokens (over the config's); with it (the modern layout) the file is ignored."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config["eos_token"] = "<|endoftext|>"  # special_tokens_map.json wins over this in the legacy layout
    if layout == "modern":
        config["added_tokens_decoder"] = {
            "0": {
                "content": "<|endoftext|>",
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            },
        }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if layout == "no_config":
        (folder / "tokenizer_config.json").unlink()
    specials = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "lstrip": False}}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    messages = [{"role": "user", "content": "Hi"}]
    want = _hf(folder).apply_chat_template(messages, chat_template=SPECIALS, tokenize=False)
    assert render_chat(SPECIALS, messages, False, read_special_tokens(folder)) == want
    assert want.startswith("<|im_start|>" if layout != "modern" else "user")
    # the chat stops on the tokenizer's eos_token, as the template writes it
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = _hf(folder).eos_token
    assert eos_token_ids(folder, tokenizer) == [tokenizer.token_to_id(eos)]


def test_generation_blocks_render_as_transformers():
    """{% generation %} marks assistant text for transformers' return_assistant_tokens_mask: rendered as its body."""
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    from transformers.utils.chat_template_utils import render_jinja_template

    for prompt in (False, True):
        want = render_jinja_template([messages], chat_template=template, add_generation_prompt=prompt)[0][0]
        assert render_chat(template, messages, prompt) == want


@pytest.mark.parametrize("template", [QWEN25, QWEN3], ids=["qwen2.5", "qwen3"])
def test_empty_system_message_is_rendered(folder, sep, template):
    """--system "" gives an empty system message, as apply_chat_template (Qwen2.5's default is then absent)."""
    path, _ = sep("qwen2")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = _hf(folder)
    for system in ("", "Be brief.", None):
        session = ChatSession(load_part(path), tokenizer, template, system=system, params=SamplingParams(0))
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": "Hi"})
        want = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        assert session.prompt_ids("Hi") == hf(want, add_special_tokens=False)["input_ids"], system
        if template is QWEN25:
            assert ("You are Qwen" in want) == (system is None)
        session.reset()
        assert session.messages == messages[:-1]


def test_generate_twice_and_continued_cache_equal_transformers(sep):
    """Guard: a second generate() on one adapter, and one continuing from the first's cache, equal transformers."""
    from llm_lazy_qwen import as_transformers

    path, ckpt = sep("qwen2")
    ours = as_transformers(load_part(path))
    ids = torch.tensor([[5, 9, 33, 71, 8]])
    kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        want = ckpt.model.generate(ids, **kw)
        assert torch.equal(ours.generate(ids, **kw), want) and torch.equal(ours.generate(ids, **kw), want)
        first = ours.generate(ids, return_dict_in_generate=True, **kw)
        more = torch.cat([first.sequences, torch.tensor([[12, 40]])], 1)
        got = ours.generate(more, cache=first.cache, **kw)
        assert torch.equal(got, ckpt.model.generate(more, **kw))


def test_template_vars_as_apply_chat_template_kwargs(folder, sep, monkeypatch, capsys):
    """Qwen3's enable_thinking=False (and any template variable) renders as apply_chat_template(..., NAME=VALUE);
    the CLI takes it as --template-var NAME=VALUE."""
    path, _ = sep("qwen2")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = _hf(folder)
    messages = [{"role": "user", "content": "Hi"}]
    for extra in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        want = hf.apply_chat_template(
            messages, chat_template=QWEN3, add_generation_prompt=True, tokenize=False, **extra
        )
        assert render_chat(QWEN3, messages, True, None, extra) == want
        session = ChatSession(load_part(path), tokenizer, QWEN3, template_vars=extra)
        assert session.prompt_ids("Hi") == hf(want, add_special_tokens=False)["input_ids"]
    assert "<think>\n\n</think>" in render_chat(QWEN3, messages, True, None, {"enable_thinking": False})
    with pytest.raises(ValueError, match=r"template variables \['messages'\] are set by render_chat itself"):
        render_chat(QWEN3, messages, True, None, {"messages": []})
    # the CLI: --template-var enable_thinking=false reaches the template as the JSON value False
    seen = []
    monkeypatch.setattr(ChatSession, "prompt_ids", lambda self, user: seen.append(self.template_vars) or [1, 2])
    monkeypatch.setattr(ChatSession, "_stream", lambda self, ids: iter(()))
    argv = ["chat", str(path), "--prompt", "Hi", "--template-var", "enable_thinking=false", "--template-var", "x=a b"]
    assert main(argv) == 0
    assert seen == [{"enable_thinking": False, "x": "a b"}]
    with pytest.raises(SystemExit) as e:
        main(["chat", str(path), "--prompt", "Hi", "--template-var", "enable_thinking"])
    assert e.value.code == 2 and "is not NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left_padded"])
def test_crop_keeps_explicit_positions(sep, padded):
    """A cache filled with explicit position_ids (a sequence that starts at 10) and cropped continues at the
    kept tokens' next position, as transformers with the same positions (it restarted at the kept count)."""
    path, ckpt = sep("qwen2")
    part = load_part(path)
    ids = torch.tensor([[5, 9, 33, 71, 8, 12, 40, 41], [7, 7, 60, 61, 62, 63, 64, 65]])
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + 10  # (B, 8): 10, 11, ... from each row's first real token
    with torch.no_grad():
        want = ckpt.model(ids, attention_mask=mask, position_ids=pos).logits
        cache = part.new_cache()
        part(ids[:, :6], position_ids=pos[:, :6], attention_mask=mask[:, :6], cache=cache)
        cache.crop(4)  # drop 2 tokens, then run 3 without position_ids: they continue at 14
        got = part(ids[:, 4:7], attention_mask=mask[:, :7], cache=cache, logits_to_keep=0)
        torch.testing.assert_close(got, want[:, 4:7], atol=1e-4, rtol=1e-4)
        assert cache.next_position.tolist() == (pos[:, 6] + 1).tolist()
        cache.crop(0)  # as new: positions from 0 again
        torch.testing.assert_close(part(ids[:, :3], cache=cache), ckpt.model(ids[:, :3]).logits, atol=1e-4, rtol=1e-4)
