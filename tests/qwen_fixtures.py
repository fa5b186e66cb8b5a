"""Tiny Qwen checkpoints written by transformers' own save_pretrained.

Every variant a user can hand us is covered: single-file and sharded safetensors, tied and untied
head, fp32 and bf16, v4 config style (top-level ``rope_theta``) and v5 (``rope_parameters`` +
``layer_types``), Qwen2 and Qwen3. Biases and norm weights are randomised (default init hides bugs).
Checkpoints are built once per session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Variant:
    arch: str = "qwen2"  # "qwen2" or "qwen3"
    tied: bool = False
    sharded: bool = False
    dtype: torch.dtype = torch.float32
    style: str = "v5"  # "v4": top-level rope_theta, no layer_types; "v5": rope_parameters + layer_types
    sliding_window: int | None = None  # set: use_sliding_window on layers >= max_window_layers
    num_layers: int = 3
    legacy_bin: bool = False  # pytorch_model.bin instead of safetensors


VARIANTS: dict[str, Variant] = {
    "qwen2": Variant(),
    "qwen2_tied": Variant(tied=True),
    "qwen2_sharded": Variant(sharded=True),
    "qwen2_bf16": Variant(dtype=torch.bfloat16),
    "qwen2_v4": Variant(style="v4"),
    "qwen2_sharded_tied_bf16_v4": Variant(tied=True, sharded=True, dtype=torch.bfloat16, style="v4"),
    "qwen2_swa": Variant(sliding_window=4, num_layers=4),
    "qwen2_swa_v4": Variant(sliding_window=4, num_layers=4, style="v4"),
    "qwen3": Variant(arch="qwen3"),
    "qwen3_tied_sharded": Variant(arch="qwen3", tied=True, sharded=True),
    "qwen2_bin": Variant(legacy_bin=True),
}


@dataclass
class TinyCheckpoint:
    name: str
    path: Path
    variant: Variant
    model: Any  # the transformers model that wrote the files: the oracle

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


def _tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(DATA / "corpus.txt")], trainer)
    return tok


def _config(v: Variant) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=v.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=v.tied,
        rope_theta=10000.0 if v.arch == "qwen2" else 1000000.0,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    if v.sliding_window is not None:
        common.update(use_sliding_window=True, sliding_window=v.sliding_window, max_window_layers=v.num_layers // 2)
    if v.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    from transformers import Qwen3Config

    return Qwen3Config(head_dim=24, **common)  # explicit head_dim != hidden/heads, as in real Qwen3


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))


def _to_v4(path: Path, v: Variant) -> None:
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg.pop("layer_types", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def build_checkpoint(name: str, root: Path) -> TinyCheckpoint:
    v = VARIANTS[name]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(_config(v))
    _randomise(model, seed=len(name))
    model = model.to(v.dtype).eval()
    path = root / name
    shard = "40KB" if v.sharded else "10GB"
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=not v.legacy_bin)
    if v.legacy_bin and not (path / "pytorch_model.bin").exists():
        # transformers 5 always writes safetensors; write the legacy layout users still have
        sd = {k: t.clone().contiguous() for k, t in model.state_dict().items()}
        if v.tied:
            sd.pop("lm_head.weight", None)
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        torch.save(sd, path / "pytorch_model.bin")
    if v.style == "v4":
        _to_v4(path, v)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(300), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return TinyCheckpoint(name, path, v, model)
