"""manifest.json: what a sepweight folder holds, written last so its presence means "complete".

Layout of a folder (format version 1; version 2 adds quantized linears, see QUANT_FORMAT.md)::

    manifest.json          this file
    config.json, tokenizer files ... copied unchanged
    begin.safetensors      embed_tokens.weight
    mid.00000.safetensors  layer 0, keys relative to the layer (self_attn.q_proj.weight, ...)
    ...
    end.safetensors        norm.weight (+ lm_head.weight unless the head is tied)

A tied head is served from begin.safetensors' ``embed_tokens.weight``, so a folder with the end part
of a tied model always has the begin file too (:meth:`llm_sepweight.PartSpec.stored_parts`).

A quantized folder (version 2) stores a linear ``P`` as ``P.qweight`` + ``P.scales`` (int8) or
``P.scales_and_zeros`` (int4) instead of ``P.weight``; the top-level ``quant`` says how the folder
was quantized and the ``P.qweight`` entry of ``files[...].tensors`` carries a per-tensor ``quant``
entry (:class:`llm_sepweight.QuantSpec`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import SepweightError

FORMAT_NAME = "llm_sepweight"
FORMAT_VERSION = 2  # the newest version this llm_sepweight reads; unquantized folders are written as 1
PLAIN_VERSION = 1
MANIFEST = "manifest.json"

Part = str | int  # "begin", "end" or a layer index


def part_filename(part: Part) -> str:
    if part == "begin":
        return "begin.safetensors"
    if part == "end":
        return "end.safetensors"
    if isinstance(part, int) and part >= 0:
        return f"mid.{part:05d}.safetensors"
    raise SepweightError(f"part must be 'begin', 'end' or a layer index >= 0, got {part!r}")


@dataclass
class FileEntry:
    part: Part
    size: int
    sha256: str
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype": "BF16", "shape": [..]} (+ "quant" on a P.qweight)


@dataclass
class Manifest:
    architecture: str
    num_layers: int
    dtype: str  # torch name of the floating dtype ("bfloat16"), or "mixed"
    tie_word_embeddings: bool
    config: dict[str, Any]
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"size", "sha256"}
    source: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, Any] | None = None  # {"scheme", "group_size", "scale_dtype", "method", "quantize_head"}
    format: str = FORMAT_NAME
    format_version: int = PLAIN_VERSION

    def to_json(self) -> str:
        raw = asdict(self)
        head = {"format": raw.pop("format"), "format_version": raw.pop("format_version")}
        return json.dumps({**head, **raw}, indent=1) + "\n"

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.is_file():
            hint = (
                "a conversion into it was interrupted; re-run the same convert command to resume"
                if any(root.glob("*.safetensors")) or (root / ".sepweight-journal.json").exists()
                else "convert a checkpoint with `llm-sepweight convert SRC DST` or llm_sepweight.convert()"
            )
            raise SepweightError(f"{root}: no {MANIFEST}, so this is not a complete sepweight folder ({hint})")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_NAME:
                raise SepweightError(f"{path}: 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
            version = raw.get("format_version")
            if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
                raise SepweightError(
                    f"{path}: format_version {version!r} is newer than this llm_sepweight understands "
                    f"({FORMAT_VERSION}); upgrade llm_sepweight"
                )
            files = {name: FileEntry(**entry) for name, entry in raw.pop("files").items()}
            return cls(files=files, **raw)
        except SepweightError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SepweightError(
                f"{path}: malformed manifest ({type(e).__name__}: {e}); re-run the conversion"
            ) from None

    def parts(self) -> tuple[bool, list[int], bool]:
        """(has begin, stored layer indices, has end)."""
        layers = sorted(e.part for e in self.files.values() if isinstance(e.part, int))
        kinds = {e.part for e in self.files.values()}
        return "begin" in kinds, layers, "end" in kinds


def read_if_complete(root: Path) -> Manifest | None:
    """The folder's manifest when it is readable and every file it lists is there at its recorded size.

    Cheap (one ``stat`` per file, nothing hashed or mapped): how a finished conversion is recognised
    without touching the weights. None when anything is missing, so the caller converts (and
    :func:`llm_sepweight.verify` is the deep check).
    """
    if not (root / MANIFEST).is_file():
        return None
    try:
        manifest = Manifest.read(root)
    except SepweightError:
        return None
    sizes = {name: e.size for name, e in manifest.files.items()}
    sizes.update({name: e.get("size") for name, e in manifest.extra_files.items()})
    for name, size in sizes.items():
        try:
            if (root / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest
