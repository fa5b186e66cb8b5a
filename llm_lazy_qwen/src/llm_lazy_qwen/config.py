"""QwenConfig: one dataclass whose fields are the HF config.json keys, for every family we serve.

Families (``architectures`` / ``model_type``): Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``), Qwen3 dense
(``Qwen3ForCausalLM``), Llama (``LlamaForCausalLM``: Llama 2/3.x, SmolLM2, TinyLlama, ...) and Mistral
(``MistralForCausalLM``). :meth:`QwenConfig.from_dict` turns each family's config.json into the same
flags the blocks read (``qkv_bias``, ``o_bias``, ``mlp_bias``, ``qk_norm``, per-layer windows,
``head_dim``), as transformers' config classes do:

- Qwen2: bias on q/k/v only; Qwen3: ``attention_bias`` on all four projections plus q/k RMSNorm;
  Llama: ``attention_bias`` (all four) and ``mlp_bias``; Mistral: no bias.
- Windows: Qwen2/3 slide when ``use_sliding_window`` (layer i when ``i >= max_window_layers``, or as
  ``layer_types`` says); Mistral slides on every layer whenever ``sliding_window`` is set (no
  ``use_sliding_window`` key; absent means 4096, as ``MistralConfig``); Llama never.
- RoPE (both config styles, v4 ``rope_theta`` + ``rope_scaling`` and v5 ``rope_parameters``):
  normalised like transformers' ``convert_rope_params_to_dict``: ``rope_scaling`` wins over
  ``rope_parameters``; ``rope_parameters.rope_theta`` wins over the top-level ``rope_theta``; the
  types of :data:`rope.ROPE_INIT` (default, linear, dynamic, yarn, llama3) are computed in rope.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rope import ROPE_INIT, ROPE_REQUIRED

if TYPE_CHECKING:
    from llm_sepweight import SepWeights

_ARCHS = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
FAMILIES = tuple(_ARCHS)
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# what each family's transformers config class defaults a key to when config.json lacks it
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768},
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
_DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


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
    rope_parameters: dict[str, Any] | None = None  # after __post_init__: normalised (rope_type, rope_theta, ...)
    rope_scaling: dict[str, Any] | None = None  # v4 style; folded into rope_parameters
    original_max_position_embeddings: int | None = None  # top level (Phi3 style): wins over rope_parameters'
    partial_rotary_factor: float | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_bias: bool | None = None  # Qwen3, Llama: all projections; Qwen2: q/k/v always, o never
    mlp_bias: bool = False  # Llama only: gate/up/down with bias
    model_type: str = "qwen2"
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in _DEFAULTS:
            raise ConfigError(f"model_type {self.model_type!r} is not one of {sorted(_DEFAULTS)}")
        if self.model_type in ("qwen2", "mistral"):  # their modeling code has no such switches
            self.attention_bias = self.model_type == "qwen2"
        if self.model_type != "llama":
            self.mlp_bias = False
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:  # as transformers: Qwen3Config defaults to 128, the others derive it
            self.head_dim = 128 if self.model_type == "qwen3" else self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (these families use 'silu')")
        self._normalise_rope()
        self._normalise_windows()

    def _normalise_rope(self) -> None:
        """One ``rope_parameters`` dict, exactly as transformers reads it, checked against rope.py's table."""
        key = "rope_scaling" if self.rope_scaling else "rope_parameters"
        raw = self.rope_scaling or self.rope_parameters or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{key} must be an object, got {raw!r}")
        if any(k in ("full_attention", "sliding_attention") for k in raw):
            raise ConfigError(f"{key}: RoPE parameters per layer type are not supported (one set for all layers)")
        params = dict(raw)
        params.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else _DEFAULT_THETA)
        if self.partial_rotary_factor is not None:
            params.setdefault("partial_rotary_factor", self.partial_rotary_factor)
        rope_type = params.get("rope_type", params.get("type", "default"))
        params["rope_type"] = rope_type
        if rope_type not in ROPE_INIT:
            raise ConfigError(
                f"{key}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_INIT)}); "
                "use transformers for this model"
            )
        if rope_type in ("llama3", "yarn"):
            if self.original_max_position_embeddings is not None:
                params["original_max_position_embeddings"] = self.original_max_position_embeddings
            else:
                params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        missing = [k for k in ROPE_REQUIRED[rope_type] if k not in params]
        if missing:
            raise ConfigError(f"{key}: rope type {rope_type!r} needs {missing}")
        for k in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = params.get(k)
            if k not in params or (k == "factor" and v is None and rope_type == "yarn"):  # None: the length ratio
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}.{k} must be a number, got {v!r}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            where = f"{key}.partial_rotary_factor" if "partial_rotary_factor" in raw else "partial_rotary_factor"
            raise ConfigError(
                f"{where}={params['partial_rotary_factor']} is not supported (these families rotate the whole head)"
            )
        self.rope_parameters = params
        self.rope_theta = float(params["rope_theta"])

    def _normalise_windows(self) -> None:
        if self.model_type == "llama":
            self.sliding_window, self.layer_types = None, None
        if self.model_type == "mistral":  # every layer slides when a window is set; layer_types is ignored
            self.use_sliding_window, self.max_window_layers, self.layer_types = self.sliding_window is not None, 0, None
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
        return bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return False if self.model_type == "qwen2" else bool(self.attention_bias)

    @property
    def rope_type(self) -> str:
        return str((self.rope_parameters or {})["rope_type"])

    @property
    def max_positions(self) -> int | None:
        """The longest sequence served: ``max_position_embeddings``; YaRN's ``factor`` x the original length
        when longer; None (no limit) for dynamic NTK scaling, which stretches RoPE to any length."""
        p = self.rope_parameters or {}
        if self.rope_type == "dynamic":
            return None
        if self.rope_type == "yarn" and p.get("factor"):
            return max(self.max_position_embeddings, int(p["factor"] * p["original_max_position_embeddings"]))
        return self.max_position_embeddings

    def window(self, layer: int) -> int | None:
        """The sliding window W of a layer (W keys including the query), None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None  # type: ignore[index]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> QwenConfig:
        """Fill from a config.json dict; unknown keys are ignored, missing required keys are an error.

        Example::

            cfg = QwenConfig.from_dict(json.loads(Path("model/config.json").read_text()), "model/config.json")
        """
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type") or next((_ARCHS[a] for a in archs if a in _ARCHS), None)
        if model_type not in _DEFAULTS:
            raise ConfigError(
                f"{source}: model_type {raw.get('model_type')!r} / architectures {archs} is not a supported "
                f"family ({', '.join(FAMILIES)})"
            )
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if k in names}}
        kwargs["model_type"] = model_type
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    @classmethod
    def from_folder(cls, source: SepWeights) -> QwenConfig:
        """The config of a sepweight folder: the copy in ``manifest.json``, written with the weights.

        That copy is the one source of truth; the folder's ``config.json`` (kept for transformers)
        must say the same, else this raises instead of serving weights under a config they were not
        converted with.

        Example::

            cfg = QwenConfig.from_folder(llm_sepweight.SepWeights("qwen-sep"))
        """
        manifest, copy = source.root / "manifest.json", source.root / "config.json"
        if copy.is_file():
            try:
                same = json.loads(copy.read_text()) == source.config
            except json.JSONDecodeError:
                same = False
            if not same:
                raise ConfigError(
                    f"{copy} differs from the config recorded in {manifest} at conversion, which is what "
                    "loaders read; edit the checkpoint's config.json and convert again, or restore this file"
                )
        return cls.from_dict(source.config, source=f"{manifest} (config)")
