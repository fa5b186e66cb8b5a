"""LoraLinear on its own: PEFT's init and scaling, PEFT's lora.Linear output, exact gradients, no upcast copies kept."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llm_lora_mmap import LoraLinear, frozen_linear


def _base(fan_in=24, fan_out=40, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out, bias=True).to(dtype)


def test_default_init_is_kaiming_a_and_zero_b():
    layer = LoraLinear(_base(), r=6)
    bound = 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.shape == (6, 24) and layer.lora_B.weight.shape == (40, 6)
    assert float(layer.lora_A.weight.abs().max()) <= bound and float(layer.lora_A.weight.std()) > bound / 4
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)  # a fresh adapter is a no-op


def test_gaussian_init_and_scaling():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 256), r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert abs(float(layer.lora_A.weight.std()) - 1 / 4) < 0.02
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == 2.0
    assert LoraLinear(nn.Linear(4, 4), r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4  # alpha / sqrt(r)
    assert "r=16, lora_alpha=8, scaling=2" in repr(LoraLinear(nn.Linear(4, 4), r=16, lora_alpha=8, use_rslora=True))


def test_base_is_frozen_and_adapters_follow_the_base_device():
    base = _base()
    layer = LoraLinear(base, r=2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_A.weight.dtype == torch.float32
    meta = LoraLinear(nn.Linear(8, 8, device="meta"), r=2)  # a lazy part's placeholder weight
    assert meta.lora_A.weight.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_output_equals_peft_lora_linear(dtype, rslora):
    ours = LoraLinear(_base(dtype=dtype), r=4, lora_alpha=12, use_rslora=rslora, init_lora_weights=False)  # random B
    ref = get_peft_model(
        nn.Sequential(_base(dtype=dtype)), LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, target_modules=["0"])
    )
    layer = ref.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT upcasts adapters (autocast_adapter_dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(2, 7, 24).to(dtype)
    got, want = ours(x), ref(x)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same operations in the same order


@pytest.mark.parametrize("stored", [torch.float64, torch.float32, torch.bfloat16], ids=["same", "fp32", "bf16"])
def test_gradcheck(stored):
    """Finite differences in float64 on x, A and B, with the frozen weight stored in float64 / fp32 / bf16."""
    layer = LoraLinear(_base(6, 5, dtype=stored), r=3, lora_alpha=5, dtype=torch.float64, init_lora_weights=False)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def f(x, a, b):  # the formula, with A and B as inputs
        return frozen_linear(x, layer.base_layer.weight, layer.base_layer.bias) + (x @ a.T @ b.T) * layer.scaling

    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, a, b))
    # and the module itself gives exactly the gradients of that reference
    out = layer(x)
    torch.testing.assert_close(out, f(x, a, b))
    g = torch.randn(out.shape, dtype=torch.float64)
    gx, ga, gb = torch.autograd.grad(out, (x, layer.lora_A.weight, layer.lora_B.weight), g)
    rx, ra, rb = torch.autograd.grad(f(x, a, b), (x, a, b), g)
    for got, want in [(gx, rx), (ga, ra), (gb, rb)]:
        torch.testing.assert_close(got, want)


def test_mixed_dtype_keeps_only_the_stored_weight_for_backward():
    """bf16 weight, fp32 activations: autograd saves the bf16 tensor itself, never an fp32 copy of it."""
    base = _base(64, 96, dtype=torch.bfloat16)
    layer = LoraLinear(base, r=4, init_lora_weights=False)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    weight_sized = [t for t in saved if t.numel() == base.weight.numel()]
    assert weight_sized, "the frozen weight must be saved for the input gradient"
    for t in weight_sized:
        assert t.dtype == torch.bfloat16 and t.data_ptr() == base.weight.data_ptr()
    out.sum().backward()
    want = (
        torch.ones(3, 96) @ base.weight.float()
        + (torch.ones(3, 96) @ layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling
    )
    torch.testing.assert_close(x.grad, want)
    assert base.weight.grad is None


def test_dropout_only_on_the_lora_branch():
    layer = LoraLinear(_base(), r=4, lora_dropout=0.5)  # B = 0: the output is the base whatever the mask
    layer.train()
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.allclose(layer(x), layer(x))  # two masks
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)
