"""matmul="bsm" (llm_bsm_kernel bundles) equals transformers and the torch path: logits, decode, grads."""

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import bsm_path, load_part

pytest.importorskip("llm_bsm_kernel")


@pytest.fixture(autouse=True)
def every_call_bundles(monkeypatch):
    """Tiny test inputs are below the decode threshold: send every call through the bundles."""
    monkeypatch.setattr(bsm_path, "MIN_ROWS", 1)


def _count_bundles(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = bsm_path._bundle

    def spy(items, out):
        calls.append(len(items))
        return real(items, out)

    monkeypatch.setattr(bsm_path, "_bundle", spy)
    return calls


VARIANTS = [
    "qwen2",
    "qwen2_tied",
    "qwen2_v4",
    "qwen2_swa",
    "qwen2_swa_v4",
    "qwen3",
    "qwen3_tied_sharded",
]


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_transformers(sep, name, lazy):
    path, ckpt = sep(name)
    ids = token_ids()
    with torch.no_grad():
        model = load_part(path, "f", lazy=lazy, matmul="bsm")
        got = model(ids)
        model.close()
        want = ckpt.model(ids).logits
    torch.testing.assert_close(got, want, **FP32)


def test_left_padded_batch(sep):
    path, ckpt = sep("qwen2_swa")
    ids = token_ids(batch=3, seq=10, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        want = ckpt.model(ids, attention_mask=mask).logits
        got = load_part(path, matmul="bsm")(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **FP32)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_sliding_window_chunked_prefill(sep, chunk):
    path, ckpt = sep("qwen2_swa")
    ids = token_ids(batch=2, seq=17, seed=9)
    model = load_part(path, matmul="bsm")
    cache = model.new_cache()
    with torch.no_grad():
        want = ckpt.model(ids).logits
        got = torch.cat(
            [model(ids[:, s : s + chunk], cache=cache) for s in range(0, 17, chunk)],
            dim=1,
        )
    torch.testing.assert_close(got, want, **FP32)


def _greedy(model, ids, steps, mask=None):
    cache = model.new_cache()
    logits = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits = model(nxt, cache=cache, attention_mask=mask)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa", "qwen3"])
def test_kv_cache_decode_equals_generate(sep, name):
    path, ckpt = sep(name)
    ids = token_ids(batch=1, seq=9, seed=7)
    with torch.no_grad():
        want = ckpt.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False,
            pad_token_id=0, eos_token_id=None, top_k=None, top_p=None, temperature=None,
        )[:, 9:]  # fmt: skip
        got = _greedy(load_part(path, lazy=True, matmul="bsm"), ids, 12)
    assert torch.equal(got, want)


def test_padded_decode_logits_equal_torch_path(sep):
    """Left-padded batch, cached decode: every step's logits equal the torch path's."""
    path, _ = sep("qwen2_swa")
    ids = token_ids(batch=3, seq=8, seed=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :6] = 0
    models = [load_part(path, matmul=m) for m in ("torch", "bsm")]
    caches = [m.new_cache() for m in models]
    with torch.no_grad():
        for step in range(6):
            x = ids if step == 0 else torch.full((3, 1), 5 + step)
            m = mask if step == 0 else torch.cat([mask, torch.ones(3, step, dtype=mask.dtype)], 1)
            ref, got = (model(x, cache=c, attention_mask=m) for model, c in zip(models, caches))
            real = m[:, -x.shape[1] :].bool()
            torch.testing.assert_close(got[real], ref[real], **FP32)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa", "qwen3"])
def test_gradients_equal_torch_path(sep, name):
    """Gradients w.r.t. the input hidden states and a norm weight through the bundles' backward."""
    path, _ = sep(name)
    n = 4 if name == "qwen2_swa" else 3
    h0 = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(8))
    grads = []
    for matmul in ("torch", "bsm"):
        part = load_part(path, f"0-{n} e", matmul=matmul)
        norm = part.model.layers["1"].input_layernorm.weight.requires_grad_(True)
        x = h0.clone().requires_grad_(True)
        (part(x).float() ** 2).mean().backward()
        assert x.grad is not None and norm.grad is not None
        grads.append((x.grad, norm.grad))
    torch.testing.assert_close(grads[1], grads[0], **FP32)


def test_each_layer_runs_four_bundles(sep, monkeypatch):
    """q/k/v (3 items), scores and P@V (one item per row and KV head), gate/up (2 items)."""
    path, _ = sep("qwen2")
    calls = _count_bundles(monkeypatch)
    with torch.no_grad():
        load_part(path, matmul="bsm")(token_ids(batch=2))
    assert calls == [3, 4, 4, 2] * 3  # 3 layers, batch 2 x 2 KV heads


def test_small_calls_take_the_torch_path(sep, monkeypatch):
    """Below MIN_ROWS tokens (decode steps) the layer computes as matmul='torch' does."""
    path, _ = sep("qwen2")
    monkeypatch.setattr(bsm_path, "MIN_ROWS", 64)
    calls = _count_bundles(monkeypatch)
    model = load_part(path, matmul="bsm")
    cache = model.new_cache()
    with torch.no_grad():
        model(token_ids(batch=2, seq=32), cache=cache)  # 64 tokens: bundles
        n = len(calls)
        model(token_ids(batch=2, seq=1), cache=cache)  # 2 tokens: torch
    assert n == 12 and len(calls) == n


def test_bf16_close_to_torch_path(sep):
    path, _ = sep("qwen2")
    ids = token_ids(seed=5)
    with torch.no_grad():
        ref = load_part(path, dtype="bf16")(ids)
        got = load_part(path, dtype="bf16", matmul="bsm")(ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=0.1, rtol=0.05)


def test_lora_wrapped_projections_fall_back_to_their_modules(sep):
    """A LoRA-wrapped q/k/v or gate/up computes itself; the result equals the torch path's."""
    lora = pytest.importorskip("llm_lora_mmap")
    path, _ = sep("qwen2")
    ids = token_ids(seed=6)
    outs = []
    for matmul in ("torch", "bsm"):
        part = load_part(path, matmul=matmul)
        torch.manual_seed(0)
        lora.apply_lora(part, ["q_proj", "up_proj"], r=4, lora_alpha=8, init_lora_weights=False)
        with torch.no_grad():
            outs.append(part(ids))
    torch.testing.assert_close(outs[1], outs[0], **FP32)
