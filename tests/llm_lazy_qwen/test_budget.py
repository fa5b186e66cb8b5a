"""The memory budget: the plan on synthetic sizes, and parts under a budget equal transformers and RAM."""

import pytest
import torch
from lazy_helpers import FP32, check_layerwise_backward, sweep_plans, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import ItemSize, Runtime, load_part, parse_size, plan_memory
from llm_lazy_qwen.budget import layer_of
from llm_lazy_qwen.streaming import item_size

MiB = 2**20
SMALL = {"max_context": 64, "head_chunk_size": 128}  # 3 head chunks; a KV cache of 64 tokens


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize(
    ("text", "want"),
    [
        (123, 123),
        ("800MB", 800 * 10**6),
        ("7.5GiB", int(7.5 * 2**30)),
        ("6G", 6 * 2**30),
        (" 1 kib ", 1024),
        ("2048", 2048),
        ("1.5gb", 1_500_000_000),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["6 gigs", "", "GiB", "1.2.3GB", "-1GB", "6GiBs"])
def test_parse_size_rejects_bad_strings(bad):
    with pytest.raises(
        ValueError, match=r"memory_budget .* is not a size; use bytes \(an int\) or a number with a unit"
    ):
        parse_size(bad)


def test_parse_size_rejects_zero_and_non_sizes():
    with pytest.raises(ValueError, match="memory_budget must be positive, got 0"):
        parse_size(0)
    with pytest.raises(ValueError, match="memory_budget must be positive"):
        parse_size("0MB")
    for bad in (True, 1.5, None):
        with pytest.raises(TypeError, match="memory_budget must be an int"):
            parse_size(bad)


# ------------------------------------------------------------------------------------ the plan
def _model(layers=24, layer=100 * MiB, chunks=(40 * MiB,) * 4 + (10 * MiB,)):
    items = [ItemSize(i, layer, layer) for i in range(layers)]
    v = 0
    for c in chunks:
        items.append(ItemSize((v, v + c), c, c))
        v += c
    return items


RUNTIME = Runtime(kv_cache=64 * MiB, activations=30 * MiB, logits=5 * MiB, page_cache=64 * MiB)


def test_plan_partitions_the_items_and_stays_within_the_budget():
    items = _model()
    plan = plan_memory(1500 * MiB, items, RUNTIME, slots=3)
    assert sorted(map(str, plan.resident + plan.streamed)) == sorted(str(s.item) for s in items)
    assert not set(plan.resident) & set(plan.streamed)
    order = [s.item for s in items]
    assert list(plan.streamed) == [i for i in order if i in set(plan.streamed)]  # the part's order
    assert plan.read_per_token == sum(s.stored for s in items if s.item in set(plan.streamed))
    assert plan.resident_bytes + plan.read_per_token == plan.model_bytes
    assert plan.slot_bytes == 100 * MiB and plan.slots == 3
    assert plan.peak <= plan.budget
    assert "read per token" in str(plan) and "estimated peak" in str(plan)


def test_plan_reads_less_as_the_budget_grows_and_never_exceeds_it():
    items = _model()
    total = sum(s.resident for s in items)
    first = plan_memory(10**15, items, RUNTIME, slots=3)
    previous = None
    for budget in range(first.minimum, total + RUNTIME.total + 400 * MiB, 7 * MiB + 12345):
        plan = plan_memory(budget, items, RUNTIME, slots=3)
        assert plan.peak <= budget
        assert plan.minimum == first.minimum
        if previous is not None:
            assert plan.read_per_token <= previous.read_per_token, budget
        previous = plan
    assert previous.read_per_token == 0 and previous.streamed == () and previous.slots == 0


def test_plan_is_monotone_on_random_models():
    """Random size classes, converted items, odd sizes: never more bytes read for a larger budget."""
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        items = []
        for k in range(int(torch.randint(1, 30, (1,), generator=g))):
            stored = int(torch.randint(1, 6, (1,), generator=g)) * 10 * MiB + int(
                torch.randint(0, 1000, (1,), generator=g)
            )
            converted = bool(torch.rand(1, generator=g) < 0.2)
            items.append(ItemSize(k, stored, 2 * stored if converted else stored, converted))
        runtime = Runtime(kv_cache=int(torch.randint(0, 50, (1,), generator=g)) * MiB, page_cache=MiB)
        sweep_plans(items, runtime, 3, lambda minimum: range(minimum, minimum + 200 * 5 * MiB, 5 * MiB + 777))


def test_plan_spreads_the_streamed_layers():
    """Streamed layers evenly spaced: each read overlaps the compute of the resident layers before it."""
    items = _model(layers=12, chunks=())
    plan = plan_memory(RUNTIME.total + 3 * 100 * MiB + 8 * 100 * MiB, items, RUNTIME, slots=3)
    assert plan.streamed == (1, 4, 7, 10)  # 8 of 12 resident


def test_plan_keeps_a_large_item_resident_when_its_buffers_would_not_fit():
    """One item much larger than the rest: holding it beats three buffers of its size."""
    items = [ItemSize(0, 500 * MiB, 500 * MiB)] + [ItemSize(i, 10 * MiB, 10 * MiB) for i in range(1, 20)]
    plan = plan_memory(RUNTIME.total + 500 * MiB + 3 * 10 * MiB + 5 * MiB, items, RUNTIME, slots=3)
    assert 0 in plan.resident and plan.slot_bytes == 10 * MiB


def test_plan_counts_converted_copies():
    """bf16 stored, fp32 compute: a streamed slot is the read buffer plus the converted copy."""
    items = [ItemSize(i, 100 * MiB, 200 * MiB, converted=True) for i in range(10)]
    plan = plan_memory(10**12, items, RUNTIME, slots=3)
    assert plan.resident_bytes == 2000 * MiB and plan.load_bytes == 100 * MiB
    plan = plan_memory(plan.minimum, items, RUNTIME, slots=3)
    assert plan.slot_bytes == 300 * MiB and plan.resident == ()
    assert plan.minimum == RUNTIME.total + 3 * 300 * MiB


def test_plan_too_small_names_the_budget_and_the_minimum():
    items = _model()
    minimum = RUNTIME.total + 3 * 100 * MiB
    assert plan_memory(minimum, items, RUNTIME, slots=3).resident == ()
    with pytest.raises(
        ValueError,
        match=r"memory_budget 460\.0 MiB is too small to run this part: it needs at least 463\.0 MiB "
        r"\(3 streaming buffers of 100\.0 MiB \(the largest item\), KV cache 64\.0 MiB, activations 30\.0 MiB, "
        r"logits 5\.0 MiB, page cache of a read 64\.0 MiB\); raise the budget, lower max_context",
    ):
        plan_memory(460 * MiB, items, RUNTIME, slots=3)
    with pytest.raises(ValueError, match="too small"):
        plan_memory(minimum - 1, items, RUNTIME, slots=3)


# ------------------------------------------------------------------------------------ parts under a budget
def _mixed_budget(path, **kw):
    """A budget between the minimum and everything resident: some items resident, some streamed."""
    everything = load_part(path, memory_budget=10**12, **{**SMALL, **kw})
    plan = everything.memory_plan
    everything.close()
    return (plan.minimum + plan.peak) // 2


def _greedy_logits(model, ids, steps):
    cache = model.new_cache()
    logits = [model(ids, cache=cache)]
    for _ in range(steps):
        logits.append(model(logits[-1][:, -1:].argmax(-1), cache=cache))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "qwen3"])
def test_budget_decode_equals_ram_and_transformers(sep, name, prefetch):
    path, ckpt = sep(name)
    part = load_part(path, memory_budget=_mixed_budget(path), prefetch=prefetch, **SMALL)
    plan = part.memory_plan
    assert plan.resident and plan.streamed and any(layer_of(i) is not None for i in plan.streamed)
    ids = token_ids(batch=2, seq=9, seed=3)
    with torch.no_grad():
        got = _greedy_logits(part, ids, steps=6)
        ram = _greedy_logits(load_part(path, **SMALL), ids, steps=6)
        full = torch.cat([ids, got[:, 8:-1].argmax(-1)], dim=1)
        want = ckpt.model(full).logits
    part.close()
    torch.testing.assert_close(got, ram, **FP32)
    torch.testing.assert_close(got, want, **FP32)


def test_budget_converts_bf16_storage_to_fp32_compute(sep):
    path, _ = sep("qwen2_bf16")
    small = {"max_context": 64, "head_chunk_size": 32}  # small chunks: streaming them beats holding them
    budget = _mixed_budget(path, dtype="fp32", head_chunk_size=32)
    part = load_part(path, memory_budget=budget, dtype="fp32", prefetch=1, max_context=64, head_chunk_size=32)
    plan, source = part.memory_plan, sw.SepWeights(path)
    assert plan.resident and plan.streamed
    stored = [item_size(source, i, torch.float32).stored for i in plan.streamed]
    assert plan.slot_bytes == 3 * max(stored)  # the bf16 read buffer plus its fp32 copy
    ids = token_ids(batch=1, seq=7, seed=4)
    with torch.no_grad():
        got = _greedy_logits(part, ids, steps=3)
        want = _greedy_logits(load_part(path, dtype="fp32", **small), ids, steps=3)
    part.close()
    torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_budget_over_a_quantized_folder_equals_ram(sep, tmp_path, quant):
    """Integer tensors are sized and streamed as stored; quantized head chunks stream too."""
    path, _ = sep("qwen2")
    dst = tmp_path / quant
    sw.convert(path, dst, quant=quant, group_size=32, progress=False)
    part = load_part(dst, memory_budget=_mixed_budget(dst), prefetch=1, **SMALL)
    assert part.memory_plan.resident and part.memory_plan.streamed
    # prefill dequantizes the largest weight (a head chunk of 128 x 64 > gate/up 96 x 64) into an fp32 buffer
    assert part.memory_plan.runtime.scratch == 128 * 64 * 4
    size = item_size(sw.SepWeights(dst), 0, torch.float32)
    scales = sum(t.numel() * 4 for k, t in sw.SepWeights(dst).layer(0).items() if k.endswith("scales_and_zeros"))
    assert size.resident == size.stored + scales  # int4: the kernel's transposed copy of the scales
    assert part.memory_plan.model_bytes < 0.5 * load_part(path, memory_budget=10**12, **SMALL).memory_plan.model_bytes
    ids = token_ids(batch=2, seq=9, seed=3)
    with torch.no_grad():
        got = _greedy_logits(part, ids, steps=4)
        want = _greedy_logits(load_part(dst, **SMALL), ids, steps=4)
    part.close()
    torch.testing.assert_close(got, want, **FP32)


def test_budget_layerwise_backward_order_equals_ram(sep):
    """Layers materialized in reverse (a layer-wise backward), twice: outputs and input gradients equal RAM's."""
    path, _ = sep("qwen2_swa")
    part = load_part(path, memory_budget=_mixed_budget(path), prefetch=1, **SMALL)
    ram = load_part(path, **SMALL)
    assert part.memory_plan.resident and part.memory_plan.streamed
    ids = token_ids(batch=2, seq=6, seed=5)
    with torch.no_grad():
        h, step = ram.prepare(ids)
        inputs = []
        for i in ram.layer_ids:
            inputs.append(h)
            h = ram.run_layer(i, h, step)
    check_layerwise_backward(part, ram, step, lambda i: inputs[i])
    part.close()


def test_bytes_read_per_forward_equal_the_plan(sep):
    """prefetch=0 makes every read synchronous, so the count is exact: resident once, streamed every forward."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_mixed_budget(path), prefetch=0, **SMALL)
    plan, source = part.memory_plan, sw.SepWeights(path)
    resident = sum(item_size(source, i, torch.float32).stored for i in plan.resident)
    assert 0 < plan.read_per_token < plan.model_bytes
    ids = token_ids(batch=1, seq=5, seed=6)
    with torch.no_grad():
        part(ids)
        assert part._streamer.bytes_read == resident + plan.read_per_token
        for n in range(2, 5):
            part(ids[:, :1])
            assert part._streamer.bytes_read == resident + n * plan.read_per_token
    part.close()


def test_bytes_read_with_prefetch_stay_within_one_item(sep):
    path, _ = sep("qwen3")
    part = load_part(path, memory_budget=_mixed_budget(path), prefetch=1, **SMALL)
    plan = part.memory_plan
    ids = token_ids(batch=1, seq=5, seed=6)
    with torch.no_grad():
        for _ in range(4):
            part(ids)
    part.close()  # waits for the prefetch in flight
    extra = part._streamer.bytes_read - plan.resident_bytes - 4 * plan.read_per_token
    assert 0 <= extra <= plan.slot_bytes


# ------------------------------------------------------------------------------------ errors
def test_too_small_budget_is_an_error_before_anything_is_loaded(sep, monkeypatch):
    path, _ = sep("qwen2")

    def boom(*args, **kwargs):
        raise AssertionError("weights were read before the budget was checked")

    for method in ("begin", "end", "layer", "read_into", "gather_rows"):
        monkeypatch.setattr(sw.SepWeights, method, boom)
    with pytest.raises(ValueError, match=r"memory_budget 500\.0 KiB is too small to run this part: it needs at least"):
        load_part(path, memory_budget="512000B", max_context=64)


def test_budget_refuses_resident_mb_mmap_and_bad_strings(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="memory_budget and resident_mb both decide what stays resident; give one"):
        load_part(path, memory_budget="1GiB", resident_mb=10)
    with pytest.raises(ValueError, match="memory_budget streams in copy mode"):
        load_part(path, memory_budget="1GiB", stream_mode="mmap")
    with pytest.raises(ValueError, match="memory_budget '6 gigs' is not a size"):
        load_part(path, memory_budget="6 gigs")
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        load_part(path, memory_budget="1GiB", prefetch=-1)
    with pytest.raises(ValueError, match="max_context, max_batch and max_tokens must be >= 1"):
        load_part(path, memory_budget="1GiB", max_context=0)


def test_budget_implies_lazy_and_a_part_without_the_head(sep):
    path, ckpt = sep("qwen2")
    first = load_part(path, "b 0-2", memory_budget="1GiB", **SMALL)
    last = load_part(path, "2-3 e", lazy=True, **SMALL)
    assert first.lazy and first.memory_plan.streamed == () and last.memory_plan is None
    ids = token_ids(batch=1, seq=5, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), ckpt.model(ids).logits, **FP32)
    first.close()
    last.close()
