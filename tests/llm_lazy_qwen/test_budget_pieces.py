"""Under a memory budget layers are planned in pieces (attention + norms, each MLP projection).

A layer can then be part resident, part streamed; a streaming buffer holds one piece; the buffers
counted by the plan (``prefetch + k``, k = the most streamed pieces of one layer) are all that a
decode allocates.
"""

import pytest
import torch
from lazy_helpers import FP32, sweep_plans, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import ItemSize, Runtime, load_part, plan_memory
from llm_lazy_qwen.budget import layer_of, together
from llm_lazy_qwen.streaming import item_size, layer_pieces

MiB = 1 << 20
SMALL = {"max_context": 64, "head_chunk_size": 128}
RUNTIME = Runtime(kv_cache=8 * MiB, activations=4 * MiB)


def _pieces(layers=8, attn=20 * MiB, mlp=50 * MiB):
    items = []
    for i in range(layers):
        items.append(ItemSize((i, "attn"), attn, attn))
        items += [ItemSize((i, g), mlp, mlp) for g in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return items


def test_together_counts_the_pieces_of_one_layer():
    assert together([]) == 0
    assert together([0, 1, (0, 128)]) == 1  # whole layers and head chunks are used one at a time
    assert together([(0, "attn"), (0, "mlp.up_proj"), (1, "attn"), (0, 128)]) == 2
    assert layer_of((3, "mlp.up_proj")) == 3 and layer_of(3) is None and layer_of((0, 128)) is None


def test_plan_in_pieces_counts_one_buffer_per_piece_in_use():
    items = _pieces()
    total = sum(s.stored for s in items)
    # room for everything but ~6 MLP pieces and their buffers
    plan = plan_memory(total - 6 * 50 * MiB + RUNTIME.total, items, RUNTIME, slots=2)
    k = together(plan.streamed)
    assert plan.streamed and plan.slots == 2 + k - 1
    assert plan.slot_bytes == 50 * MiB
    assert plan.peak <= plan.budget
    # the small attention pieces are held: a layer streams its MLP pieces, at most k of them
    assert all(g != "attn" for _, g in plan.streamed)
    assert k == 1


def test_plan_in_pieces_reads_less_than_whole_layers():
    """The same model as whole layers needs buffers of a whole layer: it reads more in the same budget."""
    pieces = _pieces()
    layers = [ItemSize(i, 170 * MiB, 170 * MiB) for i in range(8)]
    for budget in range(500 * MiB, 1400 * MiB, 100 * MiB):
        a = plan_memory(budget, pieces, RUNTIME, slots=2)
        b = plan_memory(budget, layers, RUNTIME, slots=2)
        assert a.read_per_token <= b.read_per_token and a.peak <= budget
    assert plan_memory(10**12, pieces, RUNTIME, slots=2).streamed == ()
    # everything streamed: a layer's 4 pieces + one being read
    assert plan_memory(10**12, pieces, RUNTIME, slots=2).minimum == RUNTIME.total + 5 * 50 * MiB


def test_plan_in_pieces_is_monotone_and_within_budget():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        attn, mlp = (int(torch.randint(1, 60, (), generator=gen)) * MiB for _ in range(2))
        items = _pieces(layers=int(torch.randint(1, 9, (), generator=gen)), attn=attn, mlp=mlp)
        top = sum(s.stored for s in items) + RUNTIME.total + 5 * mlp
        for plan in sweep_plans(items, RUNTIME, 2, lambda minimum, top=top: torch.linspace(minimum, top, 15).long()):
            assert plan.slots == (2 + together(plan.streamed) - 1 if plan.streamed else 0)


def test_layer_pieces_in_the_order_a_layer_uses_them(sep, tmp_path):
    path, _ = sep("qwen2")
    pieces = layer_pieces(sw.SepWeights(path), 1)
    assert list(pieces) == ["attn", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert pieces["mlp.up_proj"] == ["mlp.up_proj.weight"]
    assert "self_attn.q_proj.bias" in pieces["attn"] and "input_layernorm.weight" in pieces["attn"]
    dst = tmp_path / "int4"
    sw.convert(path, dst, quant="int4", group_size=32, progress=False)
    quant = layer_pieces(sw.SepWeights(dst), 1)
    assert sorted(quant["mlp.up_proj"]) == ["mlp.up_proj.qweight", "mlp.up_proj.scales_and_zeros"]


def _budget_with_partial_layers(path, **kw):
    """A budget that holds some pieces of a layer and streams others of the same layer."""
    source = sw.SepWeights(path)
    everything = load_part(path, memory_budget=10**12, **{**SMALL, **kw})
    plan = everything.memory_plan
    everything.close()
    dtype = torch.float32
    sizes = {i: item_size(source, i, dtype) for i in plan.resident}
    for budget in range(plan.peak, plan.minimum, -max(1, (plan.peak - plan.minimum) // 40)):
        trial = load_part(path, memory_budget=budget, **{**SMALL, **kw})
        p = trial.memory_plan
        trial.close()
        layers = {layer_of(i) for i in p.streamed} & {layer_of(i) for i in p.resident} - {None}
        if layers and any(sizes[i].stored for i in p.streamed if layer_of(i) is not None):
            return budget
    pytest.fail("no budget gives a layer with both resident and streamed pieces")


@pytest.mark.parametrize("quant", [None, "int4"])
def test_partially_resident_layers_equal_ram(sep, tmp_path, quant):
    path, _ = sep("qwen2")
    if quant is not None:
        dst = tmp_path / quant
        sw.convert(path, dst, quant=quant, group_size=32, progress=False)
        path = dst
    part = load_part(path, memory_budget=_budget_with_partial_layers(path), prefetch=1, **SMALL)
    plan = part.memory_plan
    ids = token_ids(batch=2, seq=9, seed=3)
    ram = load_part(path, **SMALL)
    with torch.no_grad():
        cache, want_cache = part.new_cache(), ram.new_cache()
        got, want = [part(ids, cache=cache)], [ram(ids, cache=want_cache)]
        resident = {k: v for k, v in part._resident_params.items()}
        for _ in range(4):
            nxt = want[-1][:, -1:].argmax(-1)
            got.append(part(nxt, cache=cache))
            want.append(ram(nxt, cache=want_cache))
            # the resident pieces keep their Parameters (caches keyed by them, e.g. int4 scales, hit)
            assert all(part._resident_params[k] is v for k, v in resident.items())
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), **FP32)
    # the buffers a decode allocated are the ones the plan counted, each no bigger than a slot
    streamer = part._streamer
    part.close()
    assert 0 < streamer._allocated <= plan.slots
    assert streamer._buffer_bytes <= plan.slot_bytes + 64 * 1024


def test_partially_resident_layer_backward_equals_ram(sep):
    """A layer-wise backward over a layer that is part resident, part streamed: gradients equal RAM's."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budget_with_partial_layers(path), prefetch=1, **SMALL)
    ram = load_part(path, **SMALL)
    ids = token_ids(batch=1, seq=6, seed=5)
    with torch.no_grad():
        h, step = ram.prepare(ids)
    for i in reversed(part.layer_ids):
        results = []
        for model in (part, ram):
            x = h.clone().requires_grad_(True)
            with model.materialized(i) as layer:
                out = layer(x, step.cos, step.sin, step.start, None, step.key_mask)
                (grad,) = torch.autograd.grad(out.square().sum(), x)
            results.append((out.detach(), grad))
        torch.testing.assert_close(results[0], results[1], **FP32)
    part.close()


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_pieces_are_prefetched_in_the_direction_of_traversal(sep, direction):
    """A layer-wise walk over layers in pieces, forward or in reverse (a backward): each streamed piece
    is read once per walk; only where a walk ends and the next begins a prefetch can miss (at most one
    item forward, two per walk in reverse: the next walk's start looks like a forward step)."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budget_with_partial_layers(path), prefetch=1, **SMALL)
    plan, source = part.memory_plan, sw.SepWeights(path)
    streamed = sum(item_size(source, i, torch.float32).stored for i in plan.streamed if layer_of(i) is not None)
    assert streamed > 0
    resident = sum(item_size(source, i, torch.float32).stored for i in plan.resident if layer_of(i) is not None)
    ids = token_ids(batch=1, seq=4, seed=2)
    layers = list(part.layer_ids) if direction == "forward" else list(reversed(part.layer_ids))
    with torch.no_grad():
        h, step = part.prepare(ids)
        for _ in range(3):
            for i in layers:
                with part.materialized(i) as layer:
                    layer(h, step.cos, step.sin, step.start, None, step.key_mask)
    part.close()  # waits for the prefetch in flight
    extra = part._streamer.bytes_read - resident - 3 * streamed
    assert 0 <= extra <= (plan.slot_bytes if direction == "forward" else 3 * 2 * plan.slot_bytes)


def test_cache_under_a_budget_is_allocated_once_as_the_plan_counts(sep):
    """new_cache() of a budgeted part allocates max_context tokens at once: exactly the plan's KV bytes
    (a cache grown by doubling could hold twice that); past max_context it still grows, and equals RAM."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budget_with_partial_layers(path), **SMALL)
    ram = load_part(path, **SMALL)
    ids = token_ids(batch=1, seq=5, seed=7)
    with torch.no_grad():
        cache, want_cache = part.new_cache(), ram.new_cache()
        got, want = part(ids, cache=cache), ram(ids, cache=want_cache)
        held = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in cache.layers.values())
        assert all(c.k.shape[2] == SMALL["max_context"] for c in cache.layers.values())
        assert held == part.memory_plan.runtime.kv_cache
        for _ in range(SMALL["max_context"]):  # past max_context: grows as usual
            nxt = want[:, -1:].argmax(-1)
            got, want = part(nxt, cache=cache), ram(nxt, cache=want_cache)
        torch.testing.assert_close(got, want, **FP32)
    assert all(c.k.shape[2] > SMALL["max_context"] for c in cache.layers.values())
    assert all(c.k.shape[2] < SMALL["max_context"] for c in ram.new_cache().layers.values() if c.k is not None)
    part.close()


def test_reserve_keeps_part_of_the_budget_for_the_caller(sep):
    path, _ = sep("qwen2")
    budget = _budget_with_partial_layers(path)
    plain = load_part(path, memory_budget=budget, **SMALL).memory_plan
    kept = load_part(path, memory_budget=budget, reserve=plain.resident_bytes // 2, **SMALL).memory_plan
    assert kept.runtime.reserved == plain.resident_bytes // 2 and kept.peak <= budget
    assert kept.resident_bytes < plain.resident_bytes and kept.read_per_token > plain.read_per_token
    assert "reserved for the caller" in str(kept)
    with pytest.raises(ValueError, match="reserve must be positive"):
        load_part(path, memory_budget=budget, reserve="0MB", **SMALL)
    with pytest.raises(ValueError, match="reserve keeps part of a memory_budget for the caller"):
        load_part(path, reserve="1MB", **SMALL)
    with pytest.raises(ValueError, match="too small"):
        load_part(path, memory_budget=budget, reserve=budget, **SMALL)


def test_a_piece_failing_to_load_leaves_the_part_usable(sep, monkeypatch):
    """A read failing on a layer's second piece: the call raises, the pieces already fetched are handed
    back, and the next call equals RAM with no more buffers than the plan counts."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budget_with_partial_layers(path), prefetch=0, **SMALL)
    plan = part.memory_plan
    layer = next(layer_of(i) for i in plan.streamed if layer_of(i) is not None)
    pieces = [i for i in part._streamer.order if layer_of(i) == layer]
    victim = pieces[-1]  # fetched after the layer's other pieces
    real_load = part._streamer._load
    failed = []

    def flaky(item):
        if item == victim and not failed:
            failed.append(item)
            raise OSError("disk went away")
        return real_load(item)

    monkeypatch.setattr(part._streamer, "_load", flaky)
    ids = token_ids(batch=1, seq=5, seed=9)
    ram = load_part(path, **SMALL)
    with torch.no_grad():
        with pytest.raises(OSError, match="disk went away"):
            part(ids, cache=part.new_cache())
        assert failed and part._held == set()
        got = part(ids, cache=part.new_cache())
        want = ram(ids, cache=ram.new_cache())
    torch.testing.assert_close(got, want, **FP32)
    assert part._streamer._allocated <= plan.slots
    part.close()
