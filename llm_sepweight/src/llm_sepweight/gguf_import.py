"""convert_gguf(): a GGUF model (llama.cpp / ollama) -> a sepweight folder, part by part.

Per tensor, what our formats can hold without loss is kept:

- ``Q4_0`` / ``Q4_1`` linears -> ``int4`` with ``group_size=32``, GGUF's integers and fp16 block
  scales exactly (scales in fp32): Q4_0 ``w = d (q - 8)`` is ``s = d, z = 0``; Q4_1 ``w = d q + m``
  is ``s = d, z = m + 8 d``.
- everything else (F32/F16/BF16 weights and norms, Q5/Q8_0/K-quants) is dequantized with
  ``gguf.quants.dequantize`` to the compute dtype, or re-quantized per ``quant`` (linears only). The
  error a re-quantization adds (max |dw|, RMS(dw)/RMS(w)) is logged and kept in the manifest's source.
  ``Q8_0`` has a scale per 32 values where our int8 has one per output channel, so it cannot be kept.

llama's Q/K rows, permuted by llama.cpp for its rope, are put back as transformers does; a row
permutation moves whole GGUF blocks, so it is lossless for every type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import SepweightError
from .gguf_config import gguf_config
from .gguf_reader import GGUFModel, GGUFTensor, classify, open_gguf, unpermute_rows
from .gguf_tokenizer import gguf_tokenizer
from .manifest import Manifest, Part
from .quant import QuantSpec, default_layout, quantize_int4, quantize_int8
from .quant_pack import pack_int4
from .safetensors_io import TensorSpec
from .spec import PartSpec
from .writer import SepweightWriter

log = logging.getLogger(__name__)

LOSSLESS_INT4 = {"Q4_0": 18, "Q4_1": 20}  # block bytes of 32 values: fp16 d (+ fp16 m) + 16 bytes of nibbles
GGUF_GROUP_SIZE = 32
QUANTS = (None, "none", "int8", "int4")
_CHUNK_ROWS_BYTES = 64 << 20  # dequantize big tensors (the embedding) this many output bytes at a time


@dataclass
class _Result:
    """What one part becomes: tensors to write, quant entries of its qweights, requantization errors."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, QuantSpec] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)


def is_linear(part: Part, rel: str) -> bool:
    """A quantizable linear (QUANT_FORMAT.md): ``*_proj.weight`` of a layer, ``lm_head.weight`` of the end."""
    return (isinstance(part, int) and rel.endswith("_proj.weight")) or (part == "end" and rel == "lm_head.weight")


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    group_size: int = 64,
    method: str = "clip",
    progress: bool = True,
    parts: str | PartSpec = "f",
    fsync: bool = True,
) -> Manifest:
    """Convert a GGUF model (a file, or any file of a split model) into a sepweight folder; re-running resumes.

    Args:
        dtype: compute dtype of everything not stored as integers (default bf16).
        quant: None keeps Q4_0/Q4_1 linears as int4 (lossless) and dequantizes the rest; ``"int8"`` /
            ``"int4"`` also quantize the other linears (``group_size``, ``method`` as in
            :func:`quantize_int4`); ``"none"`` dequantizes everything.

    Example::

        convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm-sep")   # int4 linears, bf16 elsewhere
    """
    from .convert import parse_dtype

    if quant not in QUANTS:
        raise SepweightError(f"quant {quant!r} is not one of {list(QUANTS)}")
    target = parse_dtype(dtype) or torch.bfloat16
    model = open_gguf(src)
    config = gguf_config(model)
    tokenizer_json, tokenizer_config = gguf_tokenizer(model)
    spec = PartSpec.parse(parts).resolve(config["num_hidden_layers"])
    plan = _plan(model, config, spec)
    _check_plan(plan, quant, group_size)
    quant_name = None if quant == "none" else quant
    key = _resume_key(model, spec, target, quant_name, group_size, method)
    source: dict[str, Any] = {
        "src": str(src),
        "format": "gguf",
        "files": [p.name for p in model.paths],
        "parts": str(spec),
        "dtype": str(target),
        "quant": quant_name,
        "gguf_types": _type_counts(model),
    }
    writer = SepweightWriter(dst, config, resume_key=key, source=source, fsync=fsync)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(tokenizer_json)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        writer.copy_extra(Path(tmp) / "tokenizer.json")
        writer.copy_extra(Path(tmp) / "tokenizer_config.json")
    errors: dict[str, dict[str, Any]] = {}
    order: list[Part] = (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else [])
    for part in tqdm(order, desc=f"convert -> {dst}", disable=not progress):
        if writer.done(part):
            continue
        result = _convert_part(model, config, part, plan[part], target, quant, group_size, method)
        _write(writer, part, result)
        errors.update(result.errors)
    if errors:
        worst = max(errors.items(), key=lambda kv: kv[1]["rel_rms_err"])
        log.warning(
            "%s: re-quantized %d tensor(s); worst relative RMS error %.3g (%s: %s -> %s, max |dw| %.3g)",
            src,
            len(errors),
            worst[1]["rel_rms_err"],
            worst[0],
            worst[1]["from"],
            worst[1]["to"],
            worst[1]["max_abs_err"],
        )
    writer.source["requantized"] = errors
    return writer.finish()


def _plan(model: GGUFModel, config: dict[str, Any], spec: PartSpec) -> dict[Part, dict[str, GGUFTensor]]:
    """For each wanted part: relative key -> GGUF tensor. Checks that every part is complete."""
    n = config["num_hidden_layers"]
    where = model.paths[0]
    wanted: list[Part] = (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else [])
    plan: dict[Part, dict[str, GGUFTensor]] = {p: {} for p in wanted}
    all_layers: dict[int, set[str]] = {i: set() for i in range(n)}
    for name, t in model.tensors.items():
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


def _check_plan(plan: dict[Part, dict[str, GGUFTensor]], quant: str | None, group_size: int) -> None:
    """Fail before anything is written: dequantize one row of each stored type; check int4's group size."""
    seen: set[int] = set()
    for part, tensors in plan.items():
        for rel, t in tensors.items():
            if t.ggml_type not in seen:
                seen.add(t.ggml_type)
                t.dequantize(slice(0, 1))
            k = t.shape[-1]
            if quant == "int4" and is_linear(part, rel) and t.type_name not in LOSSLESS_INT4 and k % group_size:
                raise SepweightError(
                    f"{t.path}: tensor {t.name!r} has in_features K={k}, not a multiple of group_size {group_size}; "
                    f"use a group size that divides every linear's K (e.g. 32) or --quant int8"
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
    quant: str | None,
    group_size: int,
    method: str,
) -> _Result:
    out = _Result()
    for rel, t in sorted(tensors.items()):
        rows = _row_order(model, config, rel, t)
        prefix = rel.removesuffix(".weight")
        if is_linear(part, rel) and t.type_name in LOSSLESS_INT4 and quant != "none":
            qweight, sz, spec = int4_from_q4(t, rows)
            out.tensors |= {f"{prefix}.qweight": qweight, f"{prefix}.scales_and_zeros": sz}
            out.quant[f"{prefix}.qweight"] = spec
            continue
        if not is_linear(part, rel) or quant in (None, "none"):
            out.tensors[rel] = _dequantized(t, rows, dtype)
            continue
        where = f"{t.path}: tensor {t.name!r}"
        w = _dequantized(t, rows, torch.float32)  # (N, K)
        if quant == "int8":
            qweight, scales = quantize_int8(w, torch.float32, name=where)
            spec = QuantSpec("int8", tuple(w.shape))
            out.tensors |= {f"{prefix}.qweight": qweight, f"{prefix}.scales": scales}
        else:
            qweight, scales = quantize_int4(w, group_size, None, method, torch.float32, name=where)
            spec = QuantSpec("int4", tuple(w.shape), group_size, default_layout(w.shape[0]))
            out.tensors |= {f"{prefix}.qweight": qweight, f"{prefix}.scales_and_zeros": scales}
        out.quant[f"{prefix}.qweight"] = spec
        if t.type_name not in ("F32", "F16", "BF16"):  # a GGUF quantization re-quantized: report what it adds
            out.errors[_label(part, prefix)] = _error(w, spec, out.tensors, prefix, t.type_name, quant)
    return out


def _label(part: Part, prefix: str) -> str:
    return f"layer {part} {prefix}" if isinstance(part, int) else f"{part} {prefix}"


def _error(
    w: torch.Tensor, spec: QuantSpec, tensors: dict[str, torch.Tensor], prefix: str, src: str, dst: str
) -> dict[str, Any]:
    from .quant import dequantize

    mine = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    d = dequantize(mine, spec, torch.float32) - w
    rel = float(d.pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp_min(1e-30))
    err = {"from": src, "to": dst, "max_abs_err": float(d.abs().max()), "rel_rms_err": rel}
    log.info("%s -> %s: max |dw| %.3g, relative RMS error %.3g (%s)", src, dst, err["max_abs_err"], rel, prefix)
    return err


def _row_order(model: GGUFModel, config: dict[str, Any], rel: str, t: GGUFTensor) -> torch.Tensor | None:
    """The gather undoing llama.cpp's Q/K permutation (llama only), None for every other tensor."""
    if model.architecture != "llama" or not rel.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
        return None
    heads = config["num_attention_heads"] if rel.startswith("self_attn.q_proj.") else config["num_key_value_heads"]
    return unpermute_rows(t.shape[0], heads)


def _raw_rows(t: GGUFTensor, rows: torch.Tensor | None) -> np.ndarray:
    data = np.asarray(t.data)
    return data if rows is None else data[rows.numpy()]


def _dequantized(t: GGUFTensor, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in `dtype`, rows re-ordered; big tensors are dequantized a chunk of rows at a time."""
    out = torch.empty(t.shape, dtype=dtype)
    if len(t.shape) == 1:
        return out.copy_(t.dequantize().reshape(t.shape))
    step = max(1, _CHUNK_ROWS_BYTES // max(1, out[0].numel() * 4))
    for a in range(0, t.shape[0], step):
        b = min(t.shape[0], a + step)
        if rows is None:
            out[a:b] = t.dequantize(slice(a, b)).reshape(b - a, *t.shape[1:])
        else:
            out[a:b] = _dequantize_rows(t, rows[a:b])
    return out


def _dequantize_rows(t: GGUFTensor, rows: torch.Tensor) -> torch.Tensor:
    import gguf

    data = np.asarray(t.data)[rows.numpy()]
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(len(rows), *t.shape[1:])


def int4_from_q4(t: GGUFTensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
    """A Q4_0 / Q4_1 tensor as our int4 (group 32): ``(qweight, scales_and_zeros fp32, spec)``, no rounding.

    Example::

        qweight, sz, spec = int4_from_q4(open_gguf("m.gguf").tensors["blk.0.ffn_up.weight"])
        w = dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec)   # == gguf's dequantize
    """
    n, k = t.shape
    block = LOSSLESS_INT4[t.type_name]
    raw = torch.from_numpy(np.array(_raw_rows(t, rows))).view(n, k // GGUF_GROUP_SIZE, block)  # (N, G, block)
    d = raw[..., 0:2].contiguous().view(torch.float16).float()  # (N, G, 1)
    nibbles = raw[..., block - 16 :]  # (N, G, 16): byte j holds values j (low) and j + 16 (high)
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(n, k)  # (N, K) in 0..15
    if t.type_name == "Q4_0":
        z = torch.zeros_like(d)
    else:
        z = raw[..., 2:4].contiguous().view(torch.float16).float() + 8 * d  # m + 8 d
    sz = torch.cat([d, z], dim=-1)  # (N, G, 2)
    spec = QuantSpec("int4", (n, k), GGUF_GROUP_SIZE, default_layout(n))
    return pack_int4(q, spec.layout), sz, spec  # type: ignore[arg-type]


def _write(writer: SepweightWriter, part: Part, result: _Result) -> None:
    specs = [TensorSpec(k, v, v.dtype) for k, v in result.tensors.items()]
    entry = writer.write(part, specs)
    for key, spec in result.quant.items():  # the per-tensor quant entry of QUANT_FORMAT.md
        entry.tensors[key]["quant"] = spec.to_json()
    writer._save_journal()


def _resume_key(
    model: GGUFModel, spec: PartSpec, dtype: torch.dtype, quant: str | None, group_size: int, method: str
) -> str:
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in model.paths}
    key = {
        "gguf": [str(model.paths[0].resolve()), stats],
        "parts": str(spec),
        "dtype": str(dtype),
        "quant": [quant, group_size, method],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
