"""QLoRA: LoraLinear over a quantized QuantLinear (int8, int4) equals LoraLinear over an nn.Linear holding the
dequantized weight: outputs, the gradients of A and B, and the input gradient (fp32 1e-4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llm_sepweight as sw
from llm_lazy_qwen import QuantLinear, load_part
from llm_lora_mmap import LoraError, LoraLinear, apply_lora, is_linear_like, load_adapter, lora_layers, save_adapter

TOL = {"atol": 1e-4, "rtol": 1e-4}

# (scheme, out, in, group size): N = 64 takes this CPU's int4 kernel layout, N = 40 the "rows" layout
SHAPES = [("int8", 40, 96, None), ("int4", 64, 96, 32), ("int4", 40, 64, 64)]


def _quant_linear(w: torch.Tensor, bias: torch.Tensor | None, scheme: str, group_size: int | None):
    """(QuantLinear of w, nn.Linear holding its dequantized weight and the same bias)."""
    n, k = w.shape
    if scheme == "int8":
        qweight, scales = sw.quantize_int8(w)
        spec = sw.QuantSpec("int8", (n, k))
        tensors = {"qweight": qweight, "scales": scales}
    else:
        layout = sw.int4_layout() if n % 64 == 0 else "rows"
        qweight, sz = sw.quantize_int4(w, group_size, layout=layout)
        spec = sw.QuantSpec("int4", (n, k), group_size, layout)
        tensors = {"qweight": qweight, "scales_and_zeros": sz}
    quant = QuantLinear(k, n, bias is not None, scheme, group_size, spec.layout)
    quant.load_state_dict({**tensors, **({"bias": bias} if bias is not None else {})}, assign=True)
    dense = nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(sw.dequantize(tensors, spec, torch.float32))
        if bias is not None:
            dense.bias.copy_(bias)
    return quant, dense


def _twins(scheme, n, k, g, bias=True, dropout=0.0, seed=0):
    """LoraLinear over the QuantLinear and over its dequantized nn.Linear, the same random A and B."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.1
    b = torch.randn(n, generator=gen) if bias else None
    quant, dense = _quant_linear(w, b, scheme, g)
    q = LoraLinear(quant, r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
    d = LoraLinear(dense, r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
    d.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    return q, d


@pytest.mark.parametrize("scheme, n, k, g", SHAPES, ids=[f"{s}-{n}x{k}" for s, n, k, _ in SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
def test_qlora_layer_equals_lora_on_dequantized_linear(scheme, n, k, g, bias, dropout):
    q, d = _twins(scheme, n, k, g, bias, dropout)
    x = torch.randn(2, 7, k, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 7, n, generator=torch.Generator().manual_seed(2))
    outs, x_grads = [], []
    for layer in (q, d):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout mask in both
        y = layer(xi)
        y.backward(grad)
        outs.append(y.detach())
        x_grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    torch.testing.assert_close(x_grads[0], x_grads[1], **TOL)
    for which in ("lora_A", "lora_B"):
        got, want = getattr(q, which).weight.grad, getattr(d, which).weight.grad
        torch.testing.assert_close(got, want, **TOL, msg=which)
    frozen = [name for name, p in q.named_parameters() if p.requires_grad and "lora_" not in name]
    assert not frozen and all(p.grad is None for p in q.base_layer.parameters())


def test_qlora_decode_rows_and_bf16_activations():
    """One row (the int kernels' decode path) and bf16 activations: the result stays in x's dtype."""
    q, d = _twins("int4", 64, 96, 32)
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(q(x), d(x), **TOL)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 64)
    torch.testing.assert_close(y.float(), d(x), atol=0.05, rtol=0.05)


def test_is_linear_like_is_the_one_predicate():
    quant, dense = _quant_linear(torch.randn(40, 64), None, "int8", None)
    assert is_linear_like(dense) and is_linear_like(quant)
    assert not is_linear_like(nn.LayerNorm(4)) and not is_linear_like(torch.randn(2))

    class Declares(nn.Module):  # the declaration without int sizes is not enough
        is_frozen_linear = True

    assert not is_linear_like(Declares())
    with pytest.raises(TypeError, match="LoraLinear wraps an nn.Linear, got Declares; a quantized or other frozen"):
        LoraLinear(Declares())


def test_quantized_base_never_takes_the_bsm_path():
    """matmul='bsm' is a plain-nn.Linear fast path: a quantized base computes itself (64+ rows included)."""
    pytest.importorskip("llm_bsm_kernel")
    q, d = _twins("int8", 40, 96, None)
    qb = LoraLinear(q.base_layer, r=4, lora_alpha=8, init_lora_weights=False, matmul="bsm")
    qb.load_state_dict(q.state_dict())
    x = torch.randn(2, 64, 96)
    torch.testing.assert_close(qb(x), d(x), **TOL)


def test_apply_lora_finds_quantized_linears_and_keeps_adapter_keys():
    """'all-linear' and names select QuantLinears; the adapter's parameter names are the dense model's."""
    gen = torch.Generator().manual_seed(0)
    quant, _ = _quant_linear(torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen), "int8", None)
    dense_model = nn.ModuleDict({"q_proj": nn.Linear(64, 40), "norm": nn.LayerNorm(40)})
    quant_model = nn.ModuleDict({"q_proj": quant, "norm": nn.LayerNorm(40)})
    assert apply_lora(quant_model, "all-linear") == apply_lora(dense_model, "all-linear") == ["q_proj"]
    lora_names = lambda m: sorted(n for n, _ in m.named_parameters() if "lora_" in n)  # noqa: E731
    assert lora_names(quant_model) == lora_names(dense_model) == ["q_proj.lora_A.weight", "q_proj.lora_B.weight"]
    assert list(lora_layers(quant_model)) == ["q_proj"]
    with pytest.raises(LoraError, match="q_proj already has a LoRA adapter"):
        apply_lora(quant_model, ["q_proj"])


def test_meta_quantized_base_gets_adapters_on_cpu():
    """A lazy part's QuantLinear holds meta placeholders: A and B live in RAM, as over a meta nn.Linear."""
    quant, _ = _quant_linear(torch.randn(40, 64), None, "int8", None)
    quant = quant.to("meta")
    layer = LoraLinear(quant, r=2)
    assert layer.lora_A.weight.device.type == "cpu" and layer.in_features == 64 and layer.out_features == 40


@pytest.mark.parametrize("via", ["apply_lora", "load_adapter"])
def test_new_lora_layers_take_the_mode_of_the_module_they_wrap(sep, tmp_path, via):
    """Issue 15 item 1: an eval model (load_part returns one) stays in eval: with dropout > 0, two forwards of
    the same input are equal; a model in training mode gets LoRA dropout."""
    path, _ = sep("qwen2")
    ids = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(0))
    if via == "load_adapter":
        donor = load_part(path, "f")
        apply_lora(donor, ["q_proj", "down_proj"], r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
        save_adapter(donor, tmp_path / "adapter")
    part = load_part(path, "f")
    assert not part.training
    if via == "apply_lora":
        apply_lora(part, ["q_proj", "down_proj"], r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
    else:
        load_adapter(part, tmp_path / "adapter")
    assert lora_layers(part) and not any(m.training for m in part.modules())
    torch.testing.assert_close(part(ids), part(ids), atol=0, rtol=0)
    part.train()
    torch.manual_seed(0)
    first = part(ids)
    assert not torch.equal(first, part(ids))  # training: dropout masks differ per call
