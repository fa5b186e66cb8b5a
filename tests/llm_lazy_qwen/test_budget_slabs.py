"""Under a memory budget every linear streams as row slabs, used one at a time just in time (SlabLinear).

A layer's norms and biases are one small item, always resident; its linears' slabs stream in the order
of use (q, k, v, o, gate, up, down). One slab is in use at a time, so the buffers a decode allocates
are the plan's ``prefetch + 1``. The tests shrink ``SLAB_BYTES`` so that the tiny models' linears have
several slabs; outputs equal RAM and transformers (fp32), gradients equal autograd on the RAM part.
"""

import re
import threading

import pytest
import torch
from family_fixtures import build_family
from lazy_helpers import FP32, check_layerwise_backward, decode, sweep_plans, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import ItemSize, QwenConfig, QwenPart, Runtime, load_part, plan_memory, stream_items
from llm_lazy_qwen.budget import layer_of
from llm_lazy_qwen.slab_linear import SlabLinear
from llm_lazy_qwen.streaming import SMALL, USE_ORDER, item_size, layer_slabs

MiB = 1 << 20
SMALL_RUN = {"max_context": 64, "head_chunk_size": 128}
RUNTIME = Runtime(kv_cache=8 * MiB, activations=4 * MiB)


@pytest.fixture(autouse=True)
def small_slabs(monkeypatch):
    """4 KiB slabs: a 64 x 64 fp32 weight is 4 slabs of 16 rows, gate/up (96 x 64) 6."""
    monkeypatch.setattr(stream_items, "SLAB_BYTES", 4096)


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory):
    return build_family("llama_bias", tmp_path_factory.mktemp("families"))


def _quantized(sep, tmp_path, quant):
    path, _ = sep("qwen2")
    if quant is None:
        return path
    dst = tmp_path / quant
    sw.convert(path, dst, quant=quant, group_size=32, progress=False)
    return dst


def _budgets(path):
    """The smallest budget (everything streams), one in between, and one that holds everything."""
    everything = load_part(path, memory_budget=10**12, **SMALL_RUN)
    plan = everything.memory_plan
    everything.close()
    return {"minimum": plan.minimum, "mixed": (plan.minimum + plan.peak) // 2, "all resident": plan.peak}


# ------------------------------------------------------------------------------------ the slabs
def test_layer_slabs_in_the_order_of_use(sep, tmp_path):
    path, _ = sep("qwen2")
    small, slabs = layer_slabs(sw.SepWeights(path), 1)
    assert list(slabs) == list(USE_ORDER)  # not file order (mlp.down_proj, mlp.gate_proj, ...)
    assert slabs["self_attn.q_proj"] == [(0, 16), (16, 32), (32, 48), (48, 64)]  # 64 x 64 fp32 = 4 x 4 KiB
    assert slabs["mlp.gate_proj"] == [(a, a + 16) for a in range(0, 96, 16)]
    assert slabs["mlp.down_proj"] == [(a, a + 16) for a in range(0, 64, 16)]  # 64 x 96: 6 KiB per 16 rows
    assert "self_attn.q_proj.bias" in small and "input_layernorm.weight" in small
    assert not any(k.endswith("_proj.weight") for k in small)
    int4 = _quantized(sep, tmp_path, "int4")
    small, slabs = layer_slabs(sw.SepWeights(int4), 1)
    assert sw.SepWeights(int4).linears(1)["mlp.down_proj"].layout != "rows"  # 64 x 96: 2 slabs' bytes, but
    assert slabs["mlp.down_proj"] == [(0, 64)]  # int4 kernel layouts are cut at multiples of 64 rows only
    assert slabs["mlp.gate_proj"] == [(0, 48), (48, 96)]  # 96 rows stay in the "rows" layout: cut anywhere
    part = load_part(int4, memory_budget=10**12, **SMALL_RUN)
    assert (1, "mlp.gate_proj", 1) in part._streamer.order and (1, SMALL) in part.memory_plan.resident
    where = part._streamer._where((1, "mlp.gate_proj", 1))
    assert sorted(where[1]) == [("mlp.gate_proj.qweight", 48, 96), ("mlp.gate_proj.scales_and_zeros", 48, 96)]
    part.close()


def test_the_stream_order_is_the_order_of_use(sep):
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=10**12, **SMALL_RUN)
    order = [i for i in part._streamer.order if layer_of(i) == 0]
    assert order[0] == (0, SMALL)
    names = [name for _, name, _ in order[1:]]
    assert names == sorted(names, key=USE_ORDER.index)
    assert all(isinstance(m, SlabLinear) for n, m in part.named_modules() if n.endswith("_proj"))
    part.close()


class _Rows:
    """A fetcher over tensors in RAM handing out each slab's rows (a LayerStreamer's get / retire), counting."""

    def __init__(self, lin, tensors):
        self.lin, self.tensors, self.out = lin, tensors, 0

    def get(self, item):
        a, b = self.lin.rows[item[2]]
        self.out += 1
        return {key: t[a:b] for key, t in self.tensors.items()}

    def retire(self, tensors, reuse=True):
        self.out -= 1
        assert self.out == 0  # one slab in use at a time


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("grad", [False, True])
def test_slab_linear_equals_the_whole_linear(scheme, grad):
    """Slabs of a 256-row weight (int4: in this CPU's kernel layout, cut at multiples of 64) with a bias:
    the output, and with grad the gradient w.r.t. x, equal the whole quantized / plain linear."""
    from llm_lazy_qwen import QuantLinear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(256, 64, generator=g), torch.randn(256, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    rows = [(0, 64), (64, 192), (192, 256)]
    if scheme is None:
        whole, spec = torch.nn.Linear(64, 256), None
        whole.weight.data, whole.bias.data = w, b
        stored = {"mlp.up_proj.weight": w}
    else:
        if scheme == "int8":
            q, s = sw.quantize_int8(w)
            spec = sw.QuantSpec("int8", (256, 64))
        else:
            spec = sw.QuantSpec("int4", (256, 64), 32, sw.int4_layout())
            q, s = sw.quantize_int4(w, 32, layout=spec.layout)
        whole = QuantLinear(64, 256, True, scheme, spec.group_size, spec.layout, "cpu")
        whole.qweight.data, whole.bias.data = q, b
        whole.scale_tensor().data = s
        stored = {"mlp.up_proj.qweight": q, f"mlp.up_proj.{spec.scales_key}": s}
    lin = SlabLinear(64, 256, True, 0, "mlp.up_proj", rows, spec, device="cpu")
    lin.bias.data = b
    lin.streamer = _Rows(lin, stored)
    results = []
    for m in (lin, whole):
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = m(xi)
            results.append((y.detach(), torch.autograd.grad(y.square().sum(), xi)[0] if grad else None))
    torch.testing.assert_close(results[0], results[1], **FP32)


# ------------------------------------------------------------------------------------ the plan
def _slab_items(layers=4, slab=30 * MiB, per_layer=10, small=MiB):
    items = []
    for i in range(layers):
        items.append(ItemSize((i, SMALL), small, small, forced=True))
        items += [ItemSize((i, "mlp.up_proj", j), slab, slab) for j in range(per_layer)]
    return items


def test_plan_holds_the_small_items_and_counts_one_slab_in_use():
    items = _slab_items()
    plan = plan_memory(plan_memory(10**12, items, RUNTIME, slots=2).minimum, items, RUNTIME, slots=2)
    assert set(plan.resident) == {(i, SMALL) for i in range(4)}  # forced, even at the minimum
    assert plan.slots == 2 and plan.slot_bytes == 30 * MiB
    assert plan.minimum == RUNTIME.total + 4 * MiB + 2 * 30 * MiB
    assert plan.peak <= plan.budget
    assert plan_memory(10**12, items, RUNTIME, slots=3).streamed == ()
    with pytest.raises(ValueError, match=r"too small to run this part: .*2 streaming buffers of 30\.0 MiB"):
        plan_memory(plan.minimum - 1, items, RUNTIME, slots=2)


def test_plan_counts_the_page_cache_of_the_largest_streamed_read():
    """The page cache a read holds is counted up to the largest item that may stream, not a large
    resident one (a head chunk held for good: its one read's pages are reclaimable)."""
    items = _slab_items() + [ItemSize((0, 4096), 200 * MiB, 200 * MiB)]
    runtime = Runtime(kv_cache=8 * MiB, page_cache=128 * MiB)
    minimum = plan_memory(10**12, items, runtime, slots=2).minimum
    assert minimum == runtime.kv_cache + 30 * MiB + 4 * MiB + 200 * MiB + 2 * 30 * MiB  # the chunk held
    plan = plan_memory(minimum, items, runtime, slots=2)
    assert (0, 4096) in plan.resident and plan.runtime.page_cache == 30 * MiB and plan.peak <= plan.budget
    everything = plan_memory(10**12, items, runtime, slots=2)
    assert everything.streamed == () and everything.runtime.page_cache == 0


def test_plan_in_slabs_is_monotone_and_within_budget():
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        slab = int(torch.randint(1, 60, (), generator=gen)) * MiB
        items = _slab_items(layers=int(torch.randint(1, 6, (), generator=gen)), slab=slab)
        top = sum(s.stored for s in items) + RUNTIME.total + 3 * slab
        for plan in sweep_plans(items, RUNTIME, 2, lambda minimum, top=top: torch.linspace(minimum, top, 15).long()):
            assert plan.slots == (2 if plan.streamed else 0)
            assert all(i[1] != SMALL for i in plan.streamed)


# ------------------------------------------------------------------------------------ equal to RAM
@pytest.mark.parametrize("budget", ["minimum", "mixed", "all resident"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_budgeted_decode_equals_ram(sep, tmp_path, quant, budget):
    """Prefill and decode with a cache, everything streamed / some slabs resident / all resident."""
    path = _quantized(sep, tmp_path, quant)
    part = load_part(path, memory_budget=_budgets(path)[budget], prefetch=1, **SMALL_RUN)
    plan = part.memory_plan
    assert bool(plan.streamed) == (budget != "all resident")
    ram = load_part(path, **SMALL_RUN)
    ids = token_ids(batch=2, seq=9, seed=3)
    with torch.no_grad():
        got, want = decode(part, ids, 4), decode(ram, ids, 4)
    torch.testing.assert_close(got, want, **FP32)
    if quant is None:
        _, ckpt = sep("qwen2")
        with torch.no_grad():
            full = torch.cat([ids, got[:, 8:-1].argmax(-1)], dim=1)
            torch.testing.assert_close(got, ckpt.model(full).logits, **FP32)
    streamer = part._streamer
    part.close()
    if plan.streamed:  # one slab in use and one being read: exactly the buffers the plan counts
        assert streamer._allocated == plan.slots == 2
        assert streamer._buffer_bytes <= plan.slot_bytes + 64 * 1024


def test_budgeted_reads_land_in_read_buffers(sep, monkeypatch):
    """The streaming buffers and the resident items are llm_sepweight.read_buffer memory (2 MiB pages:
    O_DIRECT requests of 4 MiB instead of ~0.5 MiB), and decode still equals RAM with them."""
    from llm_lazy_qwen import streaming

    path, _ = sep("qwen2")
    sizes = []

    def spy(nbytes):
        sizes.append(nbytes)
        return sw.read_buffer(nbytes)

    monkeypatch.setattr(streaming, "read_buffer", spy)
    part = load_part(path, memory_budget=_budgets(path)["mixed"], prefetch=1, **SMALL_RUN)
    plan = part.memory_plan
    ids = token_ids(batch=1, seq=5, seed=4)
    with torch.no_grad():
        got, want = decode(part, ids, 2), decode(load_part(path, **SMALL_RUN), ids, 2)
    torch.testing.assert_close(got, want, **FP32)
    streamer = part._streamer
    part.close()
    assert plan.streamed and plan.resident
    assert sizes.count(streamer._buffer_bytes) >= streamer._allocated == plan.slots  # every streaming buffer
    assert len(sizes) - streamer._allocated >= len(streamer.pinned)  # and every resident item read


@pytest.mark.parametrize("budget", ["minimum", "mixed"])
def test_llama_with_mlp_bias_equals_transformers(llama_bias, budget):
    part = load_part(llama_bias.sep, memory_budget=_budgets(llama_bias.sep)[budget], **SMALL_RUN)
    assert any(isinstance(m, SlabLinear) and m.bias is not None for n, m in part.named_modules() if "mlp" in n)
    ids = token_ids(batch=2, seq=7, seed=1)
    with torch.no_grad():
        got = decode(part, ids, 3)
        full = torch.cat([ids, got[:, 6:-1].argmax(-1)], dim=1)
        want = llama_bias.oracle()(full).logits
    part.close()
    torch.testing.assert_close(got, want, **FP32)


def test_prefetch_follows_the_order_of_use(sep, monkeypatch):
    """After the first forward every streamed slab was prefetched before it was asked for: none is
    read on the compute thread (a stream in file order, down before gate and up, would miss)."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budgets(path)["minimum"], prefetch=1, **SMALL_RUN)
    streamer, caller = part._streamer, threading.current_thread()
    missed = []
    real_load = streamer._load

    def load(item):
        if threading.current_thread() is caller and item not in streamer.pinned:
            missed.append(item)
        return real_load(item)

    monkeypatch.setattr(streamer, "_load", load)
    ids = token_ids(batch=1, seq=5, seed=2)
    with torch.no_grad():
        cache = part.new_cache()
        logits = part(ids, cache=cache)
        assert missed == []  # the first item is the resident (0, "small"), whose get prefetched the first slab
        for _ in range(3):
            logits = part(logits[:, -1:].argmax(-1), cache=cache)
    part.close()
    assert missed == [] and len(part.memory_plan.streamed) > 50


# ------------------------------------------------------------------------------------ gradients, LoRA
@pytest.mark.parametrize("quant", [None, "int8"])
def test_layerwise_backward_equals_ram(sep, tmp_path, quant):
    """Each layer recomputed under grad over streamed slabs (as llm_sft's backward): output and input
    gradient equal autograd on the RAM part."""
    path = _quantized(sep, tmp_path, quant)
    part = load_part(path, memory_budget=_budgets(path)["mixed"], prefetch=1, **SMALL_RUN)
    ram = load_part(path, **SMALL_RUN)
    ids = token_ids(batch=1, seq=6, seed=5)
    with torch.no_grad():
        h, step = ram.prepare(ids)
    check_layerwise_backward(part, ram, step, lambda i: h)
    part.close()


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_layerwise_training_step_stays_within_the_plans_buffers(sep, tmp_path, quant):
    """llm_sft's step: a forward without a graph, then each layer from the top recomputed under grad and
    backpropagated. The graph keeps no slab (backward fetches them again): the buffers are the plan's
    even with autograd on; each streamed slab is read three times (forward, recompute, backward), plus
    at most a few prefetches per layer where the direction turns; input gradients equal RAM's."""
    path = _quantized(sep, tmp_path, quant)
    part = load_part(path, memory_budget=_budgets(path)["minimum"], prefetch=1, **SMALL_RUN)
    ram = load_part(path, **SMALL_RUN)
    plan, source = part.memory_plan, sw.SepWeights(path)
    streamed = sum(item_size(source, i, torch.float32).stored for i in plan.streamed if layer_of(i) is not None)
    resident = sum(item_size(source, i, torch.float32).stored for i in plan.resident if layer_of(i) is not None)
    ids = token_ids(batch=1, seq=6, seed=8)
    grads = []
    for model in (part, ram):
        with torch.no_grad():
            h, step = model.prepare(ids)
            inputs = {}
            for i in model.layer_ids:
                inputs[i] = h
                h = model.run_layer(i, h, step)
        g = torch.ones_like(h)
        for i in reversed(model.layer_ids):
            x = inputs[i].clone().requires_grad_(True)
            with torch.no_grad(), model.materialized(i) as layer:
                with torch.enable_grad():
                    layer(x, step.cos, step.sin, step.start, None, step.key_mask).backward(g)
            g = x.grad
        grads.append(g)
    part.close()  # waits for the prefetch in flight
    torch.testing.assert_close(grads[0], grads[1], **FP32)
    assert part._streamer._allocated == plan.slots
    extra = part._streamer.bytes_read - resident - 3 * streamed
    assert 0 <= extra <= 2 * len(part.layer_ids) * plan.slot_bytes


@pytest.mark.parametrize("when", ["before load_weights", "after load_weights"])
def test_lora_over_a_budgeted_part_equals_lora_over_ram(sep, when):
    lora = pytest.importorskip("llm_lora_mmap")
    path, _ = sep("qwen2")
    source = sw.SepWeights(path)
    budget = _budgets(path)["mixed"]
    parts = []
    for kind in ("budget", "ram"):
        torch.manual_seed(0)
        part = QwenPart(QwenConfig.from_folder(source), "f", head_chunk_size=128)
        if when == "before load_weights":
            lora.apply_lora(part, "all-linear", r=4, lora_alpha=8, init_lora_weights=False)
        kw = {"memory_budget": budget, "max_context": 64} if kind == "budget" else {}
        part.load_weights(source, **kw)
        if when == "after load_weights":
            torch.manual_seed(0)
            lora.apply_lora(part, "all-linear", r=4, lora_alpha=8, init_lora_weights=False)
        parts.append(part)
    budgeted, ram = parts
    assert isinstance(budgeted.get_submodule("model.layers.0.mlp.up_proj").base_layer, SlabLinear)
    ids = token_ids(batch=1, seq=6, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(decode(budgeted, ids, 2), decode(ram, ids, 2), **FP32)
    # and the adapters' gradients through a layer-wise backward
    with torch.no_grad():
        h, step = ram.prepare(ids)
    grads = []
    for model in (budgeted, ram):
        with model.materialized(1) as layer:
            out = layer(h, step.cos, step.sin, step.start, None, step.key_mask)
            params = [p for n, p in layer.named_parameters() if "lora_" in n]
            grads.append(torch.autograd.grad(out.square().sum(), params))
    torch.testing.assert_close(grads[0], grads[1], **FP32)
    budgeted.close()


def test_a_budgeted_part_reloaded_without_a_budget_takes_plain_linears(sep):
    path, ckpt = sep("qwen2")
    source = sw.SepWeights(path)
    part = QwenPart(QwenConfig.from_folder(source), "f", head_chunk_size=128)
    part.load_weights(source, memory_budget=10**12, max_context=64)
    part.close()
    part.load_weights(source)
    assert type(part.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    ids = token_ids(batch=1, seq=5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(part(ids), ckpt.model(ids).logits, **FP32)


def test_sft_training_over_slabs_equals_ram(sep, tmp_path, capsys):
    """llm-sft train with a budget that streams slabs (several per linear): the losses of every step
    equal training in RAM (so the LoRA gradients through the layer-wise backward do)."""
    import csv
    import json

    sft = pytest.importorskip("llm_sft.cli")
    path, _ = sep("qwen2")
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} done"} for w in ("cat", "dog", "fox", "owl")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "--model", str(path), "--data", str(data), "--batch-size", "2", "--max-seq-len", "32"]
    base += ["--no-progress", "--head-chunk-size", "128"]
    # a budget just above the least that runs (it moves with llm_sft.training_reserve): most slabs stream
    assert sft.main([*base, "--out", str(tmp_path / "small"), "--memory-budget", "100KB"]) == 2
    least = float(re.search(r"needs at least ([0-9.]+) MiB", capsys.readouterr().err).group(1))
    losses = []
    for name, extra in (("ram", []), ("budget", ["--memory-budget", f"{least + 0.1:.2f}MiB"])):
        assert sft.main([*base, "--out", str(tmp_path / name), *extra]) == 0
        with open(tmp_path / name / "loss_log.csv", newline="") as f:
            losses.append([float(r["loss"]) for r in csv.DictReader(f)])
    plan = capsys.readouterr().err.split("llm-sft: memory plan: budget ")[1].splitlines()[0]
    assert int(re.search(r"\), (\d+) streamed", plan).group(1)) > 30  # slabs of 4 KiB: several per linear
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_bsm_matmul_falls_back_to_torch_for_slabs(sep):
    pytest.importorskip("llm_bsm_kernel")
    path, ckpt = sep("qwen2")
    part = load_part(path, memory_budget=_budgets(path)["mixed"], matmul="bsm", **SMALL_RUN)
    ids = token_ids(batch=2, seq=9, seed=4)  # enough rows for the bsm bundles where linears are plain
    with torch.no_grad():
        torch.testing.assert_close(part(ids), ckpt.model(ids).logits, **FP32)
    part.close()


# ------------------------------------------------------------------------------------ bad paths
def test_a_slab_failing_to_load_mid_linear_leaves_the_part_usable(sep, monkeypatch):
    """A read failing on a linear's second slab: the call raises, the slab already fetched is handed back,
    and the next call equals RAM with no more buffers than the plan counts."""
    path, _ = sep("qwen2")
    part = load_part(path, memory_budget=_budgets(path)["minimum"], prefetch=0, **SMALL_RUN)
    plan = part.memory_plan
    victim = (1, "mlp.gate_proj", 1)
    assert victim in plan.streamed
    real_load = part._streamer._load
    failed = []

    def flaky(item):
        if item == victim and not failed:
            failed.append(item)
            raise OSError("disk went away")
        return real_load(item)

    monkeypatch.setattr(part._streamer, "_load", flaky)
    ids = token_ids(batch=1, seq=5, seed=9)
    ram = load_part(path, **SMALL_RUN)
    with torch.no_grad():
        with pytest.raises(OSError, match="disk went away"):
            part(ids, cache=part.new_cache())
        assert failed and part._held == set()
        got = part(ids, cache=part.new_cache())
        want = ram(ids, cache=ram.new_cache())
    torch.testing.assert_close(got, want, **FP32)
    assert part._streamer._allocated <= plan.slots
    part.close()


def test_slab_linear_outside_a_budgeted_part_is_a_clear_error():
    lin = SlabLinear(8, 4, False, 0, "mlp.up_proj", [(0, 4)], device="cpu")
    with pytest.raises(RuntimeError, match="only inside a part loaded with a memory_budget"):
        lin(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"slabs \[\(0, 2\), \(3, 4\)\] do not cover rows 0\.\.4"):
        SlabLinear(8, 4, False, 0, "mlp.up_proj", [(0, 2), (3, 4)])
