"""Adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32).

Keys are PEFT's saved keys (adapter name stripped)::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)

so ``peft.PeftModel.from_pretrained(hf_model, dir)`` loads what :func:`save_adapter` writes and
:func:`load_adapter` reads what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

import llm_sepweight as sw

from .apply import _adaptable, _matches, apply_lora, find_targets, lora_layers
from .config import LoraConfig
from .errors import LoraError
from .layer import LoraLinear, is_linear_like

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight")

AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
PAIR_KEY = "llm_lora_mmap.adapter_config"  # weights metadata: the config fields the weights were saved with
_PAIR_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules")


def _pair_fields(cfg: LoraConfig) -> dict[str, object]:
    """The config fields that change what the weights compute (r is also checked by the shapes)."""
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "target_modules": target}


def _read_weights(weights_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (in fresh memory: no mapping outlives the call) and metadata, validated by llm_sepweight."""
    try:
        return sw.load_safetensors(weights_file, use_mmap=False), sw.safetensors_metadata(weights_file)
    except sw.SepweightError as e:  # the message names the file and tensor; raise it as ours
        raise LoraError(str(e)) from None


def _check_pair(cfg: LoraConfig, weights_file: Path, cfg_file: Path, metadata: dict[str, str]) -> None:
    """Refuse weights saved with another config (a save killed between the two files, or a mixed copy)."""
    raw = metadata.get(PAIR_KEY)
    if raw is None:  # written by PEFT or an older llm_lora_mmap: nothing to compare
        return
    try:
        saved = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{weights_file}: metadata {PAIR_KEY!r} is not JSON; re-save the adapter") from None
    now = _pair_fields(cfg)
    diff = {k: (saved.get(k), now[k]) for k in _PAIR_FIELDS if saved.get(k) != now[k]}
    if diff:
        what = ", ".join(f"{k}: weights {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise LoraError(
            f"{weights_file} was saved with another {CONFIG_NAME} than {cfg_file} ({what}): the two files do not "
            "belong together (a save interrupted between them, or copied from two adapters); save the adapter again"
        )


def adapter_key(module: str, which: str) -> str:
    """``adapter_key("model.layers.0.mlp.up_proj", "lora_A")`` -> PEFT's saved key."""
    return f"{PREFIX}{module}.{which}.weight"


def _config_of(model: nn.Module, layers: dict[str, LoraLinear], base_model_name_or_path: str | None) -> LoraConfig:
    hyper = {(m.r, m.lora_alpha, m.use_rslora, m.lora_dropout_p) for m in layers.values()}
    if len(hyper) > 1:
        raise LoraError(
            f"the model's LoRA layers use different (r, lora_alpha, use_rslora, lora_dropout): {sorted(hyper)}; "
            "one adapter file holds one setting (PEFT's rank_pattern/alpha_pattern are not supported)"
        )
    r, alpha, rslora, dropout = hyper.pop()
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    selected = {n for n, m in model.named_modules() if _matches(n, leaves) and _adaptable(m)}
    # short names when they select exactly the wrapped modules (as PEFT writes), full names otherwise
    targets = leaves if selected == set(layers) else sorted(layers)
    return LoraConfig(targets, r, alpha, dropout, rslora, base_model_name_or_path=base_model_name_or_path)


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA weights as a PEFT adapter folder (each file atomically: temp + rename).

    The config is written first, the weights last; the weights' safetensors metadata records the
    config fields they were saved with, and :func:`read_adapter` refuses a pair that disagrees, so
    a save killed between the two files never leaves a mismatched pair that loads.

    Example::

        save_adapter(part, "my-adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B")
        # peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "my-adapter")
    """
    layers = lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to save; call apply_lora(model, ...) first")
    cfg = _config_of(model, layers, base_model_name_or_path)
    tensors = {}
    for name, m in layers.items():
        tensors[adapter_key(name, "lora_A")] = m.lora_A.weight.detach().to("cpu", torch.float32).contiguous()
        tensors[adapter_key(name, "lora_B")] = m.lora_B.weight.detach().to("cpu", torch.float32).contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sw.atomic_write_bytes(path / CONFIG_NAME, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    pair = json.dumps(_pair_fields(cfg), sort_keys=True)
    sw.save_safetensors(path / WEIGHTS_NAME, tensors, metadata={"format": "pt", PAIR_KEY: pair})
    return path


def read_adapter(path: str | Path) -> tuple[LoraConfig, AdapterWeights]:
    """Read and validate a PEFT LoRA adapter folder: its config and ``{module: (A, B)}``.

    Example::

        cfg, weights = read_adapter("my-adapter")
        A, B = weights["model.layers.0.self_attn.q_proj"]     # (r, 896), (896, r)
    """
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise LoraError(f"{path}: no {CONFIG_NAME}; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = LoraConfig.from_dict(raw, source=str(cfg_file))
    if not weights_file.is_file():
        legacy = " (adapter_model.bin is a pickle and is not read: re-save it with PEFT's safe_serialization=True)"
        raise LoraError(f"{path}: no {WEIGHTS_NAME}" + (legacy if (path / "adapter_model.bin").exists() else ""))
    tensors, metadata = _read_weights(weights_file)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise LoraError(
                f"{weights_file}: key {key!r} is not a LoRA weight of a linear layer "
                "('base_model.model.<module>.lora_A.weight' / '.lora_B.weight'); DoRA magnitudes, embedding "
                "adapters, LoRA biases and modules_to_save are not supported"
            )
        parts.setdefault(m["module"], {})[m["which"]] = t
    weights: AdapterWeights = {}
    for module, ab in sorted(parts.items()):
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                raise LoraError(f"{weights_file}: missing key {adapter_key(module, which)!r} (the other half is there)")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != cfg.r or B.shape[1] != cfg.r:
            raise LoraError(
                f"{weights_file}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but "
                f"{CONFIG_NAME} says r={cfg.r} (expected (r, in) and (out, r))"
            )
        weights[module] = (A, B)
    if not weights:
        raise LoraError(f"{weights_file}: holds no LoRA weights")
    _check_pair(cfg, weights_file, cfg_file, metadata)
    return cfg, weights


def load_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[str]:
    """Load a PEFT LoRA adapter into ``model``; returns the names of the modules it adapts.

    A model without LoRA layers gets them first, from the adapter's config (``apply_lora`` with its
    target_modules, r, lora_alpha, lora_dropout, use_rslora). A model that has them must match the
    adapter's rank and scaling. Every LoRA layer of the model must get weights; with ``strict``
    (default) the adapter must not hold weights for other modules either; ``strict=False`` loads
    the share of a part (``"b 0-12"``) from a whole-model adapter. Nothing changes on error.

    Example::

        part = load_part("qwen-sep", "f")
        load_adapter(part, "peft-adapter")        # written by PEFT's save_pretrained, or by us
    """
    cfg, weights = read_adapter(path)
    where = Path(path) / WEIGHTS_NAME
    layers = lora_layers(model)
    if layers:
        for name, m in layers.items():
            if (m.r, m.scaling) != (cfg.r, cfg.scaling):
                raise LoraError(
                    f"{name} has LoRA r={m.r}, scaling={m.scaling:g} but {Path(path) / CONFIG_NAME} says r={cfg.r}, "
                    f"scaling={cfg.scaling:g}; load the adapter into a model without LoRA layers (it applies them)"
                )
        shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    else:
        targets = find_targets(model, cfg.target_modules)
        shapes = {}
        for n in targets:
            target = model.get_submodule(n)
            if not is_linear_like(target):
                raise LoraError(
                    f"{Path(path) / CONFIG_NAME}: target {n} is a {type(target).__name__}, not a linear layer "
                    "(nn.Linear or a quantized QuantLinear)"
                )
            shapes[n] = (int(target.in_features), int(target.out_features))  # type: ignore[arg-type]
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise LoraError(
            f"{where}: no weights for {len(missing)} LoRA module(s) of the model, e.g. missing key "
            f"{adapter_key(missing[0], 'lora_A')!r}; the adapter was made for another model or other "
            f"target_modules (it has {len(weights)} modules, target_modules={cfg.target_modules!r})"
        )
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected and strict:
        raise LoraError(
            f"{where}: weights for {len(unexpected)} module(s) this model has no LoRA layer for, e.g. "
            f"{adapter_key(unexpected[0], 'lora_A')!r}; for a part of a model pass strict=False to load its share"
        )
    for n, (fan_in, fan_out) in shapes.items():
        A, B = weights[n]
        if A.shape[1] != fan_in or B.shape[0] != fan_out:
            raise LoraError(
                f"{where}: {n} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but the model's layer is "
                f"{fan_in} -> {fan_out} (expected ({cfg.r}, {fan_in}) and ({fan_out}, {cfg.r})); the adapter was made "
                f"for a different base model (base_model_name_or_path={cfg.base_model_name_or_path!r})"
            )
    if not layers:
        apply_lora(
            model, list(shapes), cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, dtype=dtype, device=device
        )
        layers = lora_layers(model)
    with torch.no_grad():
        for n, m in layers.items():
            A, B = weights[n]
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
    return list(layers)
