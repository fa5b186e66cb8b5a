"""Adapter files: PEFT's layout, our adapters load in PEFT and PEFT's in ours with the same logits, atomic saves."""

import copy
import json
import shutil

import pytest
import torch
from lora_helpers import ALL7, FP32, ids, peft_name, randomize_adapters
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from llm_lazy_qwen import load_part
from llm_lora_mmap import (
    LoraError,
    apply_lora,
    load_adapter,
    lora_layers,
    read_adapter,
    save_adapter,
)
from llm_sepweight import safetensors_write


def test_saved_files_are_peft_layout(sep, tmp_path):
    path, _ = sep("qwen2")
    part = load_part(path, "f")
    apply_lora(part, ["q_proj", "down_proj"], r=4, lora_alpha=16, lora_dropout=0.05, dtype=torch.bfloat16)
    save_adapter(part, tmp_path / "ad", base_model_name_or_path="tiny-qwen2")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {
        k: cfg[k]
        for k in (
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "bias",
            "target_modules",
            "base_model_name_or_path",
        )
    } == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "use_rslora": False,
        "bias": "none",
        "target_modules": ["down_proj", "q_proj"],
        "base_model_name_or_path": "tiny-qwen2",
    }
    with safe_open(tmp_path / "ad" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"  # plus the config fields the weights belong with
        assert json.loads(f.metadata()["llm_lora_mmap.adapter_config"]) == {
            "r": 4,
            "lora_alpha": 16,
            "use_rslora": False,
            "target_modules": ["down_proj", "q_proj"],
        }
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 64)
        assert f.get_tensor("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight").shape == (64, 4)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}  # bf16 adapters are saved as fp32, as PEFT
    assert keys == {
        f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in range(3)
        for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"
    }


@pytest.mark.parametrize(
    ("name", "targets", "rslora"), [("qwen2", ALL7, False), ("qwen3_tied_sharded", ["q_proj", "v_proj"], True)]
)
def test_our_adapter_loads_in_peft_with_the_same_logits(sep, tmp_path, name, targets, rslora):
    path, ckpt = sep(name)
    part = load_part(path, "f")
    apply_lora(part, targets, r=4, lora_alpha=8, use_rslora=rslora)
    randomize_adapters(part, seed=20)
    save_adapter(part, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ckpt.model), tmp_path / "ad")
    tokens = ids(seed=21)
    with torch.no_grad():
        torch.testing.assert_close(part(tokens), peft_model(tokens).logits, **FP32)


def test_peft_adapter_loads_in_ours_with_the_same_logits(sep, tmp_path):
    path, ckpt = sep("qwen2")
    cfg = LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"])
    peft_model = get_peft_model(copy.deepcopy(ckpt.model), cfg)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    part = load_part(path, "f")
    names = load_adapter(part, tmp_path / "peft")  # applies LoRA from the adapter's config, then loads
    assert len(names) == 9
    layer = lora_layers(part)["model.layers.1.mlp.up_proj"]
    assert (layer.r, layer.scaling) == (8, 4 / 8**0.5)
    mine = dict(part.named_parameters())
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert torch.equal(mine[peft_name(n)], p), n
    tokens = ids(seed=23)
    with torch.no_grad():
        torch.testing.assert_close(part(tokens), peft_model(tokens).logits, **FP32)


def test_round_trip_into_a_model_with_lora_layers(sep, tmp_path):
    path, _ = sep("qwen2")
    a, b = load_part(path, "f"), load_part(path, "f")
    for model in (a, b):
        apply_lora(model, ALL7, r=4, lora_alpha=8)
    randomize_adapters(a, seed=24)
    save_adapter(a, tmp_path / "ad")
    load_adapter(b, tmp_path / "ad")
    sa, sb = ({n: p for n, p in m.named_parameters() if "lora_" in n} for m in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_subset_of_layers_saves_full_names(sep, tmp_path):
    """Adapting only some layers writes full module names, so PEFT adapts exactly those."""
    path, ckpt = sep("qwen2")
    part = load_part(path, "f")
    apply_lora(part, r"model\.layers\.1\.self_attn\.(q|v)_proj", r=2, lora_alpha=4)
    randomize_adapters(part, seed=25)
    save_adapter(part, tmp_path / "ad")
    cfg, weights = read_adapter(tmp_path / "ad")
    assert cfg.target_modules == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert sorted(weights) == cfg.target_modules
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ckpt.model), tmp_path / "ad")
    tokens = ids(seed=26)
    with torch.no_grad():
        torch.testing.assert_close(part(tokens), peft_model(tokens).logits, **FP32)


def test_part_loads_its_share_of_a_whole_model_adapter(sep, tmp_path):
    path, _ = sep("qwen2")
    full = load_part(path, "f")
    apply_lora(full, ALL7, r=4)
    randomize_adapters(full, seed=27)
    save_adapter(full, tmp_path / "ad")
    first = load_part(path, "b 0-2")
    with pytest.raises(LoraError, match=r"weights for 7 module\(s\) this model has no LoRA layer for.*strict=False"):
        load_adapter(first, tmp_path / "ad")
    assert not lora_layers(first)  # nothing changed
    assert len(load_adapter(first, tmp_path / "ad", strict=False)) == 14
    want = full.model.layers["1"].mlp.gate_proj.lora_B.weight
    assert torch.equal(first.model.layers["1"].mlp.gate_proj.lora_B.weight, want)


def test_save_is_atomic(sep, tmp_path, monkeypatch):
    path, _ = sep("qwen2")
    part = load_part(path, "f")
    apply_lora(part, ["q_proj"], r=2)
    save_adapter(part, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    randomize_adapters(part, seed=28)
    calls = []

    def crash_after_two_tensors(t, dtype):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # killed in the middle of writing the data
        return real(t, dtype)

    real = safetensors_write._chunks  # llm_sepweight's writer converts and writes each tensor in chunks
    monkeypatch.setattr(safetensors_write, "_chunks", crash_after_two_tensors)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(part, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before  # the old adapter, intact
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_any_module_all_linear_on_a_transformers_model(sep, tmp_path):
    """apply_lora works by name on any nn.Module: here transformers' own model, with "all-linear" (lm_head excluded)."""
    _, ckpt = sep("qwen2")
    hf = copy.deepcopy(ckpt.model)
    names = apply_lora(hf, "all-linear", r=4, lora_alpha=8)
    assert len(names) == 3 * 7 and not any("lm_head" in n for n in names)
    randomize_adapters(hf, seed=29)
    save_adapter(hf, tmp_path / "ad")
    assert read_adapter(tmp_path / "ad")[0].target_modules == sorted(ALL7)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ckpt.model), tmp_path / "ad")
    tokens = ids(seed=30)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, peft_model(tokens).logits, **FP32)


def test_a_save_killed_between_the_two_files_never_leaves_a_pair_that_loads(sep, tmp_path):
    """save_adapter writes two files; whichever one a kill leaves new, a mismatched pair must not load."""
    path, _ = sep("qwen2")
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, alpha, seed in ((old, 2, 1), (new, 8, 2)):  # same r and modules, another scaling
        part = load_part(path, "f")
        apply_lora(part, ["q_proj"], r=2, lora_alpha=alpha)
        randomize_adapters(part, seed=seed)
        save_adapter(part, folder)
    for config_from, weights_from in ((new, old), (old, new)):  # the two states a kill in between can leave
        mixed = tmp_path / f"config-{config_from.name}-weights-{weights_from.name}"
        mixed.mkdir()
        shutil.copy(config_from / "adapter_config.json", mixed)
        shutil.copy(weights_from / "adapter_model.safetensors", mixed)
        with pytest.raises(
            LoraError,
            match=r"adapter_model.safetensors was saved with another adapter_config.json .*"
            r"lora_alpha: weights \d, config \d.*save the adapter again",
        ):
            load_adapter(load_part(path, "f"), mixed)
    for folder in (old, new):  # each complete pair loads
        assert load_adapter(load_part(path, "f"), folder)
