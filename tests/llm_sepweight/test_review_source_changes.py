"""A re-run of convert after the source changed must never keep the stale conversion (outside review).

The no-op check compares a key of the source's files; every file the conversion copies or reads
must be part of it: the config (its copy in manifest.json is what loaders read), the tokenizer and
chat template, and the weights, even when a rewrite kept their size and mtime.
"""

import json
import os
import shutil

import torch
from transformers import AutoModelForCausalLM

import llm_sepweight as sw
from llm_lazy_qwen import load_part


def _copy(qwen_checkpoints, name, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(qwen_checkpoints(name).path, src)
    return src


def test_an_edited_config_and_tokenizer_are_converted_again(qwen_checkpoints, tmp_path):
    src = _copy(qwen_checkpoints, "qwen2", tmp_path)
    sw.convert(src, tmp_path / "sep", progress=False)

    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 1234.0  # e.g. a fix pushed to the model's repo
    (src / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(tok))

    m = sw.convert(src, tmp_path / "sep", progress=False)
    assert m.config["rope_parameters"]["rope_theta"] == 1234.0
    assert sw.Manifest.read(tmp_path / "sep").config == config
    for name in ("config.json", "tokenizer_config.json"):
        assert (tmp_path / "sep" / name).read_bytes() == (src / name).read_bytes(), name

    # what a user sees: the converted model equals transformers on the edited checkpoint
    ids = torch.tensor([[1, 7, 30, 5, 99, 3, 12, 64]])
    want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    with torch.no_grad():
        got = load_part(tmp_path / "sep", "f")(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rewritten_weights_with_their_old_size_and_mtime_are_converted_again(qwen_checkpoints, tmp_path):
    src = _copy(qwen_checkpoints, "qwen2", tmp_path)
    sw.convert(src, tmp_path / "sep", progress=False)

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(-1.0)
    weights = src / "model.safetensors"
    st = weights.stat()
    model.save_pretrained(src)  # same names, same size; then the mtime put back, as `cp -p` / `rsync -t` / tar do
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    sw.convert(src, tmp_path / "sep", progress=False)
    got = sw.load(tmp_path / "sep", "b").begin["embed_tokens.weight"]
    torch.testing.assert_close(got, model.model.embed_tokens.weight, atol=0, rtol=0)
