"""tokenizer.json / tokenizer_config.json from GGUF metadata equal transformers' GGUF tokenizer.

Compared: encodings of a few strings (specials, unicode, digits, whitespace, a rendered chat
template) by ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` and by
``tokenizers.Tokenizer.from_file(our tokenizer.json)``; the chat template rendered by
``AutoTokenizer`` over our folder and over the GGUF.
"""

from __future__ import annotations

import json

import pytest
from gguf_fixtures import CHAT_TEMPLATE, T, linears, tiny_model, write_gguf

import llm_sepweight as sw

TEXTS = [
    "Hello world, how are you?",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "numbers 1234567 and 3.14159; ünïcödé ÄÖÜ 東京 🙂",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "don't we'll I'M ''quoted''",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


# the real combinations: Qwen files say "qwen2", Llama 3 "llama-bpe", SmolLM (llama arch) "smollm"; Llama 2 style
# files carry a sentencepiece vocabulary ("llama") and often no add_bos_token (then BOS is added).
# The architecture matters to transformers when it loads our folder (Qwen2Tokenizer brings its own split).
CASES = [
    ("qwen2", "gpt2", "qwen2", False),
    ("llama", "gpt2", "llama-bpe", True),
    ("llama", "gpt2", "smollm", False),
    ("llama", "llama", "default", None),
]


@pytest.mark.parametrize(("arch", "vocab", "pre", "add_bos"), CASES, ids=[c[2] for c in CASES])
def test_tokenizer_equals_transformers(tmp_path, arch, vocab, pre, add_bos):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model = tiny_model(arch)
    path = write_gguf(model, tmp_path / "m.gguf", linears(T.F16), pre=pre, add_bos=add_bos, vocab=vocab)
    sw.convert(path, tmp_path / "sep", progress=False)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_file(str(tmp_path / "sep" / "tokenizer.json"))
    rendered = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    for text in [*TEXTS, rendered]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == ref.decode(ref(text)["input_ids"])
    config = json.loads((tmp_path / "sep" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is (add_bos is not False)
    if config["add_bos_token"]:
        assert ours.encode("hi").ids[0] == ref.bos_token_id
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["eos_token"] == ("</s>" if vocab == "llama" else "<|im_end|>")
    # the folder alone is a working transformers tokenizer with the chat template
    folder = AutoTokenizer.from_pretrained(tmp_path / "sep")
    assert folder.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    assert folder(TEXTS[2])["input_ids"] == ref(TEXTS[2])["input_ids"]


def test_config_json_equals_transformers(tmp_path):
    from transformers import AutoConfig

    path = write_gguf(tiny_model("qwen2", seed=11), tmp_path / "m.gguf", linears(T.F32))
    sw.convert(path, tmp_path / "sep", progress=False)
    ref = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name).to_dict()
    ours = json.loads((tmp_path / "sep" / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    keys += ["max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "eos_token_id"]
    assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys}
    assert ours["rope_theta"] == ref["rope_parameters"]["rope_theta"]
    assert ours["architectures"] == ["Qwen2ForCausalLM"] and ours["model_type"] == "qwen2"
