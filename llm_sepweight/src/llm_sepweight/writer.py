"""Write a sepweight folder part by part, atomically and resumably."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from .atomic import atomic_write, atomic_write_bytes
from .checkpoint import TEMPLATE_DIR, is_extra_name
from .errors import SepweightError
from .folder_lock import FolderLock, finished_conversion
from .manifest import FORMAT_VERSION, MANIFEST, PLAIN_VERSION, FileEntry, Manifest, Part, part_filename
from .quant import QuantSpec
from .safetensors_io import TensorSpec, read_header, sha256_file, write_file

JOURNAL = ".sepweight-journal.json"


class SepweightWriter:
    """Writes parts into `root`; :meth:`finish` writes manifest.json, which marks the folder complete.

    Every file is written atomically (temp + rename). Progress is journaled after each file, so a run
    killed at any point and started again with the same ``resume_key`` skips every file whose checksum
    still matches and rewrites the rest. ``part_keys`` (file name -> a key of what makes its bytes) also
    keeps, checksum permitting, a file a run of another resume key wrote with the same part key (more
    layers converted into a folder keep the ones it has). While writing, the folder has no manifest and
    loaders refuse it.
    One writer per folder (folder_lock.py): another process's raises :class:`FolderBusy`, a second one
    in the same thread a :class:`SepweightError`. Used as a context manager, the lock is released on
    leaving the block (:meth:`close`) even when the folder is left unfinished.

    Example::

        w = SepweightWriter("out", config)
        w.write("begin", {"embed_tokens.weight": emb})
        for i, layer in enumerate(layers):
            w.write(i, layer)                      # keys relative to the layer
        w.write("end", {"norm.weight": norm, "lm_head.weight": head})
        w.finish()
    """

    def __init__(
        self,
        root: str | Path,
        config: Mapping[str, Any],
        *,
        resume_key: str | None = None,
        source: Mapping[str, Any] | None = None,
        fsync: bool = True,
        quant: Mapping[str, Any] | None = None,
        part_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = dict(config)
        self.resume_key = resume_key
        self.source = dict(source or {})
        self.quant = dict(quant) if quant is not None else None  # the manifest's top-level "quant"
        self.part_keys = dict(part_keys or {})  # file name -> what makes its bytes (source files and options)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FolderLock(self.root)
        try:
            # left by a killed writer; never part of the folder
            for stale in [*self.root.glob(".*.tmp-*"), *self.root.glob(f"{TEMPLATE_DIR}/.*.tmp-*")]:
                stale.unlink(missing_ok=True)
            self.files: dict[str, FileEntry] = {}
            self.extra_files: dict[str, dict[str, Any]] = {}
            self._previous = self._recover()
            # the folder is incomplete until finish(); but a finished conversion with this same key keeps
            # its manifest (readers may be loading it: claim_folder hands it back without writing)
            if resume_key is None or finished_conversion(self.root, resume_key) is None:
                (self.root / MANIFEST).unlink(missing_ok=True)
                self._save_journal()
        except BaseException:
            self.close()  # a writer that failed to start holds nothing
            raise

    # ------------------------------------------------------------------------------------ resume
    def _recover(self) -> dict[str, dict[str, Any]]:
        """Entries of files a previous run with the same resume_key completed, else those a run of another
        resume key wrote with the same part key (``part_keys``: the same source bytes and options)."""
        if self.resume_key is None and not self.part_keys:
            return {}
        found: list[tuple[Any, dict[str, Any], Any]] = []  # (resume key, entries by file name, part keys)
        journal = self.root / JOURNAL
        if journal.is_file():
            try:
                raw = json.loads(journal.read_text())
                entries = {**raw.get("files", {}), **raw.get("extra_files", {})}
                found.append((raw.get("resume_key"), entries, raw.get("part_keys")))
            except (json.JSONDecodeError, AttributeError):
                pass  # a journal is only a hint; an unreadable one means "start over"
        if (self.root / MANIFEST).is_file():
            try:
                m = Manifest.read(self.root)
                entries = {**{k: v.__dict__ for k, v in m.files.items()}, **m.extra_files}
                found.append((m.source.get("resume_key"), entries, m.source.get("part_keys")))
            except SepweightError:
                pass
        reusable: dict[str, dict[str, Any]] = {}
        for key, entries, part_keys in found:
            if self.resume_key is not None and key == self.resume_key:
                return entries
            if isinstance(part_keys, dict):
                for name, entry in entries.items():
                    if name in self.part_keys and part_keys.get(name) == self.part_keys[name]:
                        reusable.setdefault(name, entry)
        return reusable

    def _still_valid(self, name: str) -> dict[str, Any] | None:
        entry = self._previous.get(name)
        path = self.root / name
        if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
            return None
        return entry if sha256_file(path) == entry["sha256"] else None

    def _written_part_keys(self) -> dict[str, str]:
        return {name: self.part_keys[name] for name in self.files if name in self.part_keys}

    def done(self, part: Part) -> bool:
        """True (and the file is adopted) when a previous run already wrote this part intact."""
        name = part_filename(part)
        entry = self._still_valid(name)
        if entry is None:
            return False
        self.files[name] = FileEntry(part, entry["size"], entry["sha256"], entry["tensors"])
        self._save_journal()
        return True

    def _save_journal(self) -> None:
        data = {
            "resume_key": self.resume_key,
            "files": {k: v.__dict__ for k, v in self.files.items()},
            "extra_files": self.extra_files,
            "part_keys": self._written_part_keys(),
        }
        atomic_write_bytes(self.root / JOURNAL, json.dumps(data).encode(), fsync=self.fsync)

    # ------------------------------------------------------------------------------------ writing
    def write(
        self,
        part: Part,
        tensors: Mapping[str, torch.Tensor] | Iterable[TensorSpec],
        dtype: torch.dtype | None = None,
        quant: Mapping[str, QuantSpec] | None = None,
    ) -> FileEntry:
        """Write one part file. `dtype` converts floating tensors (integers are kept as they are).

        ``quant`` maps each ``P.qweight`` key of a quantized linear to its :class:`QuantSpec`, recorded
        in the manifest (QUANT_FORMAT.md).
        """
        entry = write_part_file(self.root, part, tensors, dtype, fsync=self.fsync)
        set_quant_entries(entry, quant or {}, self.root / part_filename(part))
        self.files[part_filename(part)] = entry
        self._save_journal()
        return entry

    def copy_extra(self, path: Path, name: str | None = None) -> None:
        """Copy a file (config, tokenizer, ...) unchanged into the folder, as ``name`` (default: its own)."""
        name = path.name if name is None else name
        if not is_extra_name(name):  # a manifest is input too: never write outside the folder
            raise SepweightError(f"{path}: {name!r} is not a config, tokenizer or chat template file name")
        entry = self._still_valid(name)
        if entry is None:
            (self.root / name).parent.mkdir(exist_ok=True)
            with atomic_write(self.root / name, fsync=self.fsync) as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f, 16 * 1024 * 1024)
            entry = {"size": (self.root / name).stat().st_size, "sha256": sha256_file(self.root / name)}
        self.extra_files[name] = entry
        self._save_journal()

    def finish(self) -> Manifest:
        """Write manifest.json (atomically); from now on loaders accept the folder."""
        if "config.json" not in self.extra_files:
            data = (json.dumps(self.config, indent=2) + "\n").encode()
            atomic_write_bytes(self.root / "config.json", data, fsync=self.fsync)
            self.extra_files["config.json"] = {"size": len(data), "sha256": sha256_file(self.root / "config.json")}
        n = self.config.get("num_hidden_layers")
        if not isinstance(n, int):
            raise SepweightError("config needs an integer 'num_hidden_layers'")
        archs = self.config.get("architectures") or ["unknown"]
        manifest = Manifest(
            architecture=str(archs[0]),
            num_layers=n,
            dtype=_manifest_dtype(self.files.values()),
            tie_word_embeddings=bool(self.config.get("tie_word_embeddings", False)),
            config=self.config,
            files=dict(sorted(self.files.items(), key=lambda kv: _order(kv[1].part))),
            extra_files=self.extra_files,
            source={
                **self.source,
                "resume_key": self.resume_key,
                **({"part_keys": keys} if (keys := self._written_part_keys()) else {}),
            },
            quant=self.quant,
            format_version=FORMAT_VERSION if self.quant or _any_quantized(self.files.values()) else PLAIN_VERSION,
        )
        atomic_write_bytes(self.root / MANIFEST, manifest.to_json().encode(), fsync=self.fsync)
        (self.root / JOURNAL).unlink(missing_ok=True)
        self.close()
        return manifest

    def close(self) -> None:
        """Release the folder's lock without finishing: the folder stays incomplete, a later run resumes it."""
        self._lock.release()

    def __enter__(self) -> SepweightWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_part_file(
    root: Path,
    part: Part,
    tensors: Mapping[str, torch.Tensor] | Iterable[TensorSpec],
    dtype: torch.dtype | None = None,
    *,
    fsync: bool = True,
) -> FileEntry:
    """Write one part file atomically and return its manifest entry."""
    name = part_filename(part)
    if isinstance(tensors, Mapping):
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise SepweightError(f"part {part!r}: value for {bad[0]!r} is not a torch.Tensor")
        specs = [TensorSpec(k, v, _target_dtype(v.dtype, dtype)) for k, v in tensors.items()]
    else:
        specs = list(tensors)
    with atomic_write(root / name, fsync=fsync) as f:
        sha, infos = write_file(f, specs, metadata={"format": "pt"})
    size = (root / name).stat().st_size
    tensors_meta = {k: {"dtype": i.dtype, "shape": list(i.shape)} for k, i in infos.items()}
    return FileEntry(part, size, sha, tensors_meta)


def save_part(
    root: str | Path,
    part: Part,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    *,
    fsync: bool = True,
) -> FileEntry:
    """Write (or replace) one part of an existing, complete sepweight folder and update manifest.json.

    Keys are relative to the part, as stored (``self_attn.q_proj.weight`` for a layer). When the
    part already exists the new tensors must have the same names and shapes. To write a whole new
    folder (e.g. merged LoRA weights) use :class:`SepweightWriter`.

    Example::

        layer = load("qwen-sep", "3").layers[3]
        layer = {k: v.clone() for k, v in layer.items()}
        layer["mlp.down_proj.weight"] += delta
        save_part("qwen-sep", 3, layer)
    """
    root = Path(root)
    manifest = Manifest.read(root)
    name = part_filename(part)
    if isinstance(part, int) and part >= manifest.num_layers:
        raise SepweightError(f"{root}: layer {part} is outside the model's layers 0..{manifest.num_layers - 1}")
    old = manifest.files.get(name)
    quant: dict[str, QuantSpec] = {}
    if old is not None:
        got = {k: list(v.shape) for k, v in tensors.items()}
        want = {k: v["shape"] for k, v in old.tensors.items()}
        if got != want:
            raise SepweightError(
                f"{root / name}: new tensors {got} do not match the stored names/shapes {want}; "
                "a part keeps its layout (write a new folder with SepweightWriter to change it)"
            )
        quant = {
            k: QuantSpec.from_json(v["quant"], f"{root / name}: {k}") for k, v in old.tensors.items() if "quant" in v
        }
    entry = write_part_file(root, part, tensors, dtype, fsync=fsync)
    set_quant_entries(entry, quant, root / name)
    manifest.files[name] = entry
    manifest.files = dict(sorted(manifest.files.items(), key=lambda kv: _order(kv[1].part)))
    manifest.dtype = _manifest_dtype(manifest.files.values())
    atomic_write_bytes(root / MANIFEST, manifest.to_json().encode(), fsync=fsync)
    return entry


def _target_dtype(src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and src.is_floating_point else src


def _order(part: Part) -> tuple[int, int]:
    return (0, 0) if part == "begin" else (2, 0) if part == "end" else (1, int(part))


def set_quant_entries(entry: FileEntry, quant: Mapping[str, QuantSpec], path: Path) -> None:
    """Record each quantized linear's QuantSpec on its ``P.qweight`` tensor entry (QUANT_FORMAT.md)."""
    for key, spec in quant.items():
        if not key.endswith(".qweight") or key not in entry.tensors:
            raise SepweightError(f"{path}: quant entry for {key!r}, which is not a stored '*.qweight' tensor")
        entry.tensors[key]["quant"] = spec.to_json()


def _any_quantized(entries: Iterable[FileEntry]) -> bool:
    return any("quant" in t for e in entries for t in e.tensors.values())


def _manifest_dtype(entries: Iterable[FileEntry]) -> str:
    """The compute dtype: of every floating tensor except the scales of quantized linears."""
    from .safetensors_io import DTYPES

    found = set()
    for e in entries:
        quantized = tuple(k.removesuffix("qweight") for k, t in e.tensors.items() if "quant" in t)  # "P."
        for k, t in e.tensors.items():
            if DTYPES[t["dtype"]].is_floating_point and not any(k.startswith(p) for p in quantized):
                found.add(str(DTYPES[t["dtype"]]).removeprefix("torch."))
    return found.pop() if len(found) == 1 else "mixed" if found else "none"


def check_file_matches(path: Path, entry: FileEntry) -> None:
    """Cheap structural check of a part file against its manifest entry (no hashing)."""
    header = read_header(path)
    got = {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in header.tensors.items()}
    want = {k: {"dtype": t["dtype"], "shape": t["shape"]} for k, t in entry.tensors.items()}
    if got != want:
        missing = sorted(set(entry.tensors) - set(got))
        extra = sorted(set(got) - set(entry.tensors))
        changed = sorted(k for k in set(got) & set(entry.tensors) if got[k] != want[k])
        raise SepweightError(
            f"{path}: tensors do not match manifest.json (missing {missing}, unexpected {extra}, "
            f"different dtype/shape {changed}); run `llm-sepweight verify {path.parent}` and re-convert"
        )
