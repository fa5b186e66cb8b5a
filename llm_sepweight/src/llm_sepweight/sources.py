"""What convert() reads from, part by part: an HF checkpoint folder or an existing sepweight folder.

A source hands out one part at a time as ``{key relative to the part: tensor}``, memory-mapped where
it can, with the keys of an unquantized folder: a quantized linear of a sepweight source reads as
its dequantized ``P.weight`` (fp32, computed when asked for), so a folder can be re-quantized or
de-quantized without the original checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import Checkpoint
from .errors import SepweightError
from .manifest import MANIFEST, Part
from .quant import QuantSpec, dequantize
from .reader import SepWeights
from .safetensors_io import DTYPES
from .spec import PartSpec

Sizes = dict[str, tuple[torch.dtype, int]]  # key -> (dtype as stored unquantized, numel)


class Source(Protocol):
    config: dict[str, Any]

    def extra_files(self) -> dict[str, Path]: ...  # name in the folder -> path
    def sizes(self, part: Part) -> Sizes: ...
    def shape(self, part: Part, key: str) -> tuple[int, ...]: ...
    def tensors(self, part: Part) -> Mapping[str, torch.Tensor]: ...
    def release(self) -> None: ...
    def identity(self) -> dict[str, Any]: ...
    def part_identity(self, part: Part) -> dict[str, Any]: ...


def is_sepweight_folder(path: Path) -> bool:
    """A finished or interrupted sepweight folder (SepWeights explains what is wrong with the latter)."""
    return (path / MANIFEST).is_file() or (path / ".sepweight-journal.json").is_file()


def _stats(root: Path, names: list[str]) -> dict[str, list[int | str]]:
    """(size, mtime, ctime) per file: what makes a resumed conversion 'the same conversion'.

    Every file the conversion reads or copies is stamped (the config too: loaders read its copy in
    manifest.json). The ctime catches a rewrite whose mtime was put back (``cp -p``, ``rsync -t``,
    tar), which no user can set; only ``chmod``/``chown`` change it too, and cost a re-conversion.
    """
    out: dict[str, list[int | str]] = {}
    for name in sorted(set(names)):
        st = (root / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if (root / name).is_symlink():  # a hub snapshot's file: the blob it points to, named by its content hash
            out[name].append(os.path.basename(os.path.realpath(root / name)))
    return out


def _src(root: Path) -> str:
    """The source folder; for a hub snapshot (``.../snapshots/<commit>``) the repo's cache folder: a commit
    that changes no file the conversion reads (a README edit) is the same conversion."""
    root = root.resolve()
    return str(root.parent.parent if root.parent.name == "snapshots" else root)


class HFSource:
    """An HF checkpoint folder (safetensors single/sharded, legacy .bin)."""

    def __init__(self, ckpt: Checkpoint, spec: PartSpec) -> None:
        self.ckpt = ckpt
        self.config = ckpt.config
        self.plan = ckpt.plan(spec)
        self.shards = _ShardCache(ckpt)

    def extra_files(self) -> dict[str, Path]:
        return self.ckpt.extra_files()

    def sizes(self, part: Part) -> Sizes:
        return {rel: self.ckpt.sizes[name] for rel, (_, name) in self.plan[part].items()}

    def shape(self, part: Part, key: str) -> tuple[int, ...]:
        fname, name = self.plan[part][key]  # opens the file: a header for safetensors, a whole shard for .bin
        return tuple(self.shards.get(fname)[name].shape)

    def tensors(self, part: Part) -> dict[str, torch.Tensor]:
        self.shards.keep({fname for fname, _ in self.plan[part].values()})
        return {rel: self.shards.get(fname)[name] for rel, (fname, name) in sorted(self.plan[part].items())}

    def release(self) -> None:
        self.shards.keep(set())

    def identity(self) -> dict[str, Any]:
        names = [*self.ckpt.files, *self.extra_files()]
        return {"src": _src(self.ckpt.root), "files": _stats(self.ckpt.root, names)}

    def part_identity(self, part: Part) -> dict[str, Any]:
        """What one part's bytes come from: the weight files it reads and the config."""
        names = [fname for fname, _ in self.plan[part].values()] + ["config.json"]
        return {"src": _src(self.ckpt.root), "files": _stats(self.ckpt.root, names)}


class SepweightSource:
    """An existing sepweight folder, quantized or not (its quantized linears read back dequantized)."""

    def __init__(self, root: Path, spec: PartSpec) -> None:
        self.sw = SepWeights(root)
        self.config = self.sw.config
        spec = spec.resolve(self.sw.num_layers)
        begin, layers, end = self.sw.manifest.parts()
        stored = set(layers) | ({"begin"} if begin else set()) | ({"end"} if end else set())
        for part in (["begin"] if spec.begin else []) + list(spec.layers or ()) + (["end"] if spec.end else []):
            if part not in stored:
                why = " (a tied head is the embedding: the end part needs it)" if part == "begin" and spec.end else ""
                raise SepweightError(
                    f"{root}: the source folder does not store {_describe(part)}{why} (it holds "
                    f"{str(self.sw.spec)!r}); pass parts= that it holds, or convert it again from the checkpoint"
                )
        dtype = self.sw.dtype  # None when mixed: dequantized linears then come out in fp32
        self.compute_dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    def extra_files(self) -> dict[str, Path]:
        return {name: self.sw.root / name for name in self.sw.manifest.extra_files}

    def sizes(self, part: Part) -> Sizes:
        entry = self.sw.manifest.files[self.sw.path(part).name]
        linears = self.sw.linears(part)
        out: Sizes = {}
        for key, t in entry.tensors.items():
            if not any(key.startswith(p + ".") for p in linears):
                out[key] = (DTYPES[t["dtype"]], math.prod(t["shape"]))
        for prefix, spec in linears.items():
            out[f"{prefix}.weight"] = (self.compute_dtype, math.prod(spec.shape))
        return out

    def shape(self, part: Part, key: str) -> tuple[int, ...]:
        linears = self.sw.linears(part)
        prefix = key.removesuffix(".weight")
        return linears[prefix].shape if prefix in linears else self.sw.shape(part, key)

    def tensors(self, part: Part) -> Mapping[str, torch.Tensor]:
        stored = self.sw.begin() if part == "begin" else self.sw.end() if part == "end" else self.sw.layer(int(part))
        if part == "end" and self.sw.tied:
            stored.pop("lm_head.weight")  # served from the embedding, never stored twice
        return _Dequantizing(stored, self.sw.linears(part))

    def release(self) -> None:
        pass

    def identity(self) -> dict[str, Any]:
        root = self.sw.root
        names = [MANIFEST, *self.sw.manifest.files, *self.sw.manifest.extra_files]
        return {"src": str(root.resolve()), "files": _stats(root, names), "sepweight": True}

    def part_identity(self, part: Part) -> dict[str, Any]:
        root = self.sw.root
        names = [MANIFEST, self.sw.path(part).name] + (["begin.safetensors"] if part == "end" and self.sw.tied else [])
        return {"src": str(root.resolve()), "files": _stats(root, names), "sepweight": True}


class _Dequantizing(Mapping[str, torch.Tensor]):
    """A part's stored tensors with each quantized linear ``P`` replaced by its fp32 ``P.weight``."""

    def __init__(self, stored: dict[str, torch.Tensor], linears: dict[str, QuantSpec]) -> None:
        self.stored, self.linears = stored, linears
        plain = [k for k in stored if not any(k.startswith(p + ".") for p in linears)]
        self.keys_ = sorted(plain + [f"{p}.weight" for p in linears])

    def __getitem__(self, key: str) -> torch.Tensor:
        prefix = key.removesuffix(".weight")
        if prefix in self.linears:
            mine = {k.removeprefix(prefix + "."): v for k, v in self.stored.items() if k.startswith(prefix + ".")}
            return dequantize(mine, self.linears[prefix], torch.float32)
        return self.stored[key]

    def __contains__(self, key: object) -> bool:  # Mapping's default would dequantize to find out
        return key in self.keys_

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


class _ShardCache:
    """Opens the weight files a part reads from.

    safetensors files are re-mapped for every part and unmapped right after it, so the conversion's
    file-backed RSS is one part's source bytes, not the whole checkpoint (re-parsing a header is
    cheap). Legacy .bin files are expensive to open, so the current one stays open until a part
    needs another.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.open: dict[str, dict[str, torch.Tensor]] = {}

    def keep(self, names: set[str]) -> None:
        for name in list(self.open):
            if name not in names or self.ckpt.kind == "safetensors":
                del self.open[name]  # drops the mmap once no tensor refers to it

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.open:
            with self.ckpt.tensors(name) as tensors:
                self.open[name] = tensors
        return self.open[name]


def _describe(part: Part) -> str:
    return f"layer {part}" if isinstance(part, int) else f"the {part} part"
