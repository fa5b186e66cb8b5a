"""KV-cached decoding equals transformers' generate; sliding-window ring correct for any chunk size."""

import pytest
import torch
from lazy_helpers import FP32

from llm_lazy_qwen import load_part


def greedy(model, ids, steps, chunk=None, attention_mask=None):
    """Prefill (optionally in chunks), then decode one token at a time with the cache."""
    cache = model.new_cache()
    chunk = chunk or ids.shape[1]
    for s in range(0, ids.shape[1], chunk):
        m = attention_mask[:, : s + chunk] if attention_mask is not None else None
        logits = model(ids[:, s : s + chunk], cache=cache, attention_mask=m, logits_to_keep=1)
    out = []
    mask = attention_mask
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits = model(nxt, cache=cache, attention_mask=mask)
    return torch.cat(out, dim=1)


def hf_greedy(ckpt, ids, steps, attention_mask=None):
    out = ckpt.model.generate(
        ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa", "qwen3", "qwen2_tied"])
def test_greedy_equals_generate(sep, name, lazy):
    path, ckpt = sep(name)
    ids = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf_greedy(ckpt, ids, 12)
        got = greedy(load_part(path, lazy=lazy), ids, 12)
    assert torch.equal(got, want)


def test_greedy_left_padded_batch_equals_generate(sep):
    path, ckpt = sep("qwen2_swa")
    ids = torch.randint(1, 384, (3, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = hf_greedy(ckpt, ids, 10, attention_mask=mask)
        got = greedy(load_part(path), ids, 10, attention_mask=mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_sliding_window_chunked_prefill(sep, chunk):
    """Prompt longer than W (4), fed in chunks smaller, equal and larger than W: same logits."""
    path, ckpt = sep("qwen2_swa")
    ids = torch.randint(0, 384, (2, 17), generator=torch.Generator().manual_seed(9))
    model = load_part(path)
    cache = model.new_cache()
    with torch.no_grad():
        want = ckpt.model(ids).logits
        got = torch.cat([model(ids[:, s : s + chunk], cache=cache) for s in range(0, 17, chunk)], dim=1)
    torch.testing.assert_close(got, want, **FP32)
    assert cache.seq_len == 17
    ring = cache.layers[3]
    assert ring.k.shape[2] == 4  # W slots, not 2W and not the whole sequence
    assert sorted(ring.pos.tolist()) == [13, 14, 15, 16]  # each slot records its absolute index


def test_speculative_style_rollback(sep):
    """Verify a block of 4 drafted tokens, reject the last 3, continue: equals never having seen them."""
    path, ckpt = sep("qwen2_swa")
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(10))
    draft = torch.randint(0, 384, (1, 4), generator=torch.Generator().manual_seed(11))
    model = load_part(path)
    with torch.no_grad():
        cache = model.new_cache(extra_window_slots=4)
        model(ids, cache=cache)
        model(draft, cache=cache)  # multi-token verification chunk
        cache.crop(13)  # keep only the first drafted token
        nxt = torch.tensor([[5]])
        got = model(nxt, cache=cache)
        want = ckpt.model(torch.cat([ids, draft[:, :1], nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(got, want, **FP32)


def test_rollback_beyond_ring_is_refused(sep):
    path, _ = sep("qwen2_swa")
    model = load_part(path)
    cache = model.new_cache()  # no extra slots
    with torch.no_grad():
        model(torch.randint(0, 384, (1, 12)), cache=cache)
        model(torch.randint(0, 384, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match=r"cannot crop the sliding-window cache back to 13 tokens.*extra_slots >= 3"):
        cache.crop(13)


def test_chained_parts_with_caches(sep):
    """Two parts, each with its own cache, decode exactly like the whole model."""
    path, ckpt = sep("qwen3")
    ids = torch.randint(0, 384, (1, 7), generator=torch.Generator().manual_seed(12))
    a, b = load_part(path, "b 0-1"), load_part(path, "1-3 e", lazy=True)
    ca, cb = a.new_cache(), b.new_cache()
    with torch.no_grad():
        want = hf_greedy(ckpt, ids, 8)
        logits = b(a(ids, cache=ca), cache=cb, logits_to_keep=1)
        toks = []
        for _ in range(8):
            t = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(t)
            logits = b(a(t, cache=ca), cache=cb)
    assert torch.equal(torch.cat(toks, 1), want)


def test_explicit_positions_for_a_middle_part(sep):
    """A middle part given explicit position ids (as a pipeline stage would be) computes RoPE itself."""
    path, ckpt = sep("qwen2")
    ids = torch.randint(0, 384, (1, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        hs = ckpt.model(ids, output_hidden_states=True).hidden_states
        mid = load_part(path, "1-2")
        got = mid(hs[1][:, 3:], position_ids=torch.arange(3, 6)[None])
        cache = mid.new_cache()
        mid(hs[1][:, :3], cache=cache)
        got_cached = mid(hs[1][:, 3:], cache=cache)
    torch.testing.assert_close(got_cached, hs[2][:, 3:], **FP32)
    assert not torch.allclose(got, hs[2][:, 3:], atol=1e-4)  # without the cache the keys 0..2 are missing
