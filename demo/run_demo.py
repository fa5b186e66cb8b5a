"""The main job, end to end, on an embedded default that needs no download.

    hatch run demo                      # builds a small Qwen2 checkpoint, converts it, shows its parts
    hatch run demo --model PATH_OR_ID   # the same on a real HF checkpoint folder or hub id

Steps so far: (1) build a deterministic random Qwen2-architecture checkpoint with transformers'
save_pretrained (HF layout, exactly what users have), (2) convert it with llm_sepweight and show
its parts and sizes, (3) verify checksums, (4) load one layer memory-mapped and show that it costs
no anonymous memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import llm_sepweight as sw
from llm_sepweight.cli import info_text

DEFAULT_SHAPE = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
)


def build_default_checkpoint(path: Path) -> Path:
    """A small Qwen2 (random weights, fixed seed) saved with transformers' save_pretrained."""
    if (path / "config.json").exists():
        return path
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**DEFAULT_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def rss_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return {k: int(d[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder or hub id (default: build a small Qwen2)")
    ap.add_argument("--workdir", default="demo_out", help="where checkpoints and outputs go")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    print("== 1. checkpoint")
    src = args.model or str(build_default_checkpoint(work / "hf-qwen2-small"))
    print(f"source: {src}")

    print("\n== 2. convert with llm_sepweight")
    t0 = time.perf_counter()
    sw.convert(src, work / "sep", dtype=args.dtype)
    print(f"converted in {time.perf_counter() - t0:.2f} s (re-running resumes / skips finished files)\n")
    print(info_text(work / "sep"))

    print("\n== 3. verify")
    print(sw.verify(work / "sep"))

    print("\n== 4. load one layer memory-mapped")
    weights = sw.SepWeights(work / "sep")
    before = rss_mb()
    layer = weights.layer(weights.num_layers // 2)
    _ = [t.view(torch.uint8).max() for t in layer.values()]  # touch every byte
    after = rss_mb()
    nbytes = sum(t.numel() * t.element_size() for t in layer.values()) / 2**20
    print(
        f"layer {weights.num_layers // 2}: {len(layer)} tensors, {nbytes:.1f} MB; "
        f"RssAnon +{after['RssAnon'] - before['RssAnon']:.1f} MB, RssFile +{after['RssFile'] - before['RssFile']:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
