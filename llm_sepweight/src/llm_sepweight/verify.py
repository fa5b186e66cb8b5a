"""verify(): recompute every checksum and compare every header with manifest.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import SepweightError
from .manifest import Manifest
from .safetensors_io import sha256_file
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
        if sha256_file(path) != sha:
            report.problems.append(f"{path}: sha256 does not match manifest.json (the file changed or is corrupted)")
    return report
