"""A GGUF folder converted by an older llm_sepweight (outside review).

A GGUF file holds no config.json: the config and tokenizer files are derived from its metadata by
code that changes (today: RoPE scaling, Mistral's window). Before the no-op a re-run rewrote them; a
finished conversion must still not be kept when what the code derives differs from what it holds.
"""

import importlib

import torch
from gguf_fixtures import T, linears, tiny_model, write_gguf

from llm_sepweight.gguf_import import convert_gguf
from llm_sepweight.gguf_reader import open_gguf

gguf_import = importlib.import_module("llm_sepweight.gguf_import")


def test_a_config_derived_otherwise_is_converted_again(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_model("llama", seed=3), tmp_path / "m.gguf", linears(T.F32))
    derive = gguf_import.gguf_config

    def older(model):  # what an older converter wrote: another rope_theta
        return {**derive(model), "rope_theta": 1.0}

    with monkeypatch.context() as m:
        m.setattr(gguf_import, "gguf_config", older)
        convert_gguf(path, tmp_path / "sep", dtype="fp32", progress=False)
    manifest = convert_gguf(path, tmp_path / "sep", dtype="fp32", progress=False)  # after the upgrade
    assert manifest.config == derive(open_gguf(path))

    from llm_lazy_qwen import load_part

    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    want = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()(ids).logits
    with torch.no_grad():
        got = load_part(tmp_path / "sep", "f")(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
