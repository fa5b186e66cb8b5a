"""max_tokens: the forward a memory budget makes room for. Longer forwards run in chunks through the KV cache
(equal to the part in RAM), or are refused without one; runtime_bytes counts that forward exactly."""

from __future__ import annotations

import pytest
import torch
from lazy_helpers import FP32, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import QwenConfig, layer_activation_bytes, load_part
from llm_lazy_qwen.attention import attention_bytes
from llm_lazy_qwen.budget import runtime_bytes
from llm_lazy_qwen.streaming import is_head_chunk, item_size

SMALL = {"max_context": 64, "head_chunk_size": 128}  # 3 head chunks; a KV cache of 64 tokens
QWEN7B = {  # the Qwen2.5-7B shape of issue 13's benchmarks
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------ the formula
@pytest.mark.parametrize("max_tokens", [1, 8, 64, 65, 512, 8192])
@pytest.mark.parametrize("batch", [1, 3])
def test_runtime_bytes_exact_formula(max_tokens, batch):
    cfg, isz, ctx, chunk = QwenConfig.from_dict(QWEN7B), 2, 4096, 16384
    r = runtime_bytes(cfg, 28, True, isz, max_context=ctx, max_batch=batch, max_tokens=max_tokens)
    tokens = min(max_tokens, ctx)
    T = batch * tokens
    d, H, V = 128, 3584, 152064
    assert r.tokens == tokens and r.context == ctx
    assert r.kv_cache == 2 * 28 * batch * 4 * d * isz * ctx
    # the layer, the norms' fp32 insides, attention's mask and blocks over the (folded up to 64) query length
    queries = 7 * tokens if tokens <= 64 else tokens
    assert attention_bytes(batch, tokens, ctx, 7, isz) == batch * queries * ctx * (1 + 2 * isz)
    act = layer_activation_bytes(cfg, T, isz) + 8 * T * H + batch * queries * ctx * (1 + 2 * isz)
    assert r.activations == act
    assert r.logits == isz * batch * (V + chunk)  # one kept position per row, whatever max_tokens
    assert r.total == r.kv_cache + r.activations + r.logits


def test_runtime_bytes_on_the_7b_shape():
    """The 7B shape at 4096 tokens, bf16: no repeated k/v (it was 59 MB), logits of one position per row (they
    were 172 MB for 512); a decode-sized max_tokens frees the rest of the forward for weights."""
    cfg = QwenConfig.from_dict(QWEN7B)
    default = runtime_bytes(cfg, 28, True, 2, max_context=4096)
    small = runtime_bytes(cfg, 28, True, 2, max_context=4096, max_tokens=16)
    assert default.tokens == 512 and small.tokens == 16
    assert default.logits == small.logits == 2 * (152064 + 16384)  # 337 KB
    assert 130e6 < default.activations < 160e6  # was 0.20 GB + 59 MB of repeated k/v
    assert small.activations < 10e6
    assert default.kv_cache == small.kv_cache == 2 * 28 * 4 * 128 * 2 * 4096  # 235 MB, as before


def test_max_tokens_is_validated(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="max_context, max_batch and max_tokens must be >= 1, got 64, 1, 0"):
        load_part(path, memory_budget="1GiB", max_tokens=0, **SMALL)


# ------------------------------------------------------------------------------------ chunked forwards
def _budgeted(path, least=False, **kw):
    """A part planned for forwards of 8 tokens per row, some items resident and some streamed (`least`: the
    smallest budget, everything streamed that can be)."""
    everything = load_part(path, memory_budget=10**12, max_tokens=8, **SMALL)
    plan = everything.memory_plan
    everything.close()
    budget = plan.minimum if least else (plan.minimum + plan.peak) // 2
    part = load_part(path, memory_budget=budget, max_tokens=8, **SMALL, **kw)
    assert part.max_tokens == 8 and part.memory_plan.resident and part.memory_plan.streamed
    return part


@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa", "qwen3"])
def test_prefill_longer_than_max_tokens_runs_in_chunks_and_equals_ram(sep, name):
    """20 tokens with max_tokens=8: three chunks through the cache; logits equal the RAM part's, then decode."""
    path, _ = sep(name)
    part, ram = _budgeted(path), load_part(path, **SMALL)
    ids = token_ids(batch=2, seq=20, seed=21)
    with torch.no_grad():
        caches = part.new_cache(), ram.new_cache()
        got, want = part(ids, cache=caches[0]), ram(ids, cache=caches[1])
        assert got.shape == (2, 20, 384) and caches[0].seq_len == 20
        torch.testing.assert_close(got, want, **FP32)
        for _ in range(4):
            nxt = want[:, -1:].argmax(-1)
            got, want = part(nxt, cache=caches[0]), ram(nxt, cache=caches[1])
            torch.testing.assert_close(got, want, **FP32)
    assert part._streamer._allocated <= part.memory_plan.slots  # head chunks prefetched then skipped: no leak
    part.close()


@pytest.mark.parametrize(
    "keep",
    [1, 5, 0, slice(3, 17), torch.tensor([19, 2, 2, 9]), torch.tensor([-1, 0]), torch.zeros(20, dtype=torch.bool)],
    ids=["last", "last5", "all", "slice", "unsorted+repeats", "negative", "none"],
)
def test_chunked_forward_keeps_the_same_positions(sep, keep):
    path, _ = sep("qwen2")
    part, ram = _budgeted(path), load_part(path, **SMALL)
    ids = token_ids(batch=1, seq=20, seed=22)
    with torch.no_grad():
        got = part(ids, cache=part.new_cache(), logits_to_keep=keep)
        want = ram(ids, cache=ram.new_cache(), logits_to_keep=keep)
    torch.testing.assert_close(got, want, **FP32)
    part.close()


def test_chunked_prefill_with_left_padding_and_positions(sep):
    """A left-padded batch (the mask given for past + new tokens), then decode: equal to RAM."""
    path, _ = sep("qwen2_swa")
    part, ram = _budgeted(path), load_part(path, **SMALL)
    ids = token_ids(batch=3, seq=19, seed=23)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0  # row 2's padding spans the first chunk and a half
    with torch.no_grad():
        caches = part.new_cache(), ram.new_cache()
        got, want = part(ids, cache=caches[0], attention_mask=mask), ram(ids, cache=caches[1], attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], **FP32)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        nxt = want[:, -1:].argmax(-1)
        got = part(nxt, cache=caches[0], attention_mask=mask)
        torch.testing.assert_close(got, ram(nxt, cache=caches[1], attention_mask=mask), **FP32)
        assert torch.equal(caches[0].next_position, caches[1].next_position)
    part.close()


def test_parts_without_the_head_chunk_their_hidden_states(sep):
    path, ckpt = sep("qwen2")
    first, last = _budgeted_spec(path, "b 0-2"), load_part(path, "2-3 e", **SMALL)
    ids = token_ids(batch=1, seq=20, seed=24)
    with torch.no_grad():
        h = first(ids, cache=first.new_cache())
        torch.testing.assert_close(last(h), ckpt.model(ids).logits, **FP32)
    first.close()


def _budgeted_spec(path, spec):
    part = load_part(path, spec, memory_budget=10**12, max_tokens=8, **SMALL)
    assert part.max_tokens == 8
    return part


def test_each_chunk_streams_the_layers_and_only_the_last_reads_the_head(sep):
    """prefetch=0 makes reads synchronous, so the count is exact: 3 chunks stream the streamed layer items 3
    times; the head is read only for the chunk holding the kept position."""
    path, _ = sep("qwen2")
    part = _budgeted(path, least=True, prefetch=0)
    plan, source = part.memory_plan, sw.SepWeights(path)
    resident = sum(item_size(source, i, torch.float32).stored for i in plan.resident)
    head = sum(item_size(source, i, torch.float32).stored for i in plan.streamed if is_head_chunk(i))
    layers = plan.read_per_token - head
    assert layers > 0 and head > 0
    with torch.no_grad():
        part(token_ids(batch=1, seq=20, seed=25), cache=part.new_cache(), logits_to_keep=1)
    assert part._streamer.bytes_read == resident + 3 * layers + head
    part.close()


# ------------------------------------------------------------------------------------ refused and failed calls
def test_without_a_cache_a_long_forward_is_refused_before_anything_runs(sep):
    path, _ = sep("qwen2")
    part, ram = _budgeted(path), load_part(path, **SMALL)
    assert "activations of 8-token forwards" in str(part.memory_plan)
    read = part._streamer.bytes_read
    with pytest.raises(
        ValueError,
        match=r"this forward has 20 tokens per row, but the part's memory_budget was planned for forwards of at "
        r"most max_tokens=8: pass a KV cache \(cache=part.new_cache\(\); the forward then runs in chunks of 8 "
        r"tokens through it\), or load the part with max_tokens >= 20",
    ):
        part(token_ids(batch=1, seq=20, seed=26))
    assert part._streamer.bytes_read == read  # no layer ran
    cache = part.new_cache()
    with pytest.raises(ValueError, match=r"prepare\(\) got 9 tokens per row, .* max_tokens=8: run at most 8 tokens"):
        part.prepare(token_ids(batch=1, seq=9, seed=27), cache=cache)
    assert cache.seq_len == 0 and part._streamer.bytes_read == read
    ids = token_ids(batch=1, seq=8, seed=28)  # the part still works
    with torch.no_grad():
        torch.testing.assert_close(part(ids), ram(ids), **FP32)
        torch.testing.assert_close(part(ids, cache=cache), ram(ids), **FP32)
    part.close()


def test_a_chunk_failing_midway_rolls_the_cache_back(sep, monkeypatch):
    path, _ = sep("qwen2")
    part, ram = _budgeted(path), load_part(path, **SMALL)
    ids = token_ids(batch=1, seq=20, seed=29)
    cache = part.new_cache()
    run_layer, calls = part.run_layer, []

    def failing(i, h, step):
        calls.append(i)
        if len(calls) == 2 * len(part.layer_ids) + 1:  # the third chunk's first layer
            raise RuntimeError("disk gone")
        return run_layer(i, h, step)

    monkeypatch.setattr(part, "run_layer", failing)
    with torch.no_grad(), pytest.raises(RuntimeError, match="disk gone"):
        part(ids, cache=cache)
    assert cache.seq_len == 0 and cache.next_position is None  # as before the call
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(part(ids, cache=cache), ram(ids), **FP32)
    part.close()


def test_bad_logits_to_keep_is_refused_before_the_first_chunk(sep):
    path, _ = sep("qwen2")
    part = _budgeted(path)
    cache = part.new_cache()
    with pytest.raises(ValueError, match=r"logits_to_keep indices must be in \[-20, 20\)"):
        part(token_ids(batch=1, seq=20, seed=30), cache=cache, logits_to_keep=torch.tensor([20]))
    with pytest.raises(ValueError, match="a forward longer than max_tokens takes logits_to_keep as an int, a slice"):
        part(token_ids(batch=1, seq=20, seed=30), cache=cache, logits_to_keep=torch.tensor([[1]]))
    assert cache.seq_len == 0
    part.close()
