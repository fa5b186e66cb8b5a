"""as_transformers(part).generate(...) gives the tokens transformers' own generate() gives (fp32), in RAM and lazy.

Tiny random Qwen2 / Llama / Qwen2-with-sliding-window models with randomised norms and biases and a
wide init (so greedy text does not collapse into one repeated token), written by save_pretrained
and converted. Every generate() mode transformers drives through the model's cache is covered:
greedy and sampling processors, eos and stop strings, left padding, beam search (cache reorder),
prompt-lookup and assisted decoding (cache crop); plus TextStreamer, pipeline("text-generation") and
llm_sampler's transformers adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lazy_helpers import FP32

import llm_sepweight as sw
from llm_lazy_qwen import as_transformers, load_part

transformers = pytest.importorskip("transformers")
from llm_lazy_qwen.hf_model import PartCache  # needs transformers

VOCAB = 300  # the size of the fixtures' trained tokenizer
NEW = 32


def _hf_config(family: str) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return transformers.LlamaConfig(num_hidden_layers=3, head_dim=24, rope_theta=50000.0, **common)
    if family == "qwen2_swa":  # layers 2, 3 slide over 4 keys: 32 new tokens wrap the ring many times
        return transformers.Qwen2Config(
            num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2, **common
        )
    return transformers.Qwen2Config(num_hidden_layers=3, **common)


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2_swa"])
def family(request, tmp_path_factory, qwen_checkpoints):
    """(sepweight folder, transformers model, tokenizer) of one family."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(11)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(request.param))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.eval().save_pretrained(root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(qwen_checkpoints("qwen2").path)
    tok.padding_side = "left"
    sw.convert(root / "hf", root / "sep", progress=False)
    return root / "sep", model, tok


@pytest.fixture(scope="module", params=[False, True], ids=["ram", "lazy"])
def adapter(request, family):
    path, model, tok = family
    wrapped = as_transformers(load_part(path, "f", lazy=request.param))
    yield wrapped, model, tok
    wrapped.close()


PROMPTS = ["The quick brown fox", "Hi"]


def _batch(tok) -> dict[str, torch.Tensor]:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # left padding in the batch
    return dict(batch)


CASES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=3),
    "assisted": dict(do_sample=False),  # + assistant_model
}


def _generate(model, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    torch.manual_seed(1234)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, **kwargs)


def _count_calls(monkeypatch, cls: type, names: list[str]) -> dict[str, int]:
    """Count calls of methods of `cls` that change something (here: that beam search reorders and candidate
    decoding crops *our* cache)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(cls, name)

        def spy(self, *args, _name=name, _original=original):
            calls[_name] += not (isinstance(args[0], int) and args[0] == 0)  # crop(0) changes nothing
            return _original(self, *args)

        monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_transformers(adapter, case, monkeypatch):
    ours, model, tok = adapter
    kwargs = CASES[case]
    batch = _batch(tok)
    if case in ("prompt_lookup", "assisted"):  # transformers' candidate decoding takes one row
        batch = {k: v[:1] for k, v in batch.items()}
    if case == "assisted":  # another random model of the family: most candidates are rejected and cropped
        torch.manual_seed(99)
        kwargs = {**kwargs, "assistant_model": transformers.AutoModelForCausalLM.from_config(model.config).eval()}
    want = _generate(model, batch, **kwargs)
    calls = _count_calls(monkeypatch, PartCache, ["crop", "reorder_cache"])
    got = _generate(ours, batch, **kwargs)
    assert (calls["reorder_cache"] > 0) == (case == "beams")
    assert (calls["crop"] > 0) == (case in ("prompt_lookup", "assisted"))
    assert want.shape[1] > batch["input_ids"].shape[1] + NEW // 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if case == "greedy":
        assert len(set(want[0, -NEW:].tolist())) > 4  # a test model that does not collapse into one token


def test_eos_and_stop_strings(adapter):
    ours, model, tok = adapter
    batch = _batch(tok)
    greedy = _generate(model, batch, do_sample=False)
    new = greedy[:, batch["input_ids"].shape[1] :]
    eos = int(new[0, 5])  # row 0 stops at step 6, row 1 goes on (or stops where it meets it) and pads
    want = _generate(model, batch, do_sample=False, eos_token_id=eos)
    assert want.shape[1] < greedy.shape[1] or (want == 0).any()
    torch.testing.assert_close(_generate(ours, batch, do_sample=False, eos_token_id=eos), want, rtol=0, atol=0)
    # a stop string: the text of a plain-ASCII token row 1 generates after a few steps
    stop = next(t for t in (tok.decode(i) for i in new[1, 4:]) if t.strip().isalnum() and t.isascii())
    want = _generate(model, batch, do_sample=False, stop_strings=[stop], tokenizer=tok)
    got = _generate(ours, batch, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert not torch.equal(want, greedy)  # the stop string took effect
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_text_streamer(adapter, capsys):
    ours, model, tok = adapter
    batch = {k: v[:1] for k, v in tok(PROMPTS[:1], return_tensors="pt").items()}
    printed = []
    for m in (model, ours):
        _generate(m, batch, do_sample=False, streamer=transformers.TextStreamer(tok, skip_prompt=True))
        printed.append(capsys.readouterr().out)
    assert printed[0].strip()
    assert printed[1] == printed[0]


def test_pipeline(adapter, capfd):
    ours, model, tok = adapter
    texts = []
    for m in (model, ours):
        pipe = transformers.pipeline("text-generation", model=m, tokenizer=tok)
        out = pipe(PROMPTS, max_new_tokens=NEW, do_sample=False, batch_size=2)
        texts.append([o[0]["generated_text"] for o in out])
    assert texts[1] == texts[0]
    assert "not supported for text-generation" not in capfd.readouterr().err
    assert texts[0][0].startswith(PROMPTS[0]) and len(texts[0][0]) > len(PROMPTS[0])


def test_forward_outputs_and_user_cache(adapter):
    """model(...) as transformers: .logits, a cache to continue from, logits_to_keep=0 = all positions."""
    ours, model, tok = adapter
    batch = _batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(**batch, position_ids=position_ids)
        got = ours(**batch, position_ids=position_ids, logits_to_keep=0)
        real = mask.bool()
        torch.testing.assert_close(got.logits[real], want.logits[real], **FP32)
        assert got.cache.get_seq_length() == ids.shape[1]
        nxt = want.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos2 = position_ids[:, -1:] + 1
        want2 = model(nxt, attention_mask=mask2, position_ids=pos2, cache=want.cache, logits_to_keep=1).logits
        got2 = ours(nxt, attention_mask=mask2, position_ids=pos2, cache=got.cache, logits_to_keep=1).logits
    torch.testing.assert_close(got2, want2, **FP32)
    # a cache the user passes to generate() is used and kept
    cache = ours.new_cache()
    single = {k: v[:1] for k, v in batch.items()}
    out = _generate(ours, single, do_sample=False, cache=cache, return_dict_in_generate=True)
    assert out.cache is cache and cache.get_seq_length() == out.sequences.shape[1] - 1
    torch.testing.assert_close(out.sequences, _generate(model, single, do_sample=False), rtol=0, atol=0)


def test_llm_sampler_transformers_forward(adapter):
    """llm_sampler's adapter for transformers models drives the wrapped part too (keyword call, use_cache=False)."""
    llm_sampler = pytest.importorskip("llm_sampler")
    ours, model, tok = adapter
    batch = _batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = llm_sampler.sample(llm_sampler.transformers_forward(ours), ids, 8, temperature=0, attention_mask=mask)
    want = llm_sampler.sample(llm_sampler.transformers_forward(model), ids, 8, temperature=0, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_part_keyword_forward_equals_positional(sep):
    path, _ = sep("qwen2")
    part = load_part(path)
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = part(ids, attention_mask=mask)
        torch.testing.assert_close(part(input_ids=ids, attention_mask=mask, logits_to_keep=0), want, rtol=0, atol=0)
        torch.testing.assert_close(part(input_ids=ids, attention_mask=mask, use_cache=False), want, rtol=0, atol=0)
        cache = part.new_cache()
        first = part(input_ids=ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
        rest = part(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=cache, logits_to_keep=0)
    torch.testing.assert_close(torch.cat([first, rest], 1)[mask.bool()], want[mask.bool()], **FP32)


def test_part_keyword_errors(sep):
    path, _ = sep("qwen2")
    part = load_part(path)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="give the input once: positionally or as input_ids=, not both"):
        part(ids, input_ids=ids)
    with pytest.raises(TypeError, match="forward\\(\\) needs the input"):
        part(attention_mask=torch.ones(1, 3))
    with pytest.raises(TypeError, match="give the KV cache once"):
        part(ids, cache=part.new_cache(), past_key_values=part.new_cache())
    dynamic = transformers.DynamicCache()
    with pytest.raises(
        TypeError, match=r"must be a KVCache from part.new_cache\(\), got DynamicCache; .*as_transformers"
    ):
        part(input_ids=ids, past_key_values=dynamic)


def test_adapter_errors(sep, monkeypatch):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match=r"needs a whole-model part \(spec 'f'.*got 'b 0'"):
        as_transformers(load_part(path, "b 0-1"))
    with pytest.raises(TypeError, match="as_transformers takes a QwenPart"):
        as_transformers(torch.nn.Linear(2, 2))
    ours = as_transformers(load_part(path))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TypeError, match=r"the cache must come from this model's new_cache\(\), got DynamicCache"):
        ours.generate(ids, max_new_tokens=2, cache=transformers.DynamicCache())
    other = as_transformers(load_part(path))
    with pytest.raises(TypeError, match="the cache must come from this model's new_cache"):
        ours(ids, cache=other.new_cache())
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        ours.generate(ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match=r"does not support \['output_attentions'\]"):
        ours(ids, output_attentions=True)
    with pytest.raises(TypeError, match=r"does not support \['labels'\]"):
        ours(ids, labels=ids)
    assert ours.to("cpu") is ours and ours.to(torch.float32) is ours  # what pipelines call: a no-op
    with pytest.raises(ValueError, match=r"a part on cpu in torch.float32; load it where you want it instead"):
        ours.to("meta")
    with pytest.raises(ValueError, match=r"load_part\(folder, 'f', device=..., dtype=...\)"):
        ours.to(torch.bfloat16)
    # transformers is an optional extra: a clear error when it is missing
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "llm_lazy_qwen.hf_model", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'llm_lazy_qwen\[transformers\]'"):
        as_transformers(load_part(path))


def test_import_without_transformers():
    """import llm_lazy_qwen never imports transformers (an optional extra)."""
    import subprocess

    code = "import sys, llm_lazy_qwen; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
