"""Checkpoints saved by older transformers carry ``rotary_emb.inv_freq`` buffers: converted, ignored, equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llm_sepweight as sw
from llm_lazy_qwen import load_part

FP32 = {"atol": 1e-4, "rtol": 1e-4}


def _add_inv_freq(path, sharded: bool) -> list[str]:
    """Write the buffers old saves had: one per layer (< 4.35) and the model-level one."""
    names = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(3)] + ["model.rotary_emb.inv_freq"]
    buffer = torch.rand(12)
    if not sharded:
        sd = load_file(path / "model.safetensors")
        save_file({**sd, **{n: buffer.clone() for n in names}}, path / "model.safetensors", metadata={"format": "pt"})
        return names
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    sd = load_file(path / shard)
    save_file({**sd, **{n: buffer.clone() for n in names}}, path / shard, metadata={"format": "pt"})
    index["weight_map"].update({n: shard for n in names})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_inv_freq_buffers_are_ignored(tmp_path, sharded):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB" if sharded else "10GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    _add_inv_freq(tmp_path / "hf", sharded)
    sw.convert(tmp_path / "hf", tmp_path / "sep", progress=False)
    stored = [k for f in sw.Manifest.read(tmp_path / "sep").files.values() for k in f.tensors]
    assert not [k for k in stored if "inv_freq" in k]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_part(tmp_path / "sep")(ids), model(ids).logits, **FP32)
