"""merge_adapter(): write ``W + B@A * scaling`` into a new sepweight folder (and optionally an HF one).

Streams part by part: one layer's tensors are resident at a time, the delta is computed in fp32
and rounded once to the stored dtype, and a non-finite result stops the merge. The source folder
is never written (merging in place would turn its copy-on-write mapped pages into anonymous memory
and still leave the files unchanged).

A quantized folder (int8/int4, llm_sepweight's QUANT_FORMAT.md) is refused: rounding ``W + B@A`` back
to 4 or 8 bits would lose most of the adapter (its delta is far below one quantization step), and
writing it unquantized would silently bring back the size the folder was quantized to avoid. Merge
into the unquantized folder the quantized one was made from (a QLoRA adapter has the same keys), or
serve the adapter unmerged over the quantized base (``load_part`` + ``load_adapter``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import llm_sepweight as sw

from .errors import LoraError
from .peft_io import AdapterWeights, adapter_key, read_adapter

Tensors = dict[str, torch.Tensor]
Part = str | int


def merged_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, where: str = ""
) -> torch.Tensor:
    """``W + (B @ A) * scaling`` computed in fp32 and rounded once to W's dtype; refuses non-finite values.

    Example::

        W2 = merged_weight(W, A, B, scaling=2.0)     # (out, in), W.dtype; W itself is not modified
    """
    w32 = weight.to(torch.float32)  # a copy unless W is fp32; addmm below is out of place either way
    out = torch.addmm(w32, B.to(torch.float32), A.to(torch.float32), alpha=scaling)  # (out, r) @ (r, in)
    out = out.to(weight.dtype)
    if not bool(torch.isfinite(out).all()):
        raise LoraError(
            f"merging the adapter into {where or 'a weight'} gives non-finite values (inf/nan in {weight.dtype}); "
            "the adapter is diverged or too large for this dtype: nothing usable was written"
        )
    return out


def _hf_name(part: Part, key: str) -> str:
    """Transformers' name of a stored tensor (llm_sepweight's fixed mapping)."""
    if isinstance(part, int):
        return f"model.layers.{part}.{key}"
    return key if key.startswith("lm_head.") else f"model.{key}"


def _plan(source: sw.SepWeights, weights: AdapterWeights, adapter: Path, strict: bool) -> dict[Part, dict[str, str]]:
    """part -> {stored key: adapted module}; checks every adapted module exists (unless not strict) and fits."""
    where: dict[str, tuple[Part, str]] = {}
    for entry in source.manifest.files.values():
        for key in entry.tensors:
            where[_hf_name(entry.part, key)] = (entry.part, key)
    plan: dict[Part, dict[str, str]] = {}
    for module, (A, B) in weights.items():
        name = f"{module}.weight"
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if name not in where and not strict and layer is not None and int(layer[1]) < source.num_layers:
            continue  # a layer of the model that this part-folder does not hold
        if name not in where and f"{module}.qweight" in where:
            raise LoraError(
                f"{source.root} is a quantized folder ({module} is stored as packed integers + scales): merge_adapter "
                "refuses it, since rounding the merged weight back to int8/int4 would lose the adapter; merge into the "
                "unquantized folder it was converted from (the adapter's keys are the same), or use the adapter "
                "unmerged: load_part(quantized folder) + load_adapter"
            )
        if name not in where:
            tied = (
                " (the head is tied to the embedding in this model)" if name == "lm_head.weight" and source.tied else ""
            )
            raise LoraError(
                f"{adapter}: adapts {module}, but {source.root} stores no tensor {name!r}{tied}; the adapter was made "
                f"for another model, or the folder holds only {str(source.spec)!r} (strict=False merges its share)"
            )
        part, key = where[name]
        shape = source.shape(part, key)
        if tuple(B.shape[:1]) + tuple(A.shape[1:]) != shape:
            raise LoraError(
                f"{adapter}: {adapter_key(module, 'lora_A')} {list(A.shape)} / lora_B {list(B.shape)} do not fit "
                f"{name} of shape {list(shape)} in {source.root}; the adapter was made for a different base model"
            )
        plan.setdefault(part, {})[key] = module
    return plan


def _part_tensors(source: sw.SepWeights, part: Part) -> Tensors:
    """The tensors stored in one part file (mmapped views); the tied head is not a stored tensor."""
    if part == "begin":
        return source.begin()
    if part == "end":
        end = source.end()
        if source.tied:
            end.pop("lm_head.weight")
        return end
    return source.layer(int(part))


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    hf_out: str | Path | None = None,
    overwrite: bool = False,
    strict: bool = True,
) -> Path:
    """Merge a PEFT LoRA adapter into the weights of a sepweight folder, writing a new folder.

    Args:
        base: the sepweight folder the adapter was trained on (any part of a model).
        adapter: a PEFT adapter folder (ours or PEFT's).
        out: the new sepweight folder: same parts, dtype, config and tokenizer files.
        hf_out: also write a transformers checkpoint folder (one safetensors shard per part plus
            ``model.safetensors.index.json``); needs a folder holding the whole model.
        overwrite: allow ``out`` / ``hf_out`` to be non-empty.
        strict: every module the adapter adapts must be stored in ``base``; ``strict=False`` merges
            the share of a folder holding part of a model (``"b 0-12"``) and skips other layers.

    Example::

        merge_adapter("qwen-sep", "my-adapter", "qwen-merged-sep", hf_out="qwen-merged-hf")
        part = load_part("qwen-merged-sep", "f")      # == the LoRA-wrapped model, no adapter needed
    """
    source = sw.SepWeights(base)
    cfg, weights = read_adapter(adapter)
    plan = _plan(source, weights, Path(adapter), strict)
    outs = [Path(out)] + ([Path(hf_out)] if hf_out is not None else [])
    for o in outs:
        if o.resolve() == source.root.resolve():
            raise LoraError(f"{o}: the merged model must go into a new folder, not into the source folder")
        if o.exists() and any(o.iterdir()) and not overwrite:
            raise LoraError(f"{o}: folder is not empty; choose a new folder or pass overwrite=True")
    if len(set(outs)) != len(outs):
        raise LoraError(f"out and hf_out are the same folder {outs[0]}; give two folders")
    has_begin, layers, has_end = source.manifest.parts()
    parts: list[Part] = (["begin"] if has_begin else []) + list(layers) + (["end"] if has_end else [])
    if hf_out is not None and not (has_begin and has_end and layers == list(range(source.num_layers))):
        raise LoraError(f"hf_out needs the whole model, but {source.root} holds only {str(source.spec)!r}")

    writer = sw.SepweightWriter(out, source.config, source={"merged_from": str(source.root), "adapter": str(adapter)})
    hf_dir = Path(hf_out) if hf_out is not None else None
    weight_map: dict[str, str] = {}
    total = 0
    if hf_dir is not None:
        hf_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n, part in enumerate(parts):
            tensors = _part_tensors(source, part)
            for key, module in plan.get(part, {}).items():
                A, B = weights[module]
                tensors[key] = merged_weight(tensors[key], A, B, cfg.scaling, f"{source.path(part).name}:{key}")
            writer.write(part, tensors)
            if hf_dir is not None:
                shard = f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors"
                names = _hf_state_dict(part, tensors)  # the same tensors under transformers' names
                sw.save_safetensors(hf_dir / shard, names, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, shard))
                total += sum(t.numel() * t.element_size() for t in names.values())
                del names
            del tensors  # drop this part's mappings and merged tensors before the next part
        for name in source.manifest.extra_files:
            writer.copy_extra(source.root / name)
            if hf_dir is not None:
                sw.atomic_write_bytes(hf_dir / name, (source.root / name).read_bytes())
    except BaseException:
        del writer  # releases its folder lock now (the traceback keeps this frame alive); no manifest was written
        raise
    writer.finish()
    if hf_dir is not None:
        if "config.json" not in source.manifest.extra_files:
            sw.atomic_write_bytes(hf_dir / "config.json", (json.dumps(source.config, indent=2) + "\n").encode())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        sw.atomic_write_bytes(hf_dir / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    return Path(out)


def _hf_state_dict(part: Part, tensors: Tensors) -> Tensors:
    if part == "begin":
        return sw.PartWeights(begin=tensors).hf_state_dict()
    if part == "end":
        return sw.PartWeights(end=tensors).hf_state_dict()
    return sw.PartWeights(layers={int(part): tensors}).hf_state_dict()
