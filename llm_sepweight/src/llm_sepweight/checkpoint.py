"""Read a Hugging Face checkpoint folder (single/sharded safetensors, legacy .bin) tensor by tensor.

Maps HF names onto the sepweight parts:
``model.embed_tokens.weight`` -> begin ``embed_tokens.weight``;
``model.layers.{i}.<rest>``    -> layer i ``<rest>``;
``model.norm.weight``          -> end ``norm.weight``; ``lm_head.weight`` -> end ``lm_head.weight``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SepweightError
from .safetensors_io import open_tensors, read_header
from .spec import PartSpec

# Architectures whose checkpoints use the model.embed_tokens / model.layers.N / model.norm / lm_head layout.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
REQUIRED_CONFIG_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size")
# Copied as they are when present next to the weights.
EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",  # sentencepiece (Llama / Mistral repos without tokenizer.json); a protobuf, not a pickle
    "chat_template.jinja",
    "chat_template.json",
)
# transformers 5 saves a model's named chat templates (tool_use, rag, ...) here, one NAME.jinja each
TEMPLATE_DIR = "additional_chat_templates"
EXTRA_PATTERNS = (*EXTRA_FILES, f"{TEMPLATE_DIR}/*.jinja")  # what a hub download fetches besides weights


def is_extra_name(name: str) -> bool:
    """A name an extra file may have in a folder: one of EXTRA_FILES or ``additional_chat_templates/NAME.jinja``."""
    folder, _, base = name.rpartition("/")
    return name in EXTRA_FILES or (folder == TEMPLATE_DIR and base.endswith(".jinja") and not base.startswith("."))


# Buffers some old checkpoints carry; transformers recomputes them.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^model\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

Part = str | int  # "begin", "end" or a layer index


def classify(name: str) -> tuple[Part, str] | None:
    """``(part, key relative to the part)`` for an HF tensor name, None for ignorable buffers."""
    if name == "model.embed_tokens.weight":
        return "begin", "embed_tokens.weight"
    if name == "model.norm.weight":
        return "end", "norm.weight"
    if name == "lm_head.weight":
        return "end", "lm_head.weight"
    if _IGNORED.match(name):  # before the layer rule, which would take the per-layer buffers as weights
        return None
    if m := _LAYER.match(name):
        return int(m.group(1)), m.group(2)
    raise SepweightError(
        f"checkpoint tensor {name!r} is not part of the supported layout "
        "(model.embed_tokens / model.layers.N / model.norm / lm_head); is this a "
        f"{' or '.join(SUPPORTED_ARCHITECTURES)} checkpoint?"
    )


def read_config(path: Path) -> dict[str, Any]:
    """Load and validate config.json (required keys, supported architecture)."""
    if not path.is_file():
        raise SepweightError(f"{path}: config.json not found; a checkpoint folder needs the model's config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SepweightError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise SepweightError(
            f"{path}: missing required key(s) {missing}; copy config.json unchanged from the model's repository"
        )
    archs = config["architectures"]
    if not isinstance(archs, list) or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise SepweightError(
            f"{path}: architecture {archs} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    n = config["num_hidden_layers"]
    if not isinstance(n, int) or n < 0:
        raise SepweightError(f"{path}: num_hidden_layers must be a non-negative integer, got {n!r}")
    return config


def is_tied(config: dict[str, Any]) -> bool:
    # Qwen2/Qwen3 configs default to an untied head when the key is absent.
    return bool(config.get("tie_word_embeddings", False))


@dataclass
class Checkpoint:
    """An HF checkpoint folder: its config and where each wanted tensor lives."""

    root: Path
    config: dict[str, Any]
    files: dict[str, list[str]]  # weight file name -> HF tensor names in it
    kind: str  # "safetensors" or "bin"
    sizes: dict[str, tuple[torch.dtype, int]]  # HF name -> (stored dtype, numel), for progress and planning

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        return is_tied(self.config)

    @property
    def architecture(self) -> str:
        return next(a for a in self.config["architectures"] if a in SUPPORTED_ARCHITECTURES)

    def extra_files(self) -> dict[str, Path]:
        """name in the folder -> path, of the config / tokenizer / chat template files present."""
        templates = sorted(f"{TEMPLATE_DIR}/{p.name}" for p in (self.root / TEMPLATE_DIR).glob("*.jinja"))
        return {n: self.root / n for n in (*EXTRA_FILES, *templates) if is_extra_name(n) and (self.root / n).is_file()}

    def plan(self, spec: PartSpec) -> dict[Part, dict[str, tuple[str, str]]]:
        """For each wanted part: relative key -> (weight file, HF name). Checks completeness."""
        spec = spec.resolve(self.num_layers)
        wanted: set[Part] = set(spec.layers or ())
        if spec.begin:
            wanted.add("begin")
        if spec.end:
            wanted.add("end")
        plan: dict[Part, dict[str, tuple[str, str]]] = {p: {} for p in wanted}
        for fname, names in self.files.items():
            for name in names:
                c = classify(name)
                if c is None:
                    continue
                part, rel = c
                if isinstance(part, int) and part >= self.num_layers:
                    raise SepweightError(
                        f"{self.root / fname}: tensor {name!r} is for layer {part}, but config.json says "
                        f"num_hidden_layers={self.num_layers}"
                    )
                if rel == "lm_head.weight" and self.tied:
                    continue  # tied head: served from embed_tokens, never stored twice
                if part in plan:
                    plan[part][rel] = (fname, name)
        self._check_complete(plan)
        return plan

    def _check_complete(self, plan: dict[Part, dict[str, tuple[str, str]]]) -> None:
        where = self.root
        if "begin" in plan and "embed_tokens.weight" not in plan["begin"]:
            raise SepweightError(f"{where}: checkpoint has no 'model.embed_tokens.weight'")
        if "end" in plan:
            if "norm.weight" not in plan["end"]:
                raise SepweightError(f"{where}: checkpoint has no 'model.norm.weight'")
            if not self.tied and "lm_head.weight" not in plan["end"]:
                raise SepweightError(
                    f"{where}: checkpoint has no 'lm_head.weight' but config.json says tie_word_embeddings=false; "
                    "set tie_word_embeddings=true if the head shares the embedding"
                )
        layers = sorted(p for p in plan if isinstance(p, int))
        reference: set[str] | None = None
        for i in layers:
            keys = set(plan[i])
            if not keys:
                raise SepweightError(f"{where}: checkpoint has no tensors for layer {i} ('model.layers.{i}.*')")
            if reference is None:
                reference = keys
            elif keys != reference:
                diff = sorted(reference ^ keys)
                raise SepweightError(
                    f"{where}: layer {i} has a different set of tensors than layer {layers[0]}: {diff}"
                )

    @contextmanager
    def tensors(self, fname: str) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors of one weight file (memory-mapped for safetensors), released on exit."""
        path = self.root / fname
        if self.kind == "safetensors":
            yield open_tensors(path)
        else:
            yield _torch_load(path)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SepweightError(f"{path}: weight file not found")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the pre-zipfile format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; name the file
        raise SepweightError(f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SepweightError(f"{path}: expected a dict of tensors")
    return sd


def open_checkpoint(root: str | Path, spec: PartSpec | None = None) -> Checkpoint:
    """Index a local HF checkpoint folder. Only shards that hold parts of `spec` must be present."""
    root = Path(root)
    if not root.is_dir():
        raise SepweightError(f"{root}: not a directory")
    config = read_config(root / "config.json")
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        if (root / index_name).is_file():
            return _from_index(root, root / index_name, kind, config, spec)
    if (root / "model.safetensors").is_file():
        sizes = _header_sizes(root / "model.safetensors")
        return Checkpoint(root, config, {"model.safetensors": list(sizes)}, "safetensors", sizes)
    if (root / "pytorch_model.bin").is_file():
        sizes = _bin_sizes(root / "pytorch_model.bin")
        return Checkpoint(root, config, {"pytorch_model.bin": list(sizes)}, "bin", sizes)
    raise SepweightError(
        f"{root}: no weights found (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def _from_index(root: Path, index: Path, kind: str, config: dict[str, Any], spec: PartSpec | None) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SepweightError(f"{index}: not a valid index file (needs a 'weight_map' object): {e}") from None
    files: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        files.setdefault(fname, []).append(name)
    ckpt = Checkpoint(root, config, files, kind, {})
    needed = _needed_files(ckpt, spec or PartSpec.full())
    for fname in sorted(needed):
        path = root / fname
        if not path.is_file():
            raise SepweightError(
                f"{path}: shard named in {index.name} is missing; download it again (it holds e.g. {files[fname][0]!r})"
            )
        sizes = _header_sizes(path) if kind == "safetensors" else _bin_sizes(path)
        absent = [n for n in files[fname] if n not in sizes]
        if absent:
            raise SepweightError(f"{path}: {index.name} says it holds {absent[0]!r}, but it does not")
        ckpt.sizes.update(sizes)
    # shards that are not needed are dropped from the plan so nothing reads them
    ckpt.files = {f: n for f, n in files.items() if f in needed}
    return ckpt


def _header_sizes(path: Path) -> dict[str, tuple[torch.dtype, int]]:
    return {k: (t.torch_dtype, math.prod(t.shape)) for k, t in read_header(path).tensors.items()}


def _bin_sizes(path: Path) -> dict[str, tuple[torch.dtype, int]]:
    return {k: (t.dtype, t.numel()) for k, t in _torch_load(path).items()}


def _needed_files(ckpt: Checkpoint, spec: PartSpec) -> set[str]:
    spec = spec.resolve(ckpt.num_layers)
    out = set()
    for fname, names in ckpt.files.items():
        for name in names:
            c = classify(name)
            if c is None:
                continue
            part = c[0]
            if (part == "begin" and spec.begin) or (part == "end" and spec.end) or part in (spec.layers or ()):
                out.add(fname)
                break
    return out
