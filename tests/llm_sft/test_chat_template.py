"""prepare_dataset renders the model's own chat template: prompt ids equal transformers' apply_chat_template."""

import json
import shutil

import pytest
from chat_templates import QWEN3, QWEN25

from llm_sft import prepare_dataset

ROWS = (["Name a colour.", "Add them"], ["Blue.", "5"], [None, "2 and 3"])


def _folder(tmp_path, src, template, where):
    """A copy of the tiny Qwen tokenizer whose chat template sits in tokenizer_config.json or chat_template.jinja."""
    dst = tmp_path / where
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    if where == "config":
        config["chat_template"] = template
    else:
        (dst / "chat_template.jinja").write_text(template)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def _hf_ids(folder, messages, **kw):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    return hf.apply_chat_template(messages, **kw)["input_ids"]


@pytest.mark.parametrize(("name", "template", "where"), [("qwen2.5", QWEN25, "config"), ("qwen3", QWEN3, "jinja")])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_prompt_ids_equal_apply_chat_template(qwen_checkpoints, tmp_path, name, template, where, system):
    folder = _folder(tmp_path, qwen_checkpoints("qwen2").path, template, where)
    instructions, responses, inputs = ROWS
    ds = prepare_dataset(folder, instructions, responses, inputs=inputs, max_seq_len=256, system_prompt=system)
    for i, ex in enumerate(ds):
        user = instructions[i] + (f"\n\n{inputs[i]}" if inputs[i] else "")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        prompt = _hf_ids(folder, messages, add_generation_prompt=True)
        full = _hf_ids(folder, [*messages, {"role": "assistant", "content": responses[i]}])
        n = ex.labels.count(-100)
        assert ex.input_ids[:n] == prompt  # trained on exactly the prompt it is served with
        assert ex.input_ids == full[:-1]  # the response ends with <|im_end|>; the template's "\n" after it is cut
        assert ex.labels == [-100] * n + full[n:-1]
    from transformers import PreTrainedTokenizerFast

    text = PreTrainedTokenizerFast.from_pretrained(folder).decode(ds[0].input_ids)
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert (default_system in text) == (name == "qwen2.5" and system is None)
    if name == "qwen3":
        assert text.endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>"
        )  # learnt as it is rendered


def test_chatml_is_the_fallback_and_can_be_forced(qwen_checkpoints, tmp_path):
    src = qwen_checkpoints("qwen2").path  # no chat template: ChatML
    folder = _folder(tmp_path, src, QWEN25, "config")
    plain = prepare_dataset(src, ["Hi"], ["Hello"])
    assert prepare_dataset(folder, ["Hi"], ["Hello"], template="chatml")[0] == plain[0]
    assert len(prepare_dataset(folder, ["Hi"], ["Hello"])[0]) > len(plain[0])  # the default system message
    # chat_template= overrides the model's
    assert (
        prepare_dataset(src, ["Hi"], ["Hello"], chat_template=QWEN25)[0]
        == prepare_dataset(folder, ["Hi"], ["Hello"])[0]
    )


def test_bad_templates_are_reported(qwen_checkpoints, tmp_path):
    src = qwen_checkpoints("qwen2").path
    failing = "{{ raise_exception('only user/assistant roles are supported') }}"
    with pytest.raises(ValueError, match="the chat template failed: only user/assistant roles are supported"):
        prepare_dataset(src, ["Hi"], ["Hello"], chat_template=failing)
    escape = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses it
    with pytest.raises(ValueError, match="the chat template failed"):
        prepare_dataset(src, ["Hi"], ["Hello"], chat_template=escape)
    named = _folder(tmp_path, src, [{"name": "tool_use", "template": QWEN25}], "config")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template holds named templates \['tool_use'\]"):
        prepare_dataset(named, ["Hi"], ["Hello"])
    with pytest.raises(ValueError, match="chat_template= is used with template='auto' only"):
        prepare_dataset(src, ["Hi"], ["Hello"], template="alpaca", chat_template=QWEN25)
