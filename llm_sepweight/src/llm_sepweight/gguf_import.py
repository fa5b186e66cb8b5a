"""convert_gguf(): a GGUF model (llama.cpp / ollama) -> a sepweight folder, part by part.

Per tensor, what our formats hold without loss is kept (:mod:`llm_sepweight.gguf_quant`):
``Q4_0`` / ``Q4_1`` / ``Q4_K`` linears become int4 with group 32 holding GGUF's integers and scales.
Everything else (F32/F16/BF16, Q5, Q8_0, other K-quants) is dequantized with ``gguf.quants.dequantize`` to
the compute dtype, or, for linears, re-quantized per ``quant``. ``Q8_0`` has a scale per 32 values
where our int8 has one per output channel, so it cannot be kept: the error a re-quantization of a
GGUF quantization adds (max |dw|, RMS(dw) / RMS(w)) is logged and kept in the manifest's
``source.requantized``. llama's Q/K rows, permuted by llama.cpp for its rope, are put back as
transformers does. RoPE scaling goes into config.json (Llama 3's ``rope_freqs`` tensor too:
:mod:`llm_sepweight.gguf_rope`). Everything that can be checked is checked before the output folder is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import SepweightError
from .folder_lock import claim_folder
from .gguf_config import gguf_config
from .gguf_quant import GGUF_GROUP_SIZE, LOSSLESS_INT4, dequantized, int4_from_q4, requant_error
from .gguf_reader import GGUFModel, GGUFTensor, classify, open_gguf, unpermute_rows
from .gguf_rope import ROPE_FREQS
from .gguf_tokenizer import gguf_tokenizer
from .manifest import FileEntry, Manifest, Part, part_filename
from .quant import GROUP_SIZES, METHODS, QuantSpec, is_linear, quantize_linear
from .safetensors_io import TensorSpec, open_tensors
from .spec import PartSpec
from .writer import SepweightWriter

log = logging.getLogger(__name__)

QUANTS = (None, "none", "int8", "int4")
SCALE_DTYPE = torch.float32  # GGUF's fp16 block scales are exact in fp32, not in bf16 (QUANT_FORMAT.md)
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class Policy:
    """What happens to each tensor: ``action(part, key, tensor)``."""

    quant: str | None  # None: keep Q4 as int4, dequantize the rest; "none": dequantize all; "int8": all int8;
    # "int4": Q4 kept, the rest quantized to int4
    group_size: int = 64
    method: str = "clip"
    quantize_head: bool = True

    def action(self, part: Part, rel: str, t: GGUFTensor) -> str:
        """``"plain"`` (dequantized), ``"q4"`` (GGUF's int4 kept) or ``"int8"`` / ``"int4"`` (quantized)."""
        if self.quant == "none" or not is_linear(part, rel, self.quantize_head):
            return "plain"
        if t.type_name in LOSSLESS_INT4 and self.quant in (None, "int4"):
            return "q4"  # kept exactly; "int8" asks for int8, so Q4 is re-quantized (its added error logged)
        return self.quant or "plain"

    def manifest_entry(self, plan: dict[Part, dict[str, GGUFTensor]]) -> dict[str, Any] | None:
        """The manifest's top-level ``quant`` for what `plan` will store (None when nothing is quantized)."""
        schemes, groups, methods = set(), set(), set()
        for part, tensors in plan.items():
            for rel, t in tensors.items():
                act = self.action(part, rel, t)
                if act == "plain":
                    continue
                schemes.add("int4" if act == "q4" else act)
                groups.add(GGUF_GROUP_SIZE if act == "q4" else self.group_size if act == "int4" else None)
                methods.add(f"gguf:{t.type_name}" if act == "q4" else self.method if act == "int4" else "rtn")
        if not schemes:
            return None
        group_sizes = sorted(g for g in groups if g)
        return {
            "scheme": "+".join(sorted(schemes)),
            "group_size": group_sizes[0] if len(group_sizes) == 1 else None,  # per tensor when mixed
            "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."),
            "method": "+".join(sorted(methods)),
            "quantize_head": self.quantize_head,
        }


@dataclass
class _Result:
    """What one part becomes: tensors to write, quant entries of its qweights, re-quantization errors."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, QuantSpec] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    group_size: int = 64,
    method: str = "clip",
    quantize_head: bool = True,
    progress: bool = True,
    parts: str | PartSpec = "f",
    fsync: bool = True,
) -> Manifest:
    """Convert a GGUF model (a file, or any file of a split model) into a sepweight folder; re-running resumes.

    Args:
        dtype: compute dtype of everything not stored as integers (default bf16).
        quant: None keeps Q4_0/Q4_1/Q4_K linears as int4 (lossless) and dequantizes the rest; ``"int4"``
            also quantizes the other linears; ``"int8"`` stores every linear int8 (Q4 ones re-quantized,
            the added error logged) (``group_size``, ``method`` as in
            :func:`llm_sepweight.quantize_int4`; scales fp32); ``"none"`` dequantizes everything.
        quantize_head: False stores an untied head dequantized.

    Example::

        convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm-sep")   # int4 linears, bf16 elsewhere
    """
    from .convert import parse_dtype

    if quant not in QUANTS:
        raise SepweightError(f"quant {quant!r} is not one of {list(QUANTS)}")
    if quant == "int4" and (group_size not in GROUP_SIZES or method not in METHODS):
        raise SepweightError(
            f"int4 needs a group size in {list(GROUP_SIZES)} and a method in {list(METHODS)}, "
            f"got {group_size!r} / {method!r}"
        )
    policy = Policy(quant, group_size, method, quantize_head)
    target = parse_dtype(dtype) or torch.bfloat16
    model = open_gguf(src)
    config = gguf_config(model)
    tokenizer_json, tokenizer_config = gguf_tokenizer(model)
    tied = bool(config.get("tie_word_embeddings"))
    spec = PartSpec.parse(parts).resolve(config["num_hidden_layers"]).stored_parts(tied)  # a tied head needs b
    plan = _plan(model, config, spec)
    _check_plan(plan, policy)
    top = policy.manifest_entry(plan)
    source: dict[str, Any] = {
        "src": str(src),
        "format": "gguf",
        "files": [p.name for p in model.paths],
        "parts": str(spec),
        "dtype": str(target),
        "quant": top,
        "gguf_types": _type_counts(model),
    }
    key = _resume_key(model, spec, target, policy, derived=[config, tokenizer_json, tokenizer_config])
    # finished: nothing to read or write; another process converting into dst is waited for (as convert)
    got = claim_folder(
        Path(dst),
        key,
        lambda: SepweightWriter(dst, config, resume_key=key, source=source, fsync=fsync, quant=top),
        progress=progress,
    )
    if isinstance(got, Manifest):
        return got
    with got as writer:  # a failed run releases the folder's lock at once
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.json").write_text(tokenizer_json)
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            writer.copy_extra(Path(tmp) / "tokenizer.json")
            writer.copy_extra(Path(tmp) / "tokenizer_config.json")
        errors: dict[str, dict[str, Any]] = {}
        for part in tqdm(list(plan), desc=f"convert -> {dst}", disable=not progress):
            if writer.done(part):
                name = part_filename(part)
                errors.update(
                    _previous_errors(model, config, part, plan[part], policy, writer.root / name, writer.files[name])
                )
                continue
            result = _convert_part(model, config, part, plan[part], target, policy)
            specs = [TensorSpec(k, v, v.dtype) for k, v in result.tensors.items()]
            writer.write(part, specs, quant=result.quant)
            errors.update(result.errors)
        if errors:
            worst_key, worst = max(errors.items(), key=lambda kv: kv[1]["rel_rms_err"])
            log.warning(
                "%s: re-quantized %d tensor(s) of a GGUF quantization; worst relative RMS error %.3g "
                "(%s: %s -> %s, max |dw| %.3g); all in manifest.json source.requantized",
                src,
                len(errors),
                worst["rel_rms_err"],
                worst_key,
                worst["from"],
                worst["to"],
                worst["max_abs_err"],
            )
        writer.source["requantized"] = dict(sorted(errors.items()))
        return writer.finish()


def _plan(model: GGUFModel, config: dict[str, Any], spec: PartSpec) -> dict[Part, dict[str, GGUFTensor]]:
    """For each wanted part (in order): relative key -> GGUF tensor. Checks that every layer is complete."""
    n = config["num_hidden_layers"]
    where = model.paths[0]
    wanted: list[Part] = (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else [])
    plan: dict[Part, dict[str, GGUFTensor]] = {p: {} for p in wanted}  # in writing order
    all_layers: dict[int, set[str]] = {i: set() for i in range(n)}
    for name, t in model.tensors.items():
        if name == ROPE_FREQS:  # read into config.json's rope_scaling by gguf_config
            continue
        c = classify(name, t.path)
        if c is None:
            continue
        part, rel = c
        if isinstance(part, int):
            if part >= n:
                raise SepweightError(f"{t.path}: tensor {name!r} is for layer {part}, but block_count is {n}")
            all_layers[part].add(rel)
        if part in plan:
            plan[part][rel] = t
    if "begin" in plan and "embed_tokens.weight" not in plan["begin"]:
        raise SepweightError(f"{where}: GGUF has no 'token_embd.weight'")
    if "end" in plan and "norm.weight" not in plan["end"]:
        raise SepweightError(f"{where}: GGUF has no 'output_norm.weight'")
    reference = all_layers.get(0, set())
    for i, keys in all_layers.items():
        if not keys or keys != reference:
            raise SepweightError(
                f"{where}: layer {i} ('blk.{i}.*') has tensors {sorted(keys)}, layer 0 has {sorted(reference)}; "
                "the file is incomplete or of an unsupported layout"
            )
    return plan


def _check_plan(plan: dict[Part, dict[str, GGUFTensor]], policy: Policy) -> None:
    """Fail before anything is written: dequantize one row of each stored type; check int4's group size."""
    seen: set[int] = set()
    for part, tensors in plan.items():
        for rel, t in tensors.items():
            if t.ggml_type not in seen:
                seen.add(t.ggml_type)
                t.dequantize(slice(0, 1))
            k = t.shape[-1]
            if policy.action(part, rel, t) == "int4" and k % policy.group_size:
                raise SepweightError(
                    f"{t.path}: tensor {t.name!r} has in_features K={k}, not a multiple of group_size "
                    f"{policy.group_size}; use a group size that divides every linear's K (e.g. 32) or int8"
                )


def _type_counts(model: GGUFModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in model.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return dict(sorted(counts.items()))


def _convert_part(
    model: GGUFModel,
    config: dict[str, Any],
    part: Part,
    tensors: dict[str, GGUFTensor],
    dtype: torch.dtype,
    policy: Policy,
) -> _Result:
    out = _Result()
    for rel, t in sorted(tensors.items()):
        rows = _row_order(model, config, rel, t)
        action = policy.action(part, rel, t)
        if action == "plain":
            out.tensors[rel] = dequantized(t, dtype, rows)
            continue
        prefix = rel.removesuffix(".weight")
        if action == "q4":
            stored, spec = int4_from_q4(t, rows)
        else:
            w = dequantized(t, torch.float32, rows)  # (N, K)
            where = f"{t.path}: tensor {t.name!r}"
            stored, spec = quantize_linear(w, action, policy.group_size, policy.method, SCALE_DTYPE, name=where)
            if t.type_name not in _FLOAT_TYPES:  # a GGUF quantization quantized again: report what it adds
                err = {"from": t.type_name, "to": action, **requant_error(w, stored, spec)}
                out.errors[f"layer {part} {prefix}" if isinstance(part, int) else f"{part} {prefix}"] = err
                log.info("%s: %s -> %s adds max |dw| %.3g, relative RMS %.3g", where, *err.values())
        out.tensors |= {f"{prefix}.{suffix}": v for suffix, v in stored.items()}
        out.quant[f"{prefix}.qweight"] = spec
    return out


def _previous_errors(
    model: GGUFModel,
    config: dict[str, Any],
    part: Part,
    tensors: dict[str, GGUFTensor],
    policy: Policy,
    path: Path,
    entry: FileEntry,
) -> dict[str, dict[str, Any]]:
    """The re-quantization errors of a part a killed run already wrote, recomputed from its file."""
    errors: dict[str, dict[str, Any]] = {}
    stored: dict[str, torch.Tensor] | None = None
    for rel, t in sorted(tensors.items()):
        action = policy.action(part, rel, t)
        if action in ("plain", "q4") or t.type_name in _FLOAT_TYPES:
            continue
        stored = stored if stored is not None else open_tensors(path)
        prefix = rel.removesuffix(".weight")
        mine = {k.removeprefix(prefix + "."): v for k, v in stored.items() if k.startswith(prefix + ".")}
        spec = QuantSpec.from_json(entry.tensors[f"{prefix}.qweight"]["quant"], str(path))
        w = dequantized(t, torch.float32, _row_order(model, config, rel, t))
        label = f"layer {part} {prefix}" if isinstance(part, int) else f"{part} {prefix}"
        errors[label] = {"from": t.type_name, "to": action, **requant_error(w, mine, spec)}
    return errors


def _row_order(model: GGUFModel, config: dict[str, Any], rel: str, t: GGUFTensor) -> torch.Tensor | None:
    """The gather undoing llama.cpp's Q/K permutation (llama only), None for every other tensor."""
    if model.architecture != "llama" or not rel.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
        return None
    heads = config["num_attention_heads"] if rel.startswith("self_attn.q_proj.") else config["num_key_value_heads"]
    return unpermute_rows(t.shape[0], heads)


def _resume_key(model: GGUFModel, spec: PartSpec, dtype: torch.dtype, policy: Policy, derived: Any) -> str:
    """Identifies 'the same conversion': same GGUF files (name, size, mtime, ctime), parts, dtype, policy and
    what this code derives from the metadata (config, tokenizer: a folder an older converter wrote is redone)."""
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ctime_ns] for p in model.paths}
    key = {
        "gguf": [str(model.paths[0].resolve()), stats],
        "derived": hashlib.sha256(json.dumps(derived, sort_keys=True, default=str).encode()).hexdigest(),
        "parts": str(spec),
        "dtype": str(dtype),
        "policy": [policy.quant, policy.group_size, policy.method, policy.quantize_head],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
