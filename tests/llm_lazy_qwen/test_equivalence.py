"""Logits of the full model, chained parts and lazy mode equal transformers' (fp32, 1e-4)."""

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import QwenConfig, load_part

VARIANTS = [
    "qwen2",
    "qwen2_tied",
    "qwen2_v4",
    "qwen2_swa",
    "qwen2_swa_v4",
    "qwen3",
    "qwen3_tied_sharded",
    "qwen2_sharded",
]


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", VARIANTS)
def test_full_model_logits(sep, name, lazy):
    path, ckpt = sep(name)
    ids = token_ids()
    with torch.no_grad():
        want = ckpt.model(ids).logits
        model = load_part(path, "f", lazy=lazy)
        got = model(ids)
        model.close()
    torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3_tied_sharded", "qwen2_swa"])
def test_chained_parts(sep, name, lazy):
    path, ckpt = sep(name)
    n = ckpt.variant.num_layers
    ids = token_ids(seed=1)
    specs = ["b 0", f"1-{n - 1}", f"{n - 1} e"]
    parts = [load_part(path, s, lazy=lazy) for s in specs]
    with torch.no_grad():
        h = ids
        for p in parts:
            h = p(h)
        want = ckpt.model(ids).logits
    torch.testing.assert_close(h, want, **FP32)
    # the hidden states between parts are transformers' hidden_states
    with torch.no_grad():
        hs = ckpt.model(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(parts[1](parts[0](ids)), hs[n - 1], **FP32)


def test_begin_only_and_end_only(sep):
    path, ckpt = sep("qwen2_tied")
    ids = token_ids(seed=2)
    begin, rest, end = load_part(path, "b"), load_part(path, "0-3"), load_part(path, "e")
    with torch.no_grad():
        got = end(rest(begin(ids)))
        want = ckpt.model(ids).logits
    torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_logits_to_keep(sep, lazy):
    path, ckpt = sep("qwen2")
    ids = token_ids(seed=3)
    model = load_part(path, lazy=lazy, head_chunk_size=100)  # several vocabulary chunks (vocab 384)
    with torch.no_grad():
        full = ckpt.model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:], **FP32)
        torch.testing.assert_close(model(ids, logits_to_keep=4), full[:, -4:], **FP32)
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 5])), full[:, [0, 5]], **FP32)
        torch.testing.assert_close(model(ids, logits_to_keep=slice(2, 6)), full[:, 2:6], **FP32)


def test_left_padded_batch(sep):
    path, ckpt = sep("qwen2_swa")
    ids = token_ids(batch=3, seq=10, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    model = load_part(path)
    with torch.no_grad():
        want = ckpt.model(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **FP32)


def test_bf16_close_to_fp32(sep):
    path, ckpt = sep("qwen2")
    ids = token_ids(seed=5)
    with torch.no_grad():
        ref = load_part(path, dtype=torch.float32)(ids)
        got = load_part(path, dtype="bf16", lazy=True)(ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)


def test_lazy_layers_are_released_after_use(sep):
    path, _ = sep("qwen2")
    model = load_part(path, lazy=True)
    with torch.no_grad():
        model(token_ids(seed=6))
    for layer in model.model.layers.values():
        assert all(p.device.type == "meta" for p in layer.parameters())
    model.close()


def test_config_styles_agree(qwen_checkpoints):
    v4 = QwenConfig.from_json(qwen_checkpoints("qwen2_swa_v4").path / "config.json")
    v5 = QwenConfig.from_json(qwen_checkpoints("qwen2_swa").path / "config.json")
    assert v4.rope_theta == v5.rope_theta == 10000.0
    assert v4.layer_types == v5.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert v4.window(3) == 4 and v4.window(0) is None
    q3 = QwenConfig.from_json(qwen_checkpoints("qwen3").path / "config.json")
    assert q3.is_qwen3 and q3.head_dim == 24 and not q3.qkv_bias


@pytest.mark.parametrize("mode", ["copy", "mmap"])
@pytest.mark.parametrize(("prefetch", "resident_mb"), [(0, 0.0), (1, 0.0), (5, 0.0), (2, 0.05), (2, 100.0)])
def test_lazy_knobs_do_not_change_results(sep, prefetch, resident_mb, mode):
    path, ckpt = sep("qwen2_tied")
    ids = token_ids(seed=7)
    model = load_part(
        path, lazy=True, prefetch=prefetch, resident_mb=resident_mb, head_chunk_size=100, stream_mode=mode
    )
    with torch.no_grad():
        want = ckpt.model(ids).logits
        for _ in range(2):  # the second forward uses the cyclic prefetch and pinned items
            torch.testing.assert_close(model(ids), want, **FP32)
    if resident_mb >= 100:
        assert model._streamer.pinned == set(model._streamer.order)
    model.close()


@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_autograd_through_a_lazy_part(sep, mode):
    """Gradients w.r.t. the input hidden states through lazy layers equal the in-RAM ones and HF's."""
    path, ckpt = sep("qwen2")
    g = torch.Generator().manual_seed(8)
    h0 = torch.randn(2, 7, 64, generator=g)
    grads = []
    for lazy in (False, True):
        part = load_part(path, "0-3 e", lazy=lazy, stream_mode=mode, prefetch=1)
        x = h0.clone().requires_grad_(True)
        for _ in range(2):  # a second pass reuses buffers that autograd must not see overwritten
            out = part(x)
        (out.float() ** 2).mean().backward()
        grads.append(x.grad)
        part.close()
    torch.testing.assert_close(grads[1], grads[0], **FP32)


def test_step_api_equals_forward(sep):
    path, ckpt = sep("qwen3")
    part = load_part(path, lazy=True)
    ids = token_ids(seed=9)
    with torch.no_grad():
        h, step = part.prepare(ids)
        for i in part.layer_ids:
            h = part.run_layer(i, h, step)
        torch.testing.assert_close(part.finish(h, step), ckpt.model(ids).logits, **FP32)


@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_any_access_order_is_correct_and_bounded(sep, mode):
    """Layers visited in reverse (a layer-wise backward) and at random: right weights, few buffers."""
    path, ckpt = sep("qwen2")
    part = load_part(path, lazy=True, prefetch=2, stream_mode=mode)
    sd = ckpt.model.state_dict()
    order = [0, 1, 2, 2, 1, 0, 2, 0, 1, 1, 0, 2, 1, 0]
    for i in order:
        with part.materialized(i) as layer:
            assert torch.equal(layer.mlp.up_proj.weight, sd[f"model.layers.{i}.mlp.up_proj.weight"])
    if mode == "copy":
        assert part._streamer._allocated <= 2 + 3  # prefetch + current + spare, plus one per direction change
    part.close()
