"""GQA without repeating k/v (attention.py): each way (folded query groups, SDPA's enable_gqa, the fold that
older torch falls back to) equals repeated k/v and transformers, with padding, sliding windows and qk_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_fixtures import build_family
from lazy_helpers import FP32, token_ids

import llm_lazy_qwen.attention as attention
from llm_lazy_qwen import load_part
from llm_lazy_qwen.kv_cache import attention_mask

# how a forward of T tokens computes GQA: (FOLD_MAX_TOKENS, SDPA_GQA)
WAYS = {
    "fold": (10**9, True),  # every T folded
    "enable_gqa": (0, True),  # every T through SDPA's enable_gqa
    "old_torch": (0, False),  # torch < 2.5: no enable_gqa, every T folded
}


@pytest.fixture(params=list(WAYS))
def way(request, monkeypatch):
    fold_max, sdpa_gqa = WAYS[request.param]
    monkeypatch.setattr(attention, "FOLD_MAX_TOKENS", fold_max)
    monkeypatch.setattr(attention, "SDPA_GQA", sdpa_gqa)
    return request.param


@pytest.fixture
def no_repeat(monkeypatch):
    """Any repeat_interleave in a forward fails the test (the KV cache must not be repeated)."""

    def boom(*args, **kwargs):
        raise AssertionError("repeat_interleave called: k/v repeated over the query heads")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", boom)


def _reference(q, k, v, mask, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize(
    "T, past, window, padded",
    [
        (1, 9, None, False),
        (1, 9, 4, True),
        (5, 0, None, False),
        (5, 6, 3, True),
        (70, 0, None, False),
        (70, 4, 8, True),
    ],
)
def test_grouped_attention_equals_repeated_kv(way, groups, T, past, window, padded):
    g = torch.Generator().manual_seed(T + past + groups)
    B, n_kv, d, K = 2, 2, 8, past + T
    q = torch.randn(B, n_kv * groups, T, d, generator=g)
    k, v = torch.randn(B, n_kv, K, d, generator=g), torch.randn(B, n_kv, K, d, generator=g)
    key_mask = torch.ones(B, K, dtype=torch.bool)
    if padded:
        key_mask[1, :3] = False  # left padding of row 1
    plain = window is None and not padded
    causal = plain and T > 1 and past == 0
    mask = (
        None
        if causal or (plain and T == 1)
        else attention_mask(torch.arange(past, K), torch.arange(K), window, key_mask if padded else None)
    )
    want = torch.cat(
        [
            _reference(
                q[b : b + 1],
                k[b : b + 1],
                v[b : b + 1],
                None if mask is None else mask[min(b, mask.shape[0] - 1) : b + 1],
                causal,
            )
            for b in range(B)
        ]
    )
    got = attention.grouped_attention(q, k, v, mask, causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_way_follows_the_length(monkeypatch):
    monkeypatch.setattr(attention, "SDPA_GQA", True)
    assert attention.folds(1) and attention.folds(attention.FOLD_MAX_TOKENS)
    assert not attention.folds(attention.FOLD_MAX_TOKENS + 1)
    monkeypatch.setattr(attention, "SDPA_GQA", False)  # older torch: no enable_gqa, always folded
    assert attention.folds(4096)


@pytest.mark.parametrize("name", ["qwen2_swa", "qwen3"])
def test_padded_batch_prefill_and_decode_equal_transformers(sep, way, no_repeat, name):
    """Left padding + T > 1 + 2 query heads per KV head, then cached decode steps: logits equal transformers'
    (qwen2_swa: sliding-window layers through the ring; qwen3: qk_norm)."""
    path, ckpt = sep(name)
    ids = token_ids(batch=3, seq=10, seed=11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    part = load_part(path)
    cache = part.new_cache()
    with torch.no_grad():
        got = [part(ids, attention_mask=mask, cache=cache)]
        steps = token_ids(batch=3, seq=3, seed=12)
        for t in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            got.append(part(steps[:, t : t + 1], attention_mask=mask, cache=cache))
        full = torch.cat([ids, steps], dim=1)
        want = ckpt.model(full, attention_mask=mask).logits
    got = torch.cat(got, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **FP32)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return build_family("mistral", tmp_path_factory.mktemp("mistral"))


def test_mistral_window_in_chunks_equals_transformers(mistral, way, no_repeat):
    """Every layer slides (window 4): a prefill in chunks of 3 through the ring equals transformers."""
    ids = token_ids(batch=1, seq=11, seed=13)
    part = load_part(mistral.sep)
    cache = part.new_cache()
    with torch.no_grad():
        got = torch.cat([part(ids[:, s : s + 3], cache=cache) for s in range(0, 11, 3)], dim=1)
        want = mistral.oracle()(ids).logits
    torch.testing.assert_close(got, want, **FP32)
