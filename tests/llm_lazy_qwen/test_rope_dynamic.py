"""Dynamic NTK RoPE: the frequencies of a call follow from its own sequence's history, as transformers.

transformers keeps the longest length seen (since the last reset) in its rotary module. A part in RAM
runs calls side by side, so that module state was shared: one thread's frequencies could end up in
another thread's call (silently wrong logits). The history of a sequence now lives in its KVCache;
calls without a cache keep transformers' module history (locked for the update only).
"""

from __future__ import annotations

import threading

import pytest
import torch
from family_fixtures import build_family
from lazy_helpers import FP32, decode, token_ids

from llm_lazy_qwen import load_part
from llm_lazy_qwen.rope import RotaryEmbedding


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    """Llama with dynamic NTK scaling (factor 2) and max_position_embeddings=32."""
    return build_family("dynamic", tmp_path_factory.mktemp("rope_dynamic"))


STEPS = 2  # greedy tokens after the prefill


def test_threads_on_one_part_in_ram_equal_each_alone(dynamic, monkeypatch):
    """A long sequence (past max_position_embeddings) and a short one on one part in RAM, interleaved
    deterministically: the long call pauses after its frequencies are decided and before they are used,
    while the short call (which resets transformers' state) runs whole."""
    part = load_part(dynamic.sep)
    long_ids, short_ids = token_ids(1, 50, seed=1), token_ids(1, 12, seed=2)
    with torch.no_grad():
        want_long, want_short = (
            decode(load_part(dynamic.sep), long_ids, STEPS),
            decode(load_part(dynamic.sep), short_ids, STEPS),
        )

    grown, short_done = threading.Event(), threading.Event()
    decided = RotaryEmbedding.length_for  # where a call's frequencies are decided

    def pause_long(self, *args, **kwargs):
        out = decided(self, *args, **kwargs)
        if threading.current_thread().name == "long" and not grown.is_set():
            grown.set()
            assert short_done.wait(30), "the short thread never finished"
        return out

    monkeypatch.setattr(RotaryEmbedding, "length_for", pause_long)
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(name: str, prompt: torch.Tensor, after: threading.Event | None, done: threading.Event | None) -> None:
        try:
            if after is not None:
                assert after.wait(30), "the long thread never reached its pause"
            with torch.no_grad():
                got[name] = decode(part, prompt, STEPS)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)
        finally:
            if done is not None:
                done.set()

    threads = [
        threading.Thread(target=run, name="long", args=("long", long_ids, None, None)),
        threading.Thread(target=run, name="short", args=("short", short_ids, grown, short_done)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert grown.is_set() and short_done.is_set()
    torch.testing.assert_close(got["long"], want_long, **FP32)
    torch.testing.assert_close(got["short"], want_short, **FP32)


def test_history_belongs_to_the_cache(dynamic):
    """Prefill 50, crop to 40, 5 more tokens: transformers keeps the frequencies of length 50 (the longest
    seen, 45 >= 32). Another sequence's short call in between (which resets transformers' module) changes
    nothing for this one."""
    hf, part = dynamic.oracle(), load_part(dynamic.sep)
    from transformers import DynamicCache

    prompt, more = token_ids(1, 50, seed=3), token_ids(1, 5, seed=4)
    with torch.no_grad():
        theirs = DynamicCache()
        hf(prompt, past_key_values=theirs, use_cache=True)
        theirs.crop(-10)  # transformers 5: negative = tokens to drop
        want = hf(more, past_key_values=theirs, use_cache=True).logits

        cache, other = part.new_cache(), part.new_cache()
        part(prompt, cache=cache)
        part(token_ids(1, 12, seed=5), cache=other)  # another sequence, short
        part(token_ids(1, 3, seed=6))  # and a call without a cache, short: both reset transformers' state
        cache.crop(40)
        got = part(more, cache=cache)
    torch.testing.assert_close(got, want, **FP32)


def test_rejected_call_and_crop_zero(dynamic, monkeypatch):
    """A refused or failed call leaves the cache's RoPE history as it was; crop(0) makes it a new sequence."""
    hf, part = dynamic.oracle(), load_part(dynamic.sep)
    cache = part.new_cache()
    with torch.no_grad():
        part(token_ids(1, 50, seed=7), cache=cache)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=384\)"):
            part(torch.full((1, 70), 999), cache=cache)  # refused before anything ran
        with monkeypatch.context() as m:
            m.setattr(part.model.layers["1"], "forward", _boom)
            with pytest.raises(RuntimeError, match="boom"):
                part(token_ids(1, 70, seed=10), cache=cache)  # failed midway, after the tables of 120 positions
        cache.crop(45)
        torch.testing.assert_close(
            part(token_ids(1, 5, seed=8), cache=cache)[:, -1], _hf_after_crop(hf, 50, 45), **FP32
        )
        cache.crop(0)
        fresh = dynamic.oracle()  # its history: none (transformers' model after one 40-token call)
        torch.testing.assert_close(
            part(token_ids(1, 40, seed=9), cache=cache), fresh(token_ids(1, 40, seed=9)).logits, **FP32
        )


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def _hf_after_crop(hf, seq: int, keep: int) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache()
    hf(token_ids(1, seq, seed=7), past_key_values=cache, use_cache=True)
    cache.crop(keep - seq)
    return hf(token_ids(1, 5, seed=8), past_key_values=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("with_cache", [False, True], ids=["module", "cache"])
def test_tables_bit_equal_transformers_over_a_call_history(with_cache):
    """cos/sin bit for bit against transformers' rotary module over growth, keep (equal to the original
    and to the longest length), reset and regrowth; the history in the module or carried by a cache."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=24, max_position_embeddings=32, rope_parameters=rope
    )
    theirs, ours = LlamaRotaryEmbedding(cfg), RotaryEmbedding(rope, 24, 32)
    seen = None
    for seq in (20, 50, 40, 32, 50, 33, 31, 32, 33, 70, 71, 12, 1, 90):
        pos = torch.arange(seq)[None]
        cos, sin = theirs(torch.zeros(1, dtype=torch.float32), pos)
        if with_cache:
            seen = ours.length_for(pos, seen)
            got = ours(pos, torch.float32, seen)
        else:
            got = ours(pos, torch.float32)
            torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, atol=0, rtol=0, msg=f"seq {seq}")
        torch.testing.assert_close(got, (cos, sin), atol=0, rtol=0, msg=f"seq {seq}")
