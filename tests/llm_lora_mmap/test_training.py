"""Training steps: frozen weights untouched and gradient-free; lazy parts (weights streamed per forward) equal RAM ones."""

import pytest
import torch
from lora_helpers import ALL7, ids, lm_loss, lora_grads, randomize_adapters

import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, lora_layers, mark_only_lora_trainable


def _steps(model, tokens, n=3, lr=1e-2):
    opt = torch.optim.AdamW(mark_only_lora_trainable(model), lr=lr)
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = lm_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_frozen_weights_unchanged_and_without_gradients(sep):
    path, _ = sep("qwen2")
    part = load_part(path, "f")
    frozen = {n: (p.detach().clone(), p.data_ptr()) for n, p in part.named_parameters()}
    apply_lora(part, ALL7, r=4, lora_alpha=8)  # default init: B = 0, so training must move B first
    before = {n: p.detach().clone() for n, p in part.named_parameters() if "lora_" in n}
    losses = _steps(part, ids(seed=11), n=4)
    assert losses[-1] < losses[0]
    for name, p in part.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and not torch.equal(p, before[name]), name
            continue
        key = name.replace(".base_layer", "")
        value, ptr = frozen[key]
        assert p.grad is None and not p.requires_grad, name  # no gradient was ever allocated
        assert torch.equal(p, value) and p.data_ptr() == ptr, name  # same values, still the mmapped view
    assert sw.verify(path).ok  # and the files are untouched


@pytest.mark.parametrize("stream_mode", ["copy", "mmap"])
def test_lazy_part_with_adapters_equals_ram(sep, stream_mode):
    path, _ = sep("qwen3")
    ram = load_part(path, "f")
    lazy = load_part(path, "f", lazy=True, stream_mode=stream_mode)
    for model in (ram, lazy):
        apply_lora(model, ALL7, r=4, lora_alpha=8)
        randomize_adapters(model, seed=12)
    q = lazy.model.layers["1"].self_attn.q_proj
    assert q.base_layer.weight.device.type == "meta"  # between forwards: no base weight resident
    assert q.lora_A.weight.device.type == "cpu"  # the adapters stay in RAM
    tokens = ids(seed=13)
    for model in (ram, lazy):
        mark_only_lora_trainable(model)
        lm_loss(model(tokens), tokens).backward()
    assert q.base_layer.weight.device.type == "meta"
    got, want = lora_grads(lazy), lora_grads(ram)
    assert sorted(got) == sorted(want) and len(got) == 2 * 7 * 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    for model in (ram, lazy):  # optimizer steps on both: the adapters persist across streamed forwards
        _steps(model, tokens, n=2)
    with torch.no_grad():
        torch.testing.assert_close(lazy(tokens), ram(tokens), atol=1e-4, rtol=1e-4)
    lazy.close()


def test_part_of_a_model_adapts_only_its_layers(sep):
    path, _ = sep("qwen2")
    part = load_part(path, "1-3 e")
    names = apply_lora(part, ["down_proj"], r=2)
    assert names == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert sorted(lora_layers(part)) == names
