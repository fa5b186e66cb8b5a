"""The Qwen2.5-0.5B-shaped random checkpoint shared by the benchmarks (HF layout, bf16, tied head)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SHAPE = dict(hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, vocab=151936)


def make_checkpoint(root: Path, shape: dict | None = None, name: str = "qwen2.5-0.5b-shaped") -> Path:
    """HF layout written with safetensors (what save_pretrained writes), random bf16 weights."""
    src = root / name
    SHAPE_ = shape or SHAPE
    if (src / "model.safetensors").exists():
        return src
    code = f"""
import json, torch
from safetensors.torch import save_file
s = {SHAPE_!r}
h, i, d = s["hidden"], s["inter"], s["hidden"] // s["heads"]
kv = s["kv_heads"] * d
g = torch.Generator().manual_seed(0)
r = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
sd = {{"model.embed_tokens.weight": r(s["vocab"], h), "model.norm.weight": r(h)}}
for l in range(s["layers"]):
    p = f"model.layers.{{l}}."
    sd.update({{p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.q_proj.bias": r(h),
        p + "self_attn.k_proj.weight": r(kv, h), p + "self_attn.k_proj.bias": r(kv),
        p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.v_proj.bias": r(kv),
        p + "self_attn.o_proj.weight": r(h, h), p + "mlp.gate_proj.weight": r(i, h),
        p + "mlp.up_proj.weight": r(i, h), p + "mlp.down_proj.weight": r(h, i),
        p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h)}})
import os; os.makedirs({str(src)!r}, exist_ok=True)
save_file(sd, {str(src / "model.safetensors")!r}, metadata={{"format": "pt"}})
cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=h, intermediate_size=i,
    num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
    vocab_size=s["vocab"], tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=32768, torch_dtype="bfloat16")
open({str(src / "config.json")!r}, "w").write(json.dumps(cfg, indent=2))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return src
