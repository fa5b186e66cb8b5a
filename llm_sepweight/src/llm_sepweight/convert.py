"""convert(): an HF checkpoint (local folder or hub id), a GGUF file or a sepweight folder -> a sepweight folder.

Streamed part by part: at most one part's source tensors are mapped, and a quantized linear is
quantized while its part is written (QUANT_FORMAT.md), so memory stays about one part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import is_tied, open_checkpoint, read_config
from .errors import SepweightError
from .folder_lock import claim_folder, finished_conversion
from .hub import fetch, looks_like_repo_id
from .manifest import FORMAT_VERSION, Manifest, Part, part_filename, read_if_complete
from .quant import (
    GROUP_SIZES,
    METHOD_VERSIONS,
    METHODS,
    SCHEMES,
    QuantSpec,
    default_scale_dtype,
    is_linear,
    quantize_linear,
)
from .quant_importance import input_importance
from .quant_pack import int4_layout
from .safetensors_io import TensorSpec
from .sources import HFSource, SepweightSource, Source, is_sepweight_folder
from .spec import PartSpec
from .writer import SepweightWriter

log = logging.getLogger(__name__)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise SepweightError(f"dtype {dtype!r} is not supported; use one of bf16, fp16, fp32 (or None to keep)")


@dataclass(frozen=True)
class QuantSettings:
    """How convert() quantizes linears; validated before anything is written."""

    scheme: str
    group_size: int | None
    method: str
    quantize_head: bool

    @classmethod
    def make(cls, quant: str | None, group_size: int, method: str, quantize_head: bool) -> QuantSettings | None:
        if quant is None:
            return None
        if quant not in SCHEMES:
            raise SepweightError(f"quant {quant!r} is not one of {list(SCHEMES)} (or None for no quantization)")
        if quant == "int8":
            return cls("int8", None, "rtn", quantize_head)  # symmetric absmax per output channel
        if group_size not in GROUP_SIZES:
            raise SepweightError(f"group size {group_size!r} is not one of {list(GROUP_SIZES)}")
        if method not in METHODS:
            raise SepweightError(f"quantization method {method!r} is not one of {list(METHODS)}")
        return cls("int4", group_size, method, quantize_head)

    def manifest_entry(self, scale_dtype: torch.dtype) -> dict[str, Any]:
        """The manifest's top-level ``quant``."""
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "scale_dtype": str(scale_dtype).removeprefix("torch."),
            "method": self.method,
            "quantize_head": self.quantize_head,
        }


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    parts: str | PartSpec = "f",
    revision: str | None = None,
    fsync: bool = True,
    quant: str | None = None,
    group_size: int = 64,
    quant_method: str = "clip",
    quantize_head: bool = True,
) -> Manifest:
    """Convert a checkpoint into a sepweight folder; re-running resumes where a killed run stopped.

    Args:
        src: local HF checkpoint folder (safetensors single/sharded, or legacy pytorch_model*.bin),
            a hub repo id such as ``"Qwen/Qwen2.5-0.5B"`` (only the needed shards are downloaded), or a
            ``.gguf`` file (see :func:`llm_sepweight.gguf_import.convert_gguf`; dtype default bf16), or a
            sepweight folder (re-quantized, de-quantized or cast without the original checkpoint).
        dst: output folder.
        dtype: convert floating tensors to bf16 / fp16 / fp32; None keeps the stored dtype.
        parts: which parts to write, as a spec (``"f"`` full, ``"b 0-12"``, ...).
        quant: ``"int8"`` or ``"int4"`` stores every linear (``*_proj`` of a layer, an untied
            ``lm_head``) as packed integers + scales (QUANT_FORMAT.md); None stores weights unquantized
            (a quantized sepweight source is then dequantized). Embedding, norms and biases keep ``dtype``.
        group_size: int4 inputs per scale/zero (32, 64, 128 or 256).
        quant_method: int4 scales: ``"clip"`` (a per-group range search for the least weight error) or
            ``"rtn"`` (plain min/max round-to-nearest).
        quantize_head: False keeps an untied ``lm_head`` unquantized.

    Example::

        manifest = convert("path/to/Qwen2.5-0.5B", "qwen-sep", dtype="bf16")
        print(manifest.num_layers, list(manifest.files))
        convert("qwen-sep", "qwen-int4", quant="int4", group_size=64)   # re-quantize a sepweight folder
    """
    if str(src).lower().endswith(".gguf"):  # llama.cpp / ollama files: their own converter
        from .gguf_import import convert_gguf

        how = {"quant": quant, "group_size": group_size, "method": quant_method, "quantize_head": quantize_head}
        return convert_gguf(src, dst, dtype=dtype, progress=progress, parts=parts, fsync=fsync, **how)
    spec = PartSpec.parse(parts)
    target = parse_dtype(dtype)
    settings = QuantSettings.make(quant, group_size, quant_method, quantize_head)
    src_str, dst = str(src), Path(dst)
    request = {"src": src_str, "revision": revision, "dtype": str(target) if target else None}
    if Path(src).exists():
        root = Path(src)
    elif looks_like_repo_id(src_str):
        try:
            root = fetch(src_str, spec, revision)
        except SepweightError as e:  # offline, or the hub unreachable: a finished conversion still serves
            done = _converted_before(dst, request, spec, settings)
            if done is None:
                raise
            if not os.environ.get("HF_HUB_OFFLINE"):
                log.warning("%s; using the finished conversion in %s", e, dst)
            return done
    else:
        raise SepweightError(f"{src}: no such folder, and not a hub repo id of the form 'owner/name'")
    if dst.resolve() == root.resolve():
        raise SepweightError(f"{dst}: the output folder is the source folder; convert into a new folder")
    source, spec = _open_source(root, spec)
    order: list[Part] = (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else [])
    key = _resume_key(source, spec, target, settings)
    done = finished_conversion(dst, key)
    if done is not None:  # the same conversion is complete: nothing is read, written or re-hashed
        source.release()
        return done
    scale_dtype = _preflight(source, order, settings, target)
    quant_entry = settings.manifest_entry(scale_dtype) if settings and scale_dtype else None
    about = {**request, "parts": str(spec), "quant": quant_entry}
    # another process converting into dst is waited for: it may be this same conversion
    got = claim_folder(
        dst,
        key,
        lambda: SepweightWriter(
            dst,
            source.config,
            resume_key=key,
            source=about,
            fsync=fsync,
            quant=quant_entry,
            part_keys={part_filename(p): _part_key(source, p, target, settings) for p in order},
        ),
        progress=progress,
    )
    if isinstance(got, Manifest):
        source.release()
        return got
    with got as writer:  # a failed run releases the folder's lock at once
        for name, extra in source.extra_files().items():
            writer.copy_extra(extra, name)
        total = sum(_out_bytes(source, p, target) for p in order)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {dst}", disable=not progress) as bar:
            for part in order:
                if not writer.done(part):
                    specs, entries = _part_specs(source, part, target, settings, scale_dtype)
                    writer.write(part, specs, quant=entries)
                    del specs
                bar.update(_out_bytes(source, part, target))
        source.release()
        return writer.finish()


def _open_source(root: Path, spec: PartSpec) -> tuple[Source, PartSpec]:
    """The source and the resolved parts to write: those of `spec` and what they need (a tied head
    needs the embedding, :meth:`PartSpec.stored_parts`)."""
    if is_sepweight_folder(root):
        m = Manifest.read(root)
        spec = spec.resolve(m.num_layers).stored_parts(m.tie_word_embeddings)
        return SepweightSource(root, spec), spec
    config = read_config(root / "config.json")
    spec = spec.resolve(int(config["num_hidden_layers"])).stored_parts(is_tied(config))
    return HFSource(open_checkpoint(root, spec), spec), spec


def _converted_before(
    dst: Path, request: dict[str, Any], spec: PartSpec, settings: QuantSettings | None
) -> Manifest | None:
    """A complete folder converted from the same hub id with the same options (the source unreachable)."""
    manifest = read_if_complete(dst)
    if manifest is None or any(manifest.source.get(k) != v for k, v in request.items()):
        return None
    parts = spec.resolve(manifest.num_layers).stored_parts(manifest.tie_word_embeddings)
    stored = dict(manifest.source.get("quant") or {})
    wanted = settings.manifest_entry(torch.float32) if settings else {}
    for entry in (stored, wanted):
        entry.pop("scale_dtype", None)  # follows from the dtype, compared above
    return manifest if manifest.source.get("parts") == str(parts) and stored == wanted else None


def _part_specs(
    source: Source,
    part: Part,
    target: torch.dtype | None,
    settings: QuantSettings | None,
    scale_dtype: torch.dtype | None,
) -> tuple[list[TensorSpec], dict[str, QuantSpec]]:
    """What to write for one part: tensors converted to the target dtype as they stream, linears quantized."""
    sizes = source.sizes(part)
    specs: list[TensorSpec] = []
    entries: dict[str, QuantSpec] = {}
    tensors = source.tensors(part)
    for rel in sorted(tensors):
        stored = sizes[rel][0]
        if settings is None or not is_linear(part, rel, settings.quantize_head):
            specs.append(TensorSpec(rel, tensors[rel], _target(stored, target)))
            continue
        prefix = rel.removesuffix(".weight")
        name = f"{_describe(part)} {rel}"
        group = settings.group_size or 0
        importance = None  # the clip search weighs each input column by its estimated activation size
        if settings.scheme == "int4" and settings.method == "clip":
            importance = input_importance(part, rel, tensors, source.config)
        q, entry = quantize_linear(
            tensors[rel], settings.scheme, group, settings.method, scale_dtype, name=name, importance=importance
        )
        specs += [TensorSpec(f"{prefix}.{suffix}", t, t.dtype) for suffix, t in q.items()]
        entries[f"{prefix}.qweight"] = entry
    return specs, entries


def _preflight(
    source: Source, order: list[Part], settings: QuantSettings | None, target: torch.dtype | None
) -> torch.dtype | None:
    """Reject a group size that does not divide a linear's in_features before anything is written.

    Checks the first layer's linears and the head (every layer has the same keys); a later layer
    of another shape is still checked when it is quantized. Returns the scale dtype (None: nothing
    to quantize).
    """
    if settings is None:
        return None
    first = [p for p in order if isinstance(p, int)][:1] + [p for p in order if p == "end"]
    scale_dtype = None
    for part in first:
        for rel, (stored, _) in sorted(source.sizes(part).items()):
            if not is_linear(part, rel, settings.quantize_head):
                continue
            scale_dtype = scale_dtype or default_scale_dtype(target or stored)
            shape = source.shape(part, rel)
            if settings.group_size and len(shape) == 2 and shape[1] % settings.group_size:
                divisors = [g for g in GROUP_SIZES if shape[1] % g == 0]
                raise SepweightError(
                    f"{_describe(part)} {rel}: in_features {shape[1]} is not a multiple of the group size "
                    f"{settings.group_size}; use --group-size {divisors[-1] if divisors else '?'} or int8"
                )
    source.release()
    if scale_dtype is None and order:
        scale_dtype = default_scale_dtype(target or torch.float32)  # parts without linears (begin only)
    return scale_dtype


def _describe(part: Part) -> str:
    return f"layer {part}" if isinstance(part, int) else f"{part} part"


def _target(src: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and src.is_floating_point else src


def _out_bytes(source: Source, part: Part, target: torch.dtype | None) -> int:
    """Bytes the part would take unquantized: the progress bar's unit."""
    return sum(numel * _target(dtype, target).itemsize for dtype, numel in source.sizes(part).values())


def _part_key(source: Source, part: Part, target: torch.dtype | None, settings: QuantSettings | None) -> str:
    """Identifies one part file's bytes: the source files it reads (name, size, mtime), dtype and quantization."""
    quant = _quant_key(settings)
    key = {"v": FORMAT_VERSION, **source.part_identity(part), "part": part, "dtype": str(target), "quant": quant}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _resume_key(source: Source, spec: PartSpec, target: torch.dtype | None, settings: QuantSettings | None) -> str:
    """Identifies 'the same conversion': same source files (name, size, mtime), parts, dtype and quantization."""
    key = {
        "v": FORMAT_VERSION,
        **source.identity(),
        "parts": str(spec),
        "dtype": str(target),
        "quant": _quant_key(settings),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _quant_key(settings: QuantSettings | None) -> list[Any] | None:
    """The quantization part of the keys: settings, layout and the int4 method's version (METHOD_VERSIONS)."""
    if settings is None:
        return None
    version = METHOD_VERSIONS.get(settings.method, 1) if settings.scheme == "int4" else 1
    return [*settings.__dict__.values(), int4_layout()] + ([f"v{version}"] if version > 1 else [])
