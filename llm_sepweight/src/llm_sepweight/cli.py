"""Command line: ``llm-sepweight convert|info|verify``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
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


def _quant_line(sw: SepWeights) -> str:
    """``int4 g64 clip, layout aten_cpu_avx2 (+ rows: 3), scales bfloat16, head quantized``."""
    q = sw.quant or {}
    specs = [spec for part in _parts(sw) for spec in sw.linears(part).values()]
    if not specs:
        return "none"
    schemes = Counter(s.scheme for s in specs)
    groups = sorted({s.group_size for s in specs if s.group_size})
    text = "/".join(schemes) + "".join(f" g{g}" for g in groups)
    if q.get("method"):
        text += f" {q['method']}"
    layouts = Counter(s.layout for s in specs if s.layout)
    if layouts:
        main, *rest = layouts.most_common()
        text += f", layout {main[0]}" + "".join(f" (+ {name}: {n})" for name, n in rest)
    if q.get("scale_dtype"):
        text += f", scales {q['scale_dtype']}"
    if q.get("quantize_head") is False:
        text += ", head not quantized"
    return f"{text}  ({len(specs)} linears)"


def _parts(sw: SepWeights) -> list[int | str]:
    begin, layers, end = sw.manifest.parts()
    return (["begin"] if begin else []) + list(layers) + (["end"] if end else [])


def info_text(root: str | Path) -> str:
    """What `llm-sepweight info` prints: config summary, quantization, parts and their sizes."""
    sw = SepWeights(root)
    m = sw.manifest
    lines = [
        f"{sw.root}  (llm_sepweight format v{m.format_version})",
        f"architecture              {m.architecture}",
        f"layers                    {m.num_layers}  (stored: {sw.spec})",
        f"dtype                     {m.dtype}",
        f"quant                     {_quant_line(sw)}",
        f"tied head                 {'yes (served from embed_tokens)' if m.tie_word_embeddings else 'no'}",
    ]
    lines += [f"{k:<26}{m.config[k]}" for k in _CONFIG_SUMMARY if m.config.get(k) is not None]
    lines.append("")
    lines.append(f"{'file':<24}{'part':<10}{'tensors':>8}{'size':>12}  quant")
    total = 0
    for name, e in m.files.items():
        part = f"layer {e.part}" if isinstance(e.part, int) else e.part
        schemes = Counter(s.scheme for s in sw.linears(e.part).values())
        quant = ", ".join(f"{n} {scheme}" for scheme, n in schemes.items()) or "-"
        lines.append(f"{name:<24}{part:<10}{len(e.tensors):>8}{_size(e.size):>12}  {quant}")
        total += e.size
    lines.append(f"{'total':<42}{_size(total):>12}")
    if m.extra_files:
        lines.append("also: " + ", ".join(m.extra_files))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-sepweight", description="Per-layer safetensors storage for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert",
        help="convert an HF checkpoint folder, hub id, .gguf file or sepweight folder into a sepweight folder",
    )
    c.add_argument("src", help="HF checkpoint folder, hub repo id (owner/name), .gguf file or sepweight folder")
    c.add_argument("dst", help="output folder (re-running the same command resumes)")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="convert floating tensors")
    c.add_argument("--parts", default="f", help="parts to write, e.g. 'b 0-12' (default: f, the full model)")
    c.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--quant", choices=["int8", "int4"], default=None, help="store linears as int8 / int4 + scales")
    c.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=64, help="int4 group (default 64)")
    c.add_argument(
        "--quant-method", choices=["clip", "rtn"], default="clip", help="int4 scales: clip search (default) or rtn"
    )
    c.add_argument("--no-quantize-head", action="store_true", help="keep an untied lm_head unquantized")
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
                quant=args.quant,
                group_size=args.group_size,
                quant_method=args.quant_method,
                quantize_head=not args.no_quantize_head,
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
