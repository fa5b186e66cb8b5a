"""A rejected or failed forward leaves the KV cache as it was; crop is all-or-nothing.

The reference is the same calls on a cache that never saw the rejected one (itself equal to
transformers, test_decode.py), or transformers directly.
"""

from __future__ import annotations

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import KVCache, load_part
from llm_lazy_qwen.kv_cache import RingLayerCache


def snapshot(cache: KVCache) -> dict:
    """Everything a cache's next call depends on (tensors cloned)."""

    def c(t, n=None):  # a full layer's tensors have spare capacity past its length: not compared
        return None if t is None else t[:, :, :n].clone() if n is not None else t.clone()

    layers = {}
    for i, layer in cache.layers.items():
        n = None if isinstance(layer, RingLayerCache) else layer.length
        layers[i] = (layer.length, c(layer.k, n), c(layer.v, n), c(getattr(layer, "pos", None)))
    return {"seq_len": cache.seq_len, "key_mask": c(cache.key_mask), "next": c(cache.next_position), "layers": layers}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "layers":
            for i in a[k]:
                for x, y in zip(a[k][i], b[k][i]):
                    assert (x is None and y is None) or (x == y if isinstance(x, int) else torch.equal(x, y)), (k, i)
        elif isinstance(a[k], torch.Tensor) or isinstance(b[k], torch.Tensor):
            assert a[k] is not None and b[k] is not None and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# each: kwargs of a call on a cache holding 5 tokens, rejected before anything runs
REJECTED = {
    "position_beyond_max": (
        {
            "x": torch.tensor([[1, 2]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 1]]),
            "position_ids": torch.tensor([[300, 301]]),
        },
        "position 301 is beyond max_position_embeddings=256",
    ),
    "position_ids_shape": (
        {
            "x": torch.tensor([[1, 2]]),
            "attention_mask": torch.tensor([[0, 1]]),
            "position_ids": torch.tensor([[5, 6, 7]]),
        },
        r"position_ids must be \(batch=1, seq=2\)",
    ),
    "attention_mask_shape": (
        {"x": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[0, 1, 1]])},
        r"attention_mask must be \(batch=1, 2\) or \(batch=1, past\+new=7\)",
    ),
    "token_out_of_range": (
        {"x": torch.tensor([[1, 999]]), "attention_mask": torch.tensor([[0, 1]])},
        "token ids must be in",
    ),
    "logits_to_keep_negative": ({"x": torch.tensor([[1, 2]]), "logits_to_keep": -1}, "logits_to_keep must be >= 0"),
    "logits_to_keep_out_of_range": (
        {"x": torch.tensor([[1, 2]]), "logits_to_keep": torch.tensor([5])},
        r"logits_to_keep indices must be in \[-2, 2\)",
    ),
    "other_batch_size": (
        {"x": torch.tensor([[1], [2]]), "attention_mask": torch.tensor([[0], [1]])},
        "this cache holds 1 rows; the input has 2",
    ),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_forward_leaves_the_cache_untouched(sep, case, lazy):
    path, ckpt = sep("qwen2_swa")
    model = load_part(path, lazy=lazy)
    ids, nxt = token_ids(1, 5, seed=1), torch.tensor([[7, 8]])
    kwargs, message = REJECTED[case]
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        before = snapshot(cache)
        with pytest.raises(ValueError, match=message):
            model(kwargs["x"], cache=cache, **{k: v for k, v in kwargs.items() if k != "x"})
        assert_same(snapshot(cache), before)
        got = model(nxt, cache=cache)  # the retry
        want = ckpt.model(torch.cat([ids, nxt], dim=1)).logits[:, -2:]
    torch.testing.assert_close(got, want, **FP32)


def test_rejected_padded_call_then_retry_with_padding(sep):
    """Left-padded rows: a rejected call must not shift the key mask of the retry."""
    path, _ = sep("qwen2")
    model = load_part(path)
    ids = token_ids(2, 6, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    nxt = torch.tensor([[3], [4]])
    step_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        fresh = model.new_cache()
        model(ids, cache=fresh, attention_mask=mask)
        want = model(nxt, cache=fresh, attention_mask=step_mask)

        cache = model.new_cache()
        model(ids, cache=cache, attention_mask=mask)
        with pytest.raises(ValueError, match="beyond max_position_embeddings"):
            model(nxt, cache=cache, attention_mask=torch.cat([mask, torch.zeros_like(nxt)], 1), position_ids=nxt * 100)
        got = model(nxt, cache=cache, attention_mask=step_mask)
    torch.testing.assert_close(got, want, **FP32)


def test_rejected_first_call_then_crop_zero(sep):
    path, ckpt = sep("qwen2")
    model = load_part(path)
    ids = token_ids(1, 4, seed=3)
    cache = model.new_cache()
    with torch.no_grad(), pytest.raises(ValueError, match="beyond max_position_embeddings"):
        model(
            ids, cache=cache, attention_mask=torch.tensor([[0, 0, 1, 1]]), position_ids=torch.tensor([[0, 1, 2, 999]])
        )
    assert_same(snapshot(cache), snapshot(model.new_cache()))
    cache.crop(0)
    with torch.no_grad():
        got = model(ids, cache=cache)
        want = ckpt.model(ids).logits
    torch.testing.assert_close(got, want, **FP32)


def test_crop_zero_is_a_new_cache(sep):
    """After crop(0) a cache takes any batch size and padding, as a new one does."""
    path, ckpt = sep("qwen2_swa")
    model = load_part(path)
    cache = model.new_cache()
    with torch.no_grad():
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
        model(token_ids(2, 7, seed=4), cache=cache, attention_mask=mask)
        cache.crop(0)
        assert_same(snapshot(cache), snapshot(model.new_cache()))
        ids = token_ids(3, 6, seed=5)
        got = model(ids, cache=cache)
        want = ckpt.model(ids).logits
    torch.testing.assert_close(got, want, **FP32)


def test_refused_ring_crop_changes_nothing(sep):
    """A crop the sliding-window ring cannot honour is refused before any layer is cropped."""
    path, ckpt = sep("qwen2_swa")
    model = load_part(path)
    ids, draft, nxt = token_ids(1, 12, seed=6), token_ids(1, 4, seed=7), torch.tensor([[9]])
    cache = model.new_cache()  # no extra slots
    with torch.no_grad():
        model(ids, cache=cache)
        model(draft, cache=cache)
        before = snapshot(cache)
        with pytest.raises(
            ValueError, match=r"cannot crop the sliding-window cache back to 13 tokens.*extra_slots >= 3"
        ):
            cache.crop(13)
        assert_same(snapshot(cache), before)
        assert {layer.length for layer in cache.layers.values()} == {16}
        got = model(nxt, cache=cache)  # the cache is still usable where it was
        want = ckpt.model(torch.cat([ids, draft, nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(got, want, **FP32)


def test_bad_crop_length(sep):
    path, _ = sep("qwen2")
    cache = load_part(path).new_cache()
    with pytest.raises(ValueError, match="crop length must be >= 0, got -1"):
        cache.crop(-1)


def test_cache_of_another_part(sep):
    path, _ = sep("qwen2")
    first, last = load_part(path, "b 0-1"), load_part(path, "1-3 e")
    cache = first.new_cache()
    with torch.no_grad(), pytest.raises(ValueError, match=r"this cache was made for layers \[0\].*layers \[1, 2\]"):
        last(torch.zeros(1, 2, 64), cache=cache)
    assert cache.seq_len == 0


@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa"])
def test_forward_failing_midway_is_rolled_back(sep, name, monkeypatch):
    """A forward that dies inside a layer (after earlier layers stored their keys) does not count:
    the next call on the same cache equals one on a cache that never saw it."""
    path, ckpt = sep(name)
    model = load_part(path, lazy=True)
    ids, nxt = token_ids(1, 9, seed=8), torch.tensor([[11]])
    cache = model.new_cache()
    last = model.model.layers[str(model.layer_ids[-1])]
    with torch.no_grad():
        model(ids, cache=cache)
        monkeypatch.setattr(last.mlp, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.tensor([[5]]), cache=cache)
        monkeypatch.undo()
        assert cache.seq_len == 9
        got = model(nxt, cache=cache)
        want = ckpt.model(torch.cat([ids, nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(got, want, **FP32)


def test_failed_chunk_that_overwrote_the_ring(sep, monkeypatch):
    """A failed multi-token call whose keys overwrote ring slots the cache needs: a clear error, and
    crop(0) starts over."""
    path, ckpt = sep("qwen2_swa")
    model = load_part(path)
    ids = token_ids(1, 8, seed=9)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache)
        monkeypatch.setattr(
            model.model.layers["3"].mlp, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        with pytest.raises(RuntimeError, match="boom"):
            model(token_ids(1, 6, seed=10), cache=cache)
        monkeypatch.undo()
        with pytest.raises(ValueError, match=r"failed midway.*crop\(0\).*extra_window_slots=6"):
            model(torch.tensor([[1]]), cache=cache)
        cache.crop(0)
        got = model(ids, cache=cache)
    torch.testing.assert_close(got, ckpt.model(ids).logits, **FP32)
