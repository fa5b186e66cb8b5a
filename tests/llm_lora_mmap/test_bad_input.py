"""Bad input fails up front with a LoraError (a ValueError) naming the module/key/file and what to do."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm_lazy_qwen import load_part
from llm_lora_mmap import (
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_layers,
    mark_only_lora_trainable,
    merge_adapter,
    read_adapter,
    save_adapter,
)

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@pytest.fixture
def adapter(sep, tmp_path):
    """A saved q/v adapter (r=4) of the tiny qwen2 model: (sepweight folder, adapter folder)."""
    path, _ = sep("qwen2")
    part = load_part(path, "f")
    apply_lora(part, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    save_adapter(part, tmp_path / "ad")
    return path, tmp_path / "ad"


def _edit_weights(folder, change):
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_target_module_that_does_not_exist(sep):
    part = load_part(sep("qwen2")[0], "f")
    with pytest.raises(
        LoraError,
        match=r"target module 'qq_proj' does not exist in the model; its linear layers are "
        r"named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj'",
    ):
        apply_lora(part, ["q_proj", "qq_proj"])
    with pytest.raises(LoraError, match=r"regex 'model.layers.9.\*' matches no module name"):
        apply_lora(part, "model.layers.9.*")
    with pytest.raises(LoraError, match=r"target model.layers.0.mlp is a MLP; LoRA is supported on nn.Linear only"):
        apply_lora(part, ["mlp"])
    assert not lora_layers(part)  # nothing was wrapped by the failed calls


def test_applying_twice(sep):
    part = load_part(sep("qwen2")[0], "f")
    apply_lora(part, ["q_proj"])
    with pytest.raises(LoraError, match="model.layers.0.self_attn.q_proj already has a LoRA adapter"):
        apply_lora(part, ["q_proj", "k_proj"])
    assert len(lora_layers(part)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r \(the LoRA rank\) must be an integer >= 1, got 0"),
        ({"r": 2.0}, r"r \(the LoRA rank\) must be an integer >= 1, got 2.0"),
        ({"lora_alpha": -1}, r"lora_alpha must be a number > 0 \(scaling = lora_alpha / r\), got -1"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a probability in \[0, 1\), got 1.0"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights must be True .* got 'pissa'"),
        ({"target_modules": []}, r"target_modules must be a non-empty list of module names"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(LoraError, match=message):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), **{"target_modules": ["0"], **kwargs})


def test_lora_linear_wraps_only_linear():
    with pytest.raises(TypeError, match="LoraLinear wraps an nn.Linear, got Embedding"):
        LoraLinear(nn.Embedding(4, 4))  # type: ignore[arg-type]


def test_nothing_to_save_or_train():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LoraError, match=r"no LoRA layers to save; call apply_lora"):
        save_adapter(model, "unused")
    with pytest.raises(LoraError, match=r"no LoRA parameters; call apply_lora"):
        mark_only_lora_trainable(model)


def test_mixed_ranks_cannot_be_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    apply_lora(model, ["0"], r=2)
    apply_lora(model, ["1"], r=4)
    with pytest.raises(LoraError, match="one adapter file holds one setting"):
        save_adapter(model, tmp_path / "ad")


def test_adapter_of_a_different_rank(adapter):
    path, ad = adapter
    part = load_part(path, "f")
    apply_lora(part, ["q_proj", "v_proj"], r=8, lora_alpha=8)
    with pytest.raises(
        LoraError, match=r"model.layers.0.self_attn.q_proj has LoRA r=8, scaling=1 but .* says r=4, scaling=2"
    ):
        load_adapter(part, ad)
    _edit_config(ad, r=8)  # the config and the tensors disagree
    with pytest.raises(
        LoraError,
        match=r"model.layers.0.self_attn.q_proj has lora_A \[4, 64\] and lora_B \[64, 4\], but "
        r"adapter_config.json says r=8",
    ):
        read_adapter(ad)


def test_adapter_of_a_different_model(sep, adapter, tmp_path):
    """qwen3 here has head_dim 24: its q_proj is 64 -> 96, qwen2's is 64 -> 64."""
    path3, _ = sep("qwen3")
    other = load_part(path3, "f")
    apply_lora(other, ["q_proj"], r=4)
    save_adapter(other, tmp_path / "q3", base_model_name_or_path="tiny-qwen3")
    path, _ = adapter
    part = load_part(path, "f")
    with pytest.raises(
        LoraError,
        match=r"model.layers.0.self_attn.q_proj has lora_A \[4, 64\] and lora_B \[96, 4\], but the "
        r"model's layer is 64 -> 64 .*different base model \(base_model_name_or_path='tiny-qwen3'\)",
    ):
        load_adapter(part, tmp_path / "q3")
    assert not lora_layers(part)
    with pytest.raises(LoraError, match=r"do not fit model.layers.0.self_attn.q_proj.weight of shape \[64, 64\]"):
        merge_adapter(path, tmp_path / "q3", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_keys(adapter):
    path, ad = adapter
    _edit_weights(ad, lambda t: t.pop(KEY.format("B")))
    with pytest.raises(
        LoraError,
        match=r"missing key 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' "
        r"\(the other half is there\)",
    ):
        load_adapter(load_part(path, "f"), ad)
    _edit_weights(ad, lambda t: t.pop(KEY.format("A")))  # now the whole module is gone
    part = load_part(path, "f")
    with pytest.raises(
        LoraError,
        match=r"no weights for 1 LoRA module\(s\) of the model, e.g. missing key "
        r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
    ):
        load_adapter(part, ad)
    assert not lora_layers(part)


def test_unsupported_adapters(adapter):
    _path, ad = adapter
    _edit_config(ad, use_dora=True)
    with pytest.raises(LoraError, match=r"use_dora=True is not supported by llm_lora_mmap"):
        read_adapter(ad)
    _edit_config(ad, use_dora=False, peft_type="IA3")
    with pytest.raises(LoraError, match=r"peft_type is 'IA3'"):
        read_adapter(ad)
    _edit_config(ad, peft_type="LORA")
    _edit_weights(
        ad,
        lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}),
    )
    with pytest.raises(LoraError, match=r"key '.*q_proj.lora_magnitude_vector' is not a LoRA weight of a linear layer"):
        read_adapter(ad)


def test_weights_with_overlapping_byte_ranges_are_refused(adapter):
    """A hand-edited header whose two tensors share bytes: safetensors refuses it, and so do we (by name)."""
    _, ad = adapter
    raw = (ad / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    a, b = KEY.format("A"), KEY.format("B")
    header[b]["data_offsets"] = header[a]["data_offsets"]  # B now reads A's bytes
    new = json.dumps(header).encode()
    (ad / "adapter_model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    with pytest.raises(
        LoraError,
        match=r"adapter_model.safetensors: not a valid safetensors file \(tensor '.*q_proj.lora_[AB].weight': "
        r"bytes \[\d+, \d+\) overlap tensor '.*q_proj.lora_[AB].weight'",
    ):
        read_adapter(ad)


def test_unreadable_files(adapter, tmp_path):
    _, ad = adapter
    with pytest.raises(LoraError, match=r"nope: no adapter_config.json"):
        read_adapter(tmp_path / "nope")
    data = (ad / "adapter_model.safetensors").read_bytes()
    (ad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(
        LoraError, match=r"adapter_model.safetensors: not a valid safetensors file \(data section truncated: tensor '"
    ):
        read_adapter(ad)
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    with pytest.raises(
        LoraError, match=r"no adapter_model.safetensors \(adapter_model.bin is a pickle and is not read"
    ):
        read_adapter(ad)
    (ad / "adapter_config.json").write_text("{")
    with pytest.raises(LoraError, match=r"adapter_config.json: not valid JSON"):
        read_adapter(ad)


def test_lora_on_a_tied_head_cannot_be_merged(sep, tmp_path):
    path, _ = sep("qwen2_tied")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(LoraConfig(["lm_head"], r=2).to_dict()))
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(384, 2),
        },
        tmp_path / "ad" / "adapter_model.safetensors",
    )
    with pytest.raises(LoraError, match=r"stores no tensor 'lm_head.weight' \(the head is tied to the embedding"):
        merge_adapter(path, tmp_path / "ad", tmp_path / "merged")


# Every field of PEFT's LoraConfig, decided: a non-default value of a field that changes the math and that
# llm_lora_mmap does not implement is refused with the field named; metadata and inert fields are accepted.
_REFUSED = {
    "use_dora": True,
    "fan_in_fan_out": True,
    "lora_bias": True,
    "modules_to_save": ["lm_head"],
    "rank_pattern": {"q_proj": 2},
    "alpha_pattern": {"q_proj": 2},
    "layers_to_transform": [0],
    "exclude_modules": ["k_proj"],
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "trainable_token_indices": [1, 2],
    "alora_invocation_tokens": [5, 6, 7],
    "arrow_config": {"top_k": 2},
    "use_qalora": True,
    "use_bdlora": {"lora_a_is_blockdiagonal": True},
    "kasa_config": {"k": 2},
    "monteclora_config": {"n_samples": 4},
    "layer_replication": [[0, 1], [0, 1]],
    "megatron_config": {"tensor_model_parallel_size": 2},
    "velora_config": {"rank": 1},
    "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0},
    "corda_config": {"corda_method": "kpm"},
    "lora_ga_config": {"direction": "ArB2r"},
    "bias": "all",
    "init_lora_weights": "pissa",
    "peft_type": "IA3",
}
_INERT = {
    "task_type": "CAUSAL_LM",
    "auto_mapping": {"base_model_class": "Qwen2ForCausalLM"},
    "peft_version": "0.21.2",
    "base_model_name_or_path": "Qwen/Qwen2.5-0.5B",
    "revision": "main",
    "inference_mode": False,
    "layers_pattern": "layers",
    "megatron_core": "megatron.core",
    "qalora_group_size": 32,
    "runtime_config": {"ephemeral_gpu_offload": True},
    "ensure_weight_tying": True,
}
_IMPLEMENTED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"}


def test_every_peft_lora_field_is_decided():
    import dataclasses

    import peft

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    undecided = fields - set(_REFUSED) - set(_INERT) - _IMPLEMENTED
    assert not undecided, f"new PEFT LoraConfig fields: decide whether llm_lora_mmap refuses them: {undecided}"


@pytest.mark.parametrize(("key", "value"), sorted(_REFUSED.items()))
def test_fields_that_change_the_math_are_refused(adapter, key, value):
    _path, ad = adapter
    _edit_config(ad, **{key: value})
    with pytest.raises(LoraError, match=rf"adapter_config.json: .*{key}"):
        read_adapter(ad)


def test_peft_defaults_and_inert_fields_load(adapter):
    import peft

    path, ad = adapter
    defaults = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8).to_dict()
    defaults["target_modules"] = sorted(defaults["target_modules"])
    _edit_config(ad, **{**defaults, **_INERT})
    names = load_adapter(load_part(path, "f"), ad)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("lazy", [False, True])
def test_lora_on_the_chunked_head_is_refused_up_front(sep, tmp_path, lazy):
    """A part computes logits from lm_head's weight chunk by chunk: LoRA there was accepted, then every forward failed."""
    path, _ = sep("qwen2")
    part = load_part(path, "f", lazy=lazy)
    ids = torch.tensor([[1, 2, 3]])
    want = part(ids)
    for targets in (["lm_head"], ["q_proj", "lm_head"], r".*(lm_head|v_proj)"):
        with pytest.raises(LoraError, match=r"target lm_head: LoRA on the head is not supported on a QwenPart"):
            apply_lora(part, targets, r=2)
        assert not lora_layers(part)  # nothing half-applied
    (tmp_path / "ad").mkdir()  # a PEFT adapter with LoRA on the head
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(LoraConfig(["lm_head"], r=2).to_dict()))
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(384, 2),
        },
        tmp_path / "ad" / "adapter_model.safetensors",
    )
    with pytest.raises(LoraError, match=r"target lm_head: LoRA on the head is not supported"):
        load_adapter(part, tmp_path / "ad")
    assert not lora_layers(part)
    torch.testing.assert_close(part(ids), want, atol=0, rtol=0)  # the part still works
