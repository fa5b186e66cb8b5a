"""verify(): recompute every checksum, compare every header with manifest.json, check quantized linears."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import SepweightError
from .manifest import FORMAT_VERSION, FileEntry, Manifest
from .quant import QuantSpec
from .safetensors_io import DTYPE_NAMES, DTYPES, open_tensors, sha256_file
from .writer import check_file_matches


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"{self.root}: OK ({self.checked_files} files match manifest.json)"
        return f"{self.root}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


def verify(root: str | Path, progress: bool = False) -> VerifyReport:
    """Check sizes, headers and sha256 of every file listed in manifest.json; report every mismatch.

    In a quantized folder, also that each quantized linear has exactly the tensors, dtypes and shapes
    its ``quant`` entry implies (QUANT_FORMAT.md) and finite scales.

    Example::

        report = verify("qwen-sep")
        assert report.ok, str(report)
    """
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = Manifest.read(root)
    except SepweightError as e:
        report.problems.append(str(e))
        return report
    entries = [(n, e.size, e.sha256) for n, e in manifest.files.items()]
    entries += [(n, e["size"], e["sha256"]) for n, e in manifest.extra_files.items()]
    for name, size, sha in tqdm(entries, desc=f"verify {root}", unit="file", disable=not progress):
        path = root / name
        report.checked_files += 1
        if not path.is_file():
            report.problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != size:
            report.problems.append(f"{path}: size {path.stat().st_size}, manifest says {size}")
            continue
        if name in manifest.files:
            try:
                check_file_matches(path, manifest.files[name])
            except SepweightError as e:
                report.problems.append(str(e))
                continue
            report.problems += quant_problems(manifest, root / name, manifest.files[name])
        if sha256_file(path) != sha:
            report.problems.append(f"{path}: sha256 does not match manifest.json (the file changed or is corrupted)")
    return report


def quant_problems(manifest: Manifest, path: Path, entry: FileEntry) -> list[str]:
    """What is wrong with the quantized linears of one part file (its header already matches the manifest)."""
    problems: list[str] = []
    scale_dtype = (manifest.quant or {}).get("scale_dtype")
    specs: dict[str, QuantSpec] = {}
    for key, t in entry.tensors.items():
        if "quant" not in t:
            continue
        if not key.endswith(".qweight"):
            problems.append(f"{path}: {key!r} carries a quant entry; only '*.qweight' tensors may")
            continue
        try:
            specs[key.removesuffix(".qweight")] = QuantSpec.from_json(t["quant"], f"{path}: {key}")
        except SepweightError as e:
            problems.append(str(e))
    if specs and manifest.format_version < FORMAT_VERSION:
        problems.append(
            f"{path}: has quantized linears but manifest.json says format_version {manifest.format_version}"
        )
    stray = sorted(k for k in entry.tensors if k.endswith((".qweight", ".scales", ".scales_and_zeros")))
    stray = [k for k in stray if k.rsplit(".", 1)[0] not in specs]
    if stray:
        problems.append(f"{path}: {stray} look quantized but have no quant entry on their '*.qweight'")
    for prefix, spec in specs.items():
        problems += _linear_problems(path, entry, prefix, spec, scale_dtype)
    if specs and not problems:
        problems += _scale_values(path, entry, specs)
    return problems


def _linear_problems(path: Path, entry: FileEntry, prefix: str, spec: QuantSpec, scale_dtype: str | None) -> list[str]:
    where = f"{path}: {prefix} ({spec.scheme} {list(spec.shape)})"
    mine = {k.removeprefix(prefix + "."): t for k, t in entry.tensors.items() if k.startswith(prefix + ".")}
    expected = set(spec.tensor_shapes()) | ({"bias"} if "bias" in mine else set())
    if set(mine) != expected:
        return [f"{where}: stores {sorted(mine)}, its quant entry implies {sorted(expected)}"]
    problems = []
    for suffix, (dtype, shape) in spec.tensor_shapes().items():
        got_dtype, got_shape = DTYPES[mine[suffix]["dtype"]], tuple(mine[suffix]["shape"])
        if got_shape != shape:
            problems.append(f"{where}: {suffix} has shape {list(got_shape)}, its quant entry implies {list(shape)}")
        want = dtype or (getattr(torch, scale_dtype) if scale_dtype else None)
        if want is not None and got_dtype != want:
            problems.append(f"{where}: {suffix} is {DTYPE_NAMES[got_dtype]}, expected {DTYPE_NAMES[want]}")
        elif dtype is None and not got_dtype.is_floating_point:
            problems.append(f"{where}: {suffix} is {DTYPE_NAMES[got_dtype]}, scales must be floating point")
    return problems


def _scale_values(path: Path, entry: FileEntry, specs: dict[str, QuantSpec]) -> list[str]:
    """Scales (and zeros) must be finite: a NaN there silently poisons every output of the linear."""
    tensors = open_tensors(path)
    problems = []
    for prefix, spec in specs.items():
        scales = tensors[f"{prefix}.{spec.scales_key}"]
        if not bool(torch.isfinite(scales).all()):
            problems.append(f"{path}: {prefix}.{spec.scales_key} has NaN or inf values; re-convert this part")
    return problems
