"""QLoRA on a whole part loaded from a quantized folder: logits equal the LoRA'd dequantized model, saved
adapters are the files an unquantized model writes, and merging into quantized weights is refused."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import ids, randomize_adapters
from safetensors.torch import load_file
from torch import nn

import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lora_mmap import LoraError, apply_lora, is_linear_like, load_adapter, merge_adapter, save_adapter

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def quantized(qwen_checkpoints, tmp_path_factory):
    """``quantized(scheme) -> folder``: the tiny untied Qwen2 converted with quant=scheme."""
    root = tmp_path_factory.mktemp("qsep")
    cache = {}

    def get(scheme):
        if scheme not in cache:
            sw.convert(qwen_checkpoints("qwen2").path, root / scheme, quant=scheme, group_size=32, progress=False)
            cache[scheme] = root / scheme
        return cache[scheme]

    return get


def _dequantized_twin(folder, dense_folder):
    """The unquantized part holding the quantized folder's dequantized weights."""
    quant = load_part(folder, "f")
    dense = load_part(dense_folder, "f")
    for name, m in quant.named_modules():
        if is_linear_like(m) and not isinstance(m, nn.Linear):
            dense.get_submodule(name).weight = nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
    return dense


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lora_on_quantized_part_equals_lora_on_dequantized_part(quantized, sep, scheme, lazy):
    folder = quantized(scheme)
    dense_folder, _ = sep("qwen2")
    ref = _dequantized_twin(folder, dense_folder)
    part = load_part(folder, "f", lazy=lazy)
    for m in (ref, part):
        apply_lora(m, "all-linear", r=4, lora_alpha=8)
        randomize_adapters(m)
    x = ids(seq=9)
    with torch.no_grad():
        torch.testing.assert_close(part(x), ref(x), **TOL)
    part.close()


def test_adapter_saved_from_quantized_model_is_the_unquantized_models(quantized, sep, tmp_path):
    """Same keys, shapes, dtypes and config: PEFT loads it onto the bf16/fp32 model (tests/llm_sft/test_qlora.py)."""
    dense_folder, _ = sep("qwen2")
    saved = {}
    for name, folder in (("quant", quantized("int4")), ("dense", dense_folder)):
        part = load_part(folder, "f")
        apply_lora(part, "all-linear", r=4, lora_alpha=8)
        save_adapter(part, tmp_path / name, base_model_name_or_path="base")
        saved[name] = (
            json.loads((tmp_path / name / "adapter_config.json").read_text()),
            {k: (t.shape, t.dtype) for k, t in load_file(tmp_path / name / "adapter_model.safetensors").items()},
        )
    assert saved["quant"] == saved["dense"]
    assert len(saved["quant"][1]) == 2 * 7 * 3
    part = load_part(quantized("int8"), "f")  # an int4-trained adapter serves over int8 too: same keys
    assert len(load_adapter(part, tmp_path / "quant")) == 7 * 3


def test_merge_into_a_quantized_folder_is_refused(quantized, tmp_path):
    folder = quantized("int4")
    part = load_part(folder, "f")
    apply_lora(part, ["q_proj"], r=4, lora_alpha=8)
    save_adapter(part, tmp_path / "adapter")
    with pytest.raises(LoraError, match=r"is a quantized folder \(model.layers.0.self_attn.q_proj is stored as packed"):
        merge_adapter(folder, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_an_adapter_wrapped_before_its_base_is_swapped_for_a_quantized_one(quantized, sep):
    """LoRA first, then weights from a quantized folder: the loader swaps each ``base_layer`` for a
    ``QuantLinear`` under the adapter, which must then let the base compute (it read ``base.weight``)."""
    folder = quantized("int8")
    dense_folder, _ = sep("qwen2")
    ref = _dequantized_twin(folder, dense_folder)
    part = load_part(dense_folder, "f")
    for m in (ref, part):
        apply_lora(m, "all-linear", r=4, lora_alpha=8)
    randomize_adapters(ref)
    lora = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    part.load_state_dict(lora, strict=False)
    part.load_weights(sw.SepWeights(folder))  # plain bases -> QuantLinear, adapters kept
    assert not isinstance(part.get_submodule("model.layers.0.mlp.up_proj").base_layer, nn.Linear)
    x = ids(seq=9)
    with torch.no_grad():
        torch.testing.assert_close(part(x), ref(x), **TOL)
