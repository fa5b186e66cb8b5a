"""Tiny checkpoints of every family and RoPE type we serve, written by transformers and read back by it.

The oracle of each is ``AutoModelForCausalLM.from_pretrained`` of the written folder, so a config.json
in the v4 style (top-level ``rope_theta``, ``rope_scaling`` with ``type``) is read exactly as
transformers reads it. Biases and norm weights are randomised; ``head_dim`` (24) != hidden / heads (16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from qwen_fixtures import _randomise


@dataclass(frozen=True)
class Family:
    arch: str  # "llama", "mistral", "qwen2" or "qwen3"
    rope: dict[str, Any] = field(default_factory=dict)  # rope_parameters without rope_theta ({} = default)
    theta: float = 50000.0
    style: str = "v5"  # "v4": top-level rope_theta, rope_scaling {"type": ...}
    max_pos: int = 256
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_YARN_OPTS = {"beta_fast": 16, "beta_slow": 2, "mscale": 1.3, "mscale_all_dim": 0.7, "truncate": False}
FAMILIES: dict[str, Family] = {
    "llama_bias": Family("llama", extra={"attention_bias": True, "mlp_bias": True}),
    "llama3": Family("llama", {**_LLAMA3, "original_max_position_embeddings": 64}),
    "linear": Family("llama", {"rope_type": "linear", "factor": 2.5}),
    "dynamic": Family("llama", {"rope_type": "dynamic", "factor": 2.0}, max_pos=32),
    "yarn": Family("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn_opts": Family(
        "llama", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48, **_YARN_OPTS}
    ),
    "yarn_v4": Family(
        "llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, style="v4"
    ),
    "llama3_v4": Family("llama", {**_LLAMA3, "original_max_position_embeddings": 64}, style="v4"),
    "mistral": Family("mistral", theta=1e6, extra={"sliding_window": 4}),
    "qwen2_yarn_v4": Family(
        "qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 1e6, "v4"
    ),
    "qwen3_dynamic": Family("qwen3", {"rope_type": "dynamic", "factor": 3.0}, 1e6, max_pos=40),
}


@dataclass
class FamilyCheckpoint:
    name: str
    hf: Path  # the HF folder transformers wrote
    sep: Path  # its sepweight conversion
    family: Family

    def oracle(self) -> Any:
        """A fresh transformers model read from the folder (dynamic RoPE keeps state across calls)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.float32).eval()


def _config(f: Family) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[f.arch]
    common: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=f.max_pos,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", **f.rope, "rope_theta": f.theta},
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    if f.arch != "qwen2":
        common["head_dim"] = 24
    return cls(**common, **f.extra)


def _to_v4(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope if rope["type"] != "default" else None
    cfg.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def build_family(name: str, root: Path) -> FamilyCheckpoint:
    """Write family `name` with save_pretrained into root/name/hf and convert it into root/name/sep."""
    from transformers import AutoModelForCausalLM

    import llm_sepweight as sw

    f = FAMILIES[name]
    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(_config(f))
    _randomise(model, seed=len(name))
    model.eval().save_pretrained(root / name / "hf")
    if f.style == "v4":
        _to_v4(root / name / "hf")
    sw.convert(root / name / "hf", root / name / "sep", progress=False)
    return FamilyCheckpoint(name, root / name / "hf", root / name / "sep", f)


def greedy(model: Any, ids: torch.Tensor, steps: int, chunk: int | None = None) -> torch.Tensor:
    """Our KV-cached greedy decoding: prefill (optionally in chunks), then one token at a time."""
    cache = model.new_cache()
    chunk = chunk or ids.shape[1]
    for s in range(0, ids.shape[1], chunk):
        logits = model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, dim=1)


def hf_greedy(model: Any, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """transformers' generate, greedy, exactly `steps` new tokens."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    return out[:, ids.shape[1] :]
