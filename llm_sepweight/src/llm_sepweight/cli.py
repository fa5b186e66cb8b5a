"""Command line: ``llm-sepweight convert|info|verify``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .convert import convert
from .errors import SepweightError
from .reader import SepWeights
from .verify import verify

_CONFIG_SUMMARY = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def info_text(root: str | Path) -> str:
    """What `llm-sepweight info` prints: config summary, parts and their sizes."""
    sw = SepWeights(root)
    m = sw.manifest
    lines = [
        f"{sw.root}  (llm_sepweight format v{m.format_version})",
        f"architecture              {m.architecture}",
        f"layers                    {m.num_layers}  (stored: {sw.spec})",
        f"dtype                     {m.dtype}",
        f"tied head                 {'yes (served from embed_tokens)' if m.tie_word_embeddings else 'no'}",
    ]
    lines += [f"{k:<26}{m.config[k]}" for k in _CONFIG_SUMMARY if m.config.get(k) is not None]
    lines.append("")
    lines.append(f"{'file':<24}{'part':<10}{'tensors':>8}{'size':>12}")
    total = 0
    for name, e in m.files.items():
        part = f"layer {e.part}" if isinstance(e.part, int) else e.part
        lines.append(f"{name:<24}{part:<10}{len(e.tensors):>8}{_size(e.size):>12}")
        total += e.size
    lines.append(f"{'total':<42}{_size(total):>12}")
    if m.extra_files:
        lines.append("also: " + ", ".join(m.extra_files))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-sepweight", description="Per-layer safetensors storage for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an HF checkpoint folder or hub id into a sepweight folder")
    c.add_argument("src", help="HF checkpoint folder or hub repo id (owner/name)")
    c.add_argument("dst", help="output folder (re-running the same command resumes)")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="convert floating tensors")
    c.add_argument("--parts", default="f", help="parts to write, e.g. 'b 0-12' (default: f, the full model)")
    c.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="show parts, sizes and config of a sepweight folder")
    i.add_argument("dir")
    v = sub.add_parser("verify", help="recompute checksums and compare headers with manifest.json")
    v.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(
                args.src,
                args.dst,
                dtype=args.dtype,
                parts=args.parts,
                revision=args.revision,
                progress=not args.no_progress,
            )
            print(info_text(args.dst))
        elif args.command == "info":
            print(info_text(args.dir))
        else:
            report = verify(args.dir, progress=True)
            print(report)
            return 0 if report.ok else 1
    except SepweightError as e:
        print(f"llm-sepweight: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
