"""QwenConfig: one dataclass whose fields are the HF config.json keys (Qwen2, Qwen2.5, Qwen3 dense, Llama).

Reads both config styles: v4 (top-level ``rope_theta``, ``use_sliding_window`` / ``max_window_layers``)
and v5 (``rope_parameters``, ``layer_types``). Derived fields follow transformers' ``__post_init__``:
``sliding_window`` is dropped unless ``use_sliding_window``; without ``layer_types`` layer i slides
when a window is set and ``i >= max_window_layers``.

Llama (``LlamaForCausalLM``) is the Qwen2 block without the q/k/v bias (``attention_bias`` false, as
``LlamaConfig`` defaults); ``mlp_bias`` and RoPE scaling (``llama3``, ``linear``, ...) are refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ARCHS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class ConfigError(ValueError):
    """config.json is missing a key or describes something we do not support."""


@dataclass
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_scaling: dict[str, Any] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_bias: bool | None = None  # Qwen3, Llama: all projections; Qwen2 (None): q/k/v yes, o no
    mlp_bias: bool = False  # Llama's key; only False is supported
    model_type: str = "qwen2"
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type == "llama" and self.attention_bias is None:
            self.attention_bias = False  # LlamaConfig's default
        if self.mlp_bias:
            raise ConfigError("mlp_bias=true is not supported (gate/up/down projections without bias only)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:  # as transformers: Qwen3Config defaults to 128, Qwen2/Llama derive it
            self.head_dim = 128 if self.model_type == "qwen3" else self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope = self.rope_parameters or {}
        if self.rope_theta is None:
            self.rope_theta = float(rope.get("rope_theta", 10000.0))
        scaling = self.rope_scaling or {}
        for key, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(
                    f"{key}: rope type {rope_type!r} is not supported (only 'default'); remove rope scaling "
                    "from config.json or use transformers for this model"
                )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (Qwen and Llama use 'silu')")
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention"
                if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = [t for t in self.layer_types if t not in ("full_attention", "sliding_attention")]
        if bad:
            raise ConfigError(f"layer_types entry {bad[0]!r} is not 'full_attention' or 'sliding_attention'")

    @property
    def is_qwen3(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm on each head's q and k before RoPE (Qwen3)."""
        return self.is_qwen3

    @property
    def qkv_bias(self) -> bool:
        return True if self.attention_bias is None and self.model_type == "qwen2" else bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return False if self.model_type == "qwen2" else bool(self.attention_bias)

    def window(self, layer: int) -> int | None:
        """The sliding window W of a layer (W keys including the query), None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None  # type: ignore[index]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> QwenConfig:
        """Fill from a config.json dict; unknown keys are ignored, missing required keys are an error."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type") or next((_ARCHS[a] for a in archs if a in _ARCHS), None)
        if model_type not in ("qwen2", "qwen3", "llama"):
            raise ConfigError(
                f"{source}: model_type {raw.get('model_type')!r} / architectures {archs} is not a dense "
                "Qwen2/Qwen2.5/Qwen3 or Llama model"
            )
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["model_type"] = model_type
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))
