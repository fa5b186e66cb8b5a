"""Load any part of a sepweight folder, memory-mapped by default."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .errors import SepweightError
from .hugepages import HUGE, drop_cached
from .manifest import MANIFEST, Manifest, Part, part_filename
from .mapping import FileMapping
from .quant import QuantSpec
from .safetensors_io import (
    DTYPES,
    READ_SLACK,
    Header,
    gather_rows,
    map_unpopulated,
    open_rows,
    open_tensors,
    read_header,
    read_into,
    row_span,
)
from .spec import PartSpec
from .writer import check_file_matches

Tensors = dict[str, torch.Tensor]


@dataclass
class PartWeights:
    """The tensors of one part-model, keys relative to their part (as stored)."""

    begin: Tensors | None = None
    layers: dict[int, Tensors] = field(default_factory=dict)
    end: Tensors | None = None

    def hf_state_dict(self) -> Tensors:
        """The same tensors under transformers' names (``model.layers.3.mlp.up_proj.weight``, ...).

        A quantized folder keeps its stored keys: ``model.layers.3.mlp.up_proj.qweight`` and
        ``...up_proj.scales_and_zeros`` (or ``...scales``); see :func:`llm_sepweight.dequantize`.
        """
        out: Tensors = {}
        if self.begin is not None:
            out.update({f"model.{k}": v for k, v in self.begin.items()})
        for i, layer in self.layers.items():
            out.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
        if self.end is not None:
            out.update({k if k.startswith("lm_head.") else f"model.{k}": v for k, v in self.end.items()})
        return out


class _Stamp(NamedTuple):
    """What one ``os.stat`` tells of a file's bytes (no read): which file, its size, its mtime."""

    dev: int
    inode: int  # a re-conversion renames a new file over the old one
    size: int
    mtime_ns: int  # a rewrite in place (same inode, same size)


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _change(was: _Stamp, now: _Stamp | None) -> str:
    """How a file changed (``was != now``), in words."""
    if now is None:
        return "removed"
    if (now.dev, now.inode) != (was.dev, was.inode):
        return "replaced by another file"
    if now.size != was.size:
        return f"now {now.size} bytes, was {was.size}"
    return "modified in place"


class SepWeights:
    """A sepweight folder: validated manifest plus per-part accessors for lazy consumers.

    Every part file is recorded (inode, size, mtime) when the folder is opened and checked again
    before and after each read or mapping: a file changed since (the folder re-converted, a file
    overwritten, truncated or removed) is a :class:`SepweightError` naming it, never wrong tensors.

    Example::

        sw = SepWeights("qwen-sep")
        layer3 = sw.layer(3)            # {"self_attn.q_proj.weight": <mmapped tensor>, ...}
        head = sw.end()["lm_head.weight"]  # the embedding when the head is tied
    """

    READ_SLACK = READ_SLACK  # spare buffer bytes for read_into(drop_cache=True) to read with O_DIRECT

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SepweightError(f"{self.root}: not a directory")
        self.manifest = Manifest.read(self.root)
        # the files the manifest describes, as they were when opened: (path, stamp) by name
        self._stamps: dict[str, tuple[str, _Stamp]] = {}
        for name, entry in self.manifest.files.items():
            path = self.root / name
            stamp = _stamp(str(path))
            if stamp is None or not path.is_file():
                raise SepweightError(
                    f"{path}: listed in manifest.json ({_describe(entry.part)}) but missing; "
                    "re-run the conversion into this folder to restore it"
                )
            if stamp.size != entry.size:
                raise SepweightError(
                    f"{path}: {stamp.size} bytes, manifest.json says {entry.size}; the file is truncated "
                    "or was replaced: run `llm-sepweight verify` and re-convert"
                )
            self._stamps[name] = (str(path), stamp)
        self._by_part: dict[Part, str] = {e.part: n for n, e in self.manifest.files.items()}
        self._headers: dict[str, Header] = {}  # parsed once: lazy consumers re-open files every step
        self._linears: dict[Part, dict[str, QuantSpec]] = {}

    def _header(self, name: str) -> Header:
        if name not in self._headers:
            path = self.root / name
            check_file_matches(path, self.manifest.files[name])
            self._headers[name] = read_header(path)
        return self._headers[name]

    def _unchanged(self, name: str) -> str:
        """The file's path, after checking it is still the file this folder was opened with (one stat)."""
        path, was = self._stamps[name]
        now = _stamp(path)
        if now != was:
            raise SepweightError(
                f"{path}: changed on disk while in use ({_change(was, now)}); the folder was re-converted, "
                "overwritten or truncated after it was opened, and its cached headers no longer describe its "
                "bytes: reload the model (a new SepWeights / load_part) to use the new files"
            )
        return path

    @contextmanager
    def _open(self, name: str) -> Iterator[tuple[str, Header]]:
        """(path, header) of a part file for one read or mapping, checked unchanged before and after it.

        Before: the header's offsets hold for the file being opened (so a truncated file is never
        mapped: touching pages past its end is a SIGBUS). After: it was not replaced or rewritten
        while being read; a read that failed on a file changed meanwhile is reported as that change.
        """
        path = self._unchanged(name)
        try:
            yield path, self._header(name)
        except (SepweightError, OSError, RuntimeError):
            self._unchanged(name)
            raise
        self._unchanged(name)

    def check_unchanged(self, part: Part, key: str | None = None) -> None:
        """Raise :class:`SepweightError` if the file of `part` (of its tensor `key`, for the tied head)
        changed on disk since this folder was opened.

        For consumers holding tensors read or mapped earlier (a prefetched layer): a mapping of a file
        truncated since then must not be touched. Reads through this object check by themselves.

        Example::

            weights.check_unchanged(3)   # mid.00003.safetensors is still the file that was opened
        """
        self._unchanged(self._resolve(part, key)[0] if key is not None else self._name(part))

    def _name(self, part: Part) -> str:
        name = self._by_part.get(part)
        if name is None:
            raise SepweightError(
                f"{self.root}: {_describe(part)} is not stored here (this folder holds {str(self.spec)!r}); "
                "convert again with parts that include it"
            )
        return name

    def _resolve(self, part: Part, key: str) -> tuple[str, str]:
        """(file name, key) holding a tensor; the tied head lives in the begin file as the embedding."""
        if part == "end" and key == "lm_head.weight" and self.tied:
            part, key = "begin", "embed_tokens.weight"
        name = self._name(part)
        if key not in self.manifest.files[name].tensors:
            raise SepweightError(
                f"{self.root / name}: no tensor {key!r} (has {sorted(self.manifest.files[name].tensors)})"
            )
        return name, key

    def rows(self, part: Part, key: str, start: int, stop: int, prefault: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor, mapping only those bytes (CPU, stored dtype).

        For streaming a large matrix in pieces: a vocabulary chunk of the head, a few embedding rows.
        ``rows("end", "lm_head.weight", ...)`` reads the embedding when the head is tied.
        ``prefault`` maps every page now and makes the view read-only.

        Example::

            chunk = SepWeights("qwen-sep").rows("end", "lm_head.weight", 0, 16384)  # (16384, hidden)
        """
        name, key = self._resolve(part, key)
        with self._open(name) as (path, header):
            return open_rows(path, header, key, start, stop, prefault)

    def mapping(self, part: Part, rows: tuple[str, int, int] | None = None) -> FileMapping:
        """A long-lived read-only mapping of a part's file (or of ``rows=(key, start, stop)`` of one
        tensor, under `key`, also for the tied head) with nothing mapped into RSS yet.

        For streaming the same weights every step without a mapping per use: ``populate()`` before
        each use (checks the file is unchanged, maps every page), ``release()`` after it (RSS falls
        back). See :class:`llm_sepweight.FileMapping`.

        Example::

            head = SepWeights("qwen-sep").mapping("end", ("lm_head.weight", 0, 16384))
            head.populate(); logits = h @ head.tensors["lm_head.weight"].T; head.release()
        """
        if rows is None:
            name, stored = self._name(part), None
        else:
            name, key = self._resolve(part, rows[0])
            stored = (key, rows[1], rows[2])
        with self._open(name) as (path, header):
            mm, base, tensors = map_unpopulated(path, header, stored)
        if rows is not None and stored is not None:
            tensors = {rows[0]: tensors[stored[0]]}  # under the requested key, also for the tied head
        return FileMapping(mm, base, tensors, path, lambda: self._unchanged(name))

    def gather_rows(self, part: Part, key: str, index: torch.Tensor) -> torch.Tensor:
        """``tensor[index]`` (rows along dim 0, any index shape) read with ``pread``; nothing is mapped.

        For embedding lookups in streaming runners: RSS grows by the rows returned, nothing else.

        Example::

            h = SepWeights("qwen-sep").gather_rows("begin", "embed_tokens.weight", ids)  # (B, T, hidden)
        """
        name, key = self._resolve(part, key)
        with self._open(name) as (path, header):
            return gather_rows(path, header, key, index)

    def read_into(
        self,
        part: Part,
        buffer: torch.Tensor,
        rows: tuple[str, int, int] | None = None,
        *,
        threads: int = 1,
        drop_cache: bool = False,
        direct: bool | None = None,
    ) -> Tensors:
        """Read a part's tensors (or ``rows=(key, start, stop)`` of one) into a reusable uint8 buffer.

        For streaming without mapping churn: a lazy runner keeps a few (pinned, for CUDA) buffers and
        reads each layer into a free one; the returned tensors are views of the buffer. ``threads``
        concurrent readers. ``drop_cache`` (for models bigger than RAM): the page cache never grows;
        with :attr:`READ_SLACK` spare bytes in the buffer the read bypasses it (``O_DIRECT``, no copy)
        and the views start a few KiB into the buffer; else each piece read is evicted right after.
        ``direct=False`` reads through the page cache with readahead instead (each piece evicted after
        it is read): faster than ``O_DIRECT`` on some disks (:func:`llm_sepweight.safetensors_io.read_into`).

        Example::

            weights = SepWeights("qwen-sep")
            buf = torch.empty(weights.nbytes(3), dtype=torch.uint8)
            layer = weights.read_into(3, buf)
        """
        how = {"threads": threads, "drop_cache": drop_cache, "direct": direct}
        if rows is None:
            with self._open(self._name(part)) as (path, header):
                return read_into(path, header, buffer, **how)
        name, key = self._resolve(part, rows[0])
        with self._open(name) as (path, header):
            (tensor,) = read_into(path, header, buffer, (key, rows[1], rows[2]), **how).values()
        return {rows[0]: tensor}  # under the requested key, also for the tied head

    def nbytes(self, part: Part, rows: tuple[str, int, int] | None = None) -> int:
        """Bytes :meth:`read_into` needs for a part (or for rows of one tensor)."""
        if rows is None:
            return sum(
                math.prod(t["shape"]) * DTYPES[t["dtype"]].itemsize
                for t in self.manifest.files[self._name(part)].tensors.values()
            )
        name, key = self._resolve(part, rows[0])
        info = self.manifest.files[name].tensors[key]
        return (rows[2] - rows[1]) * math.prod(info["shape"][1:]) * DTYPES[info["dtype"]].itemsize

    def shape(self, part: Part, key: str) -> tuple[int, ...]:
        """Shape of a stored tensor without mapping it (the tied head reports the embedding's)."""
        name, key = self._resolve(part, key)
        return tuple(self.manifest.files[name].tensors[key]["shape"])

    @property
    def quant(self) -> dict[str, Any] | None:
        """The manifest's top-level ``quant`` (``{"scheme": "int4", "group_size": 64, ...}``), None if unquantized."""
        return self.manifest.quant

    def linears(self, part: Part) -> dict[str, QuantSpec]:
        """The quantized linears of a part: ``{"self_attn.q_proj": QuantSpec(...), ...}`` ({} if none).

        Each ``P`` is stored as ``P.qweight`` + ``P.scales`` (int8) or ``P.scales_and_zeros`` (int4),
        keys relative to the part, as :meth:`layer` returns them (QUANT_FORMAT.md).

        Example::

            spec = SepWeights("qwen-int4").linears(0)["mlp.down_proj"]
            spec.scheme, spec.shape, spec.group_size, spec.layout   # "int4", (896, 4864), 64, "aten_cpu_avx2"
        """
        if part not in self._linears:
            name = self._name(part)
            self._linears[part] = {
                key.removesuffix(".qweight"): QuantSpec.from_json(t["quant"], f"{self.root / MANIFEST} ({name}: {key})")
                for key, t in self.manifest.files[name].tensors.items()
                if "quant" in t
            }
        return self._linears[part]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def tied(self) -> bool:
        return self.manifest.tie_word_embeddings

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(torch, self.manifest.dtype, None)

    @property
    def spec(self) -> PartSpec:
        """What this folder stores, as a spec."""
        begin, layers, end = self.manifest.parts()
        return PartSpec(begin=begin, end=end, layers=tuple(layers))

    def path(self, part: Part) -> Path:
        return self.root / part_filename(part)

    def drop_cached(self, part: Part, rows: tuple[str, int, int] | None = None) -> None:
        """Evict a part's file (or the 2 MiB blocks holding ``rows=(key, start, stop)``) from the page cache.

        The next ``prefault=True`` mapping reads it back as 2 MiB pages where the kernel allows,
        which makes mapping it per token ~10x cheaper (see :mod:`llm_sepweight.hugepages`). Only
        clean pages nobody maps are dropped: the cost is one re-read, never data.
        """
        if rows is None:
            drop_cached(self._unchanged(self._name(part)))
            return
        name, key = self._resolve(part, rows[0])
        with self._open(name) as (path, header):
            begin, nbytes = row_span(path, header, key, rows[1], rows[2])
            end = begin + nbytes
            # widened to whole 2 MiB blocks: a large folio that straddles the range is not dropped,
            # and the blocks at the edges would stay in small pages for good
            begin, end = begin // HUGE * HUGE, -(-end // HUGE) * HUGE
            drop_cached(path, begin, end - begin)

    def _read(
        self, part: Part, device: str | torch.device, dtype: torch.dtype | None, mmap: bool, prefault: bool = False
    ) -> Tensors:
        with self._open(self._name(part)) as (path, header):
            tensors = open_tensors(path, use_mmap=mmap, header=header, prefault=prefault)
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors

    def begin(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, mmap: bool = True) -> Tensors:
        return self._read("begin", device, dtype, mmap)

    def layer(
        self,
        i: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        mmap: bool = True,
        prefault: bool = False,
    ) -> Tensors:
        """Layer i's tensors. ``prefault=True``: every page mapped now, and the views are read-only."""
        if not isinstance(i, int) or not 0 <= i < self.num_layers:
            raise SepweightError(f"layer index {i!r} is outside the model's layers 0..{self.num_layers - 1}")
        return self._read(i, device, dtype, mmap, prefault)

    def end(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, mmap: bool = True) -> Tensors:
        """norm.weight and lm_head.weight; a tied head is the begin part's embed_tokens.weight."""
        tensors = self._read("end", device, dtype, mmap)
        if self.tied:
            tensors["lm_head.weight"] = self._read("begin", device, dtype, mmap)["embed_tokens.weight"]
        return tensors

    def load(
        self,
        spec: str | PartSpec,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        mmap: bool = True,
    ) -> PartWeights:
        spec = PartSpec.parse(spec).resolve(self.num_layers)
        out = PartWeights()
        if spec.begin:
            out.begin = self.begin(device, dtype, mmap)
        for i in spec.layers or ():
            out.layers[i] = self.layer(i, device, dtype, mmap)
        if spec.end:
            out.end = self.end(device, dtype, mmap)
            if self.tied and out.begin is not None:  # share one tensor, as transformers does
                out.end["lm_head.weight"] = out.begin["embed_tokens.weight"]
        return out


def load(
    root: str | Path,
    spec: str | PartSpec = "f",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mmap: bool = True,
) -> PartWeights:
    """Load the tensors of a part. With ``mmap`` (CPU, no dtype change) they are zero-copy file views.

    Example::

        w = load("qwen-sep", "b 0-12")
        w.begin["embed_tokens.weight"], w.layers[11]["mlp.down_proj.weight"]
    """
    return SepWeights(root).load(spec, device=device, dtype=dtype, mmap=mmap)


def _describe(part: Part) -> str:
    return f"layer {part}" if isinstance(part, int) else f"the {part} part"
