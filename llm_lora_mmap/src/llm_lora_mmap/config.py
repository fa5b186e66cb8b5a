"""LoraConfig: LoRA hyperparameters under PEFT's ``adapter_config.json`` key names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraError

InitLoraWeights = bool | str  # True: kaiming-uniform A, zero B (PEFT's default); "gaussian"; False: random B too

# PEFT (0.21) LoraConfig fields that change what an adapter computes and that llm_lora_mmap does not
# implement: a file using them is refused, never half-applied. key -> the values that mean "not used".
# Every other PEFT field is metadata or inert here: task_type, peft_type, auto_mapping, peft_version,
# base_model_name_or_path, revision, inference_mode, runtime_config (runtime only), layers_pattern
# and megatron_core (read only with layers_to_transform / megatron_config, both refused),
# qalora_group_size (only with use_qalora), ensure_weight_tying (only for modules_to_save /
# trainable tokens, refused); r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, bias and
# target_modules are implemented (and checked in LoraConfig).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),  # DoRA: a magnitude vector rescales W + BA
    "fan_in_fan_out": (False, None),  # GPT-2 Conv1D weights stored transposed
    "lora_bias": (False, None),  # a trainable bias on lora_B
    "modules_to_save": (None, []),  # full copies of other modules
    "rank_pattern": (None, {}),  # per-module r
    "alpha_pattern": (None, {}),  # per-module alpha
    "layers_to_transform": (None, []),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),  # LoRA on nn.Parameters (MoE experts)
    "trainable_token_indices": (None, [], {}),  # trainable embedding rows
    "alora_invocation_tokens": (None, []),  # Activated LoRA: only tokens after the invocation sequence
    "arrow_config": (None, {}),  # Arrow routing between several adapters
    "use_qalora": (False, None),  # QALoRA: inputs pooled in groups
    "use_bdlora": (None, False, {}),  # block-diagonal LoRA
    "kasa_config": (None, {}),  # KaSA: singular values of the base weight
    "monteclora_config": (None, {}),  # MonteCLoRA: sampled adapter weights
    "layer_replication": (None, []),  # layers repeated: another model structure
    "megatron_config": (None, {}),  # Megatron tensor-parallel layers
    "velora_config": (None, {}),  # VeLoRA: compressed activations, approximate gradients
    # initialisations PEFT honours only with their init_lora_weights (refused by check_hyperparameters)
    "loftq_config": (None, {}),  # LoftQ: quantized base weights changed at init
    "eva_config": (None, {}),  # EVA: data-driven A and rank redistribution
    "corda_config": (None, {}),  # CorDA: base weights replaced by a residual
    "lora_ga_config": (None, {}),  # LoRA-GA: base weights offset at init
}


def check_hyperparameters(r: object, lora_alpha: object, lora_dropout: object, init_lora_weights: object) -> None:
    """Raise LoraError unless r >= 1 (int), lora_alpha > 0, 0 <= lora_dropout < 1 and init is supported."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoraError(f"r (the LoRA rank) must be an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise LoraError(f"lora_alpha must be a number > 0 (scaling = lora_alpha / r), got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise LoraError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")
    if init_lora_weights not in (True, False, "gaussian"):
        raise LoraError(
            f"init_lora_weights must be True (kaiming-uniform A, zero B), 'gaussian' or False, got {init_lora_weights!r}; "
            "PiSSA/OLoRA/LoftQ-style inits change the base weights and are not supported"
        )


def scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (as PEFT)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class LoraConfig:
    """One adapter's hyperparameters; field names are PEFT's ``adapter_config.json`` keys.

    ``target_modules``: module names matched as PEFT does (a list of names, each equal to a module's
    full name or its last components, e.g. ``"q_proj"``; a string is a regex over full names;
    ``"all-linear"`` is every nn.Linear except ``lm_head``).

    Example::

        cfg = LoraConfig(["q_proj", "v_proj"], r=16, lora_alpha=32)
        cfg.scaling        # 2.0
    """

    target_modules: list[str] | str
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: InitLoraWeights = True
    base_model_name_or_path: str | None = None
    bias: str = "none"
    task_type: str | None = "CAUSAL_LM"
    peft_type: str = "LORA"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other keys of the file, kept as read

    def __post_init__(self) -> None:
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        t = self.target_modules
        if isinstance(t, (tuple, set, frozenset)):
            self.target_modules = t = sorted(t)
        if isinstance(t, str):
            if not t:
                raise LoraError("target_modules is an empty string; give module names such as ['q_proj', 'v_proj']")
        elif not isinstance(t, list) or not t or not all(isinstance(n, str) and n for n in t):
            raise LoraError(
                f"target_modules must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']), "
                f"a regex string or 'all-linear'; got {t!r}"
            )
        if self.peft_type != "LORA":
            raise LoraError(f"peft_type is {self.peft_type!r}; llm_lora_mmap reads and writes only 'LORA' adapters")
        if self.bias != "none":
            raise LoraError(f"bias={self.bias!r} is not supported: biases stay frozen (PEFT's bias='none')")
        if not isinstance(self.use_rslora, bool):
            raise LoraError(f"use_rslora must be true or false, got {self.use_rslora!r}")

    @property
    def scaling(self) -> float:
        return scaling(self.r, self.lora_alpha, self.use_rslora)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's JSON; unknown keys are kept in ``extra``, features that change the math are refused."""
        if not isinstance(raw, dict):
            raise LoraError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key, neutral in _UNSUPPORTED.items():
            if key in raw and raw[key] not in neutral:
                raise LoraError(
                    f"{source}: {key}={raw[key]!r} is not supported by llm_lora_mmap (plain LoRA on linear layers "
                    f"only; {key} changes what the adapter computes); load this adapter with PEFT instead"
                )
        if "target_modules" not in raw or raw["target_modules"] is None:
            raise LoraError(f"{source}: no 'target_modules'; a LoRA adapter config names the modules it adapts")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in raw.items() if k in names}
        try:
            return cls(**known, extra={k: v for k, v in raw.items() if k not in names})
        except LoraError as e:
            raise LoraError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json: our fields plus the neutral values of the features we do not use."""
        neutral: dict[str, Any] = {
            "fan_in_fan_out": False,
            "inference_mode": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
            "use_dora": False,
        }
        target = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        ours = {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "target_modules": target,
            "bias": self.bias,
            "init_lora_weights": self.init_lora_weights,
        }
        return {**neutral, **self.extra, **ours}
