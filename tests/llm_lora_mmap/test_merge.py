"""Merging into new folders: equals the unmerged forward and PEFT's merge_and_unload; fp32 delta; non-finite refused."""

import copy

import pytest
import torch
from lora_helpers import ALL7, ids, randomize_adapters
from peft import PeftModel
from transformers import AutoModelForCausalLM

import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lora_mmap import (
    LoraError,
    apply_lora,
    load_adapter,
    merge_adapter,
    merged_weight,
    read_adapter,
    save_adapter,
)


def _adapted(path, tmp_path, targets=ALL7, seed=30, spec="f"):
    part = load_part(path, spec)
    apply_lora(part, targets, r=4, lora_alpha=8)
    randomize_adapters(part, seed=seed)
    save_adapter(part, tmp_path / "ad")
    return part


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_merged_folders_equal_the_unmerged_forward_and_peft(sep, tmp_path, name):
    path, ckpt = sep(name)
    part = _adapted(path, tmp_path)
    merge_adapter(path, tmp_path / "ad", tmp_path / "merged", hf_out=tmp_path / "hf")
    assert sw.verify(tmp_path / "merged").ok
    tokens = ids(seed=31)
    merged = load_part(tmp_path / "merged", "f")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = part(tokens)
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf(tokens).logits, want, atol=1e-5, rtol=1e-4)
    # the weights equal PEFT's merge_and_unload of the same adapter
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(ckpt.model), tmp_path / "ad").merge_and_unload().state_dict()
    ours = sw.load(tmp_path / "merged").hf_state_dict()
    assert sorted(ours) == sorted(peft_merged)
    for k, v in ours.items():
        torch.testing.assert_close(v, peft_merged[k], atol=1e-6, rtol=1e-5, msg=k)
    for f in (tmp_path / "hf").iterdir():  # tokenizer and config came along
        assert not f.name.startswith(".")
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_bf16_merge_rounds_once_from_an_fp32_delta(sep, tmp_path):
    path, _ = sep("qwen2_bf16")
    _adapted(path, tmp_path, targets=["up_proj"])
    merge_adapter(path, tmp_path / "ad", tmp_path / "merged")
    cfg, weights = read_adapter(tmp_path / "ad")
    A, B = weights["model.layers.1.mlp.up_proj"]
    W = sw.SepWeights(path).layer(1)["mlp.up_proj.weight"]
    got = sw.SepWeights(tmp_path / "merged").layer(1)["mlp.up_proj.weight"]
    assert got.dtype == torch.bfloat16
    want = (W.double() + (B.double() @ A.double()) * cfg.scaling).to(torch.bfloat16)  # exact sum, rounded once
    assert (got != want).float().mean() < 0.001  # equal but for a rare double-rounding tie (none here)
    untouched = sw.SepWeights(tmp_path / "merged").layer(1)["mlp.down_proj.weight"]
    assert torch.equal(untouched, sw.SepWeights(path).layer(1)["mlp.down_proj.weight"])


def test_merged_weight_does_not_write_into_the_base():
    W = torch.randn(6, 5)
    before = W.clone()
    out = merged_weight(W, torch.ones(2, 5), torch.ones(6, 2), 0.5)
    torch.testing.assert_close(out, before + 1.0)
    assert torch.equal(W, before)


def test_non_finite_result_is_refused_and_nothing_complete_is_written(sep, tmp_path):
    path, _ = sep("qwen2")
    part = load_part(path, "f")
    apply_lora(part, ["v_proj"], r=2)
    with torch.no_grad():
        part.model.layers["1"].self_attn.v_proj.lora_A.weight.fill_(1e30)
        part.model.layers["1"].self_attn.v_proj.lora_B.weight.fill_(1e30)
    save_adapter(part, tmp_path / "ad")
    with pytest.raises(LoraError, match=r"mid.00001.safetensors:self_attn.v_proj.weight gives non-finite values"):
        merge_adapter(path, tmp_path / "ad", tmp_path / "merged")
    with pytest.raises(sw.SepweightError, match="no manifest.json"):
        sw.SepWeights(tmp_path / "merged")
    with torch.no_grad():  # a sane adapter merges into the same folder afterwards (the writer's lock was released)
        part.model.layers["1"].self_attn.v_proj.lora_A.weight.fill_(0.01)
    save_adapter(part, tmp_path / "ad")
    merge_adapter(path, tmp_path / "ad", tmp_path / "merged", overwrite=True)
    assert sw.verify(tmp_path / "merged").ok


def test_part_folder_merges_its_share(sep, tmp_path):
    path, ckpt = sep("qwen2")
    sw.convert(ckpt.path, tmp_path / "first", parts="b 0-2", progress=False)
    _adapted(path, tmp_path, targets=["gate_proj"])
    with pytest.raises(LoraError, match=r"stores no tensor 'model.layers.2.mlp.gate_proj.weight'.*strict=False"):
        merge_adapter(tmp_path / "first", tmp_path / "ad", tmp_path / "merged")
    merge_adapter(tmp_path / "first", tmp_path / "ad", tmp_path / "merged", strict=False)
    assert str(sw.SepWeights(tmp_path / "merged").spec) == "b 0-2"
    unmerged = load_part(tmp_path / "first", "b 0-2")
    load_adapter(unmerged, tmp_path / "ad", strict=False)
    tokens = ids(seed=32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_part(tmp_path / "merged", "b 0-2")(tokens), unmerged(tokens), atol=1e-5, rtol=1e-4
        )
    with pytest.raises(LoraError, match="hf_out needs the whole model"):
        merge_adapter(tmp_path / "first", tmp_path / "ad", tmp_path / "m2", hf_out=tmp_path / "hf", strict=False)


def test_output_folder_must_be_new(sep, tmp_path):
    path, _ = sep("qwen2")
    _adapted(path, tmp_path, targets=["q_proj"])
    with pytest.raises(LoraError, match="must go into a new folder"):
        merge_adapter(path, tmp_path / "ad", path, overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(LoraError, match="busy: folder is not empty"):
        merge_adapter(path, tmp_path / "ad", tmp_path / "busy")
