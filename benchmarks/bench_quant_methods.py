"""Perplexity of llm_sepweight's int4 scale choices on real weights, with transformers as the model.

Each linear (``*_proj``) of an HF folder is quantized with ``llm_sepweight.quantize_linear`` the way
``convert(quant=...)`` does it, dequantized back into the transformers model, and the perplexity of
the first ``--tokens`` tokens of the ``pydoc_data.topics`` strings (sorted by key, joined with blank
lines) is printed per method. Isolates the quantizer from any runtime (no kernels involved).

    python benchmarks/bench_quant_methods.py /work/cache/bench7b/quality/hf-bf16 --tokens 1024 \\
        --methods bf16 int8 rtn:64 clip-unweighted:64 clip:64 rtn:32 clip:32

(``hf-bf16`` is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to bf16, written by benchmarks/_quality.py.)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import llm_sepweight as sw
from llm_sepweight.quant_importance import input_importance


def text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["bf16", "int8", "rtn:64", "clip:64"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(args.hf)(text(), return_tensors="pt").input_ids[:, : args.tokens]
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    config = model.config.to_dict()
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    base = None
    for method in args.methods:
        model.load_state_dict(orig)
        t0 = time.perf_counter()
        if method != "bf16":
            _quantize(model, orig, config, method)
        with torch.no_grad():
            ppl = math.exp(model(ids, labels=ids).loss.item())
        base = base or ppl
        print(
            f"{method:<20} ppl {ppl:8.4f}  {100 * (ppl / base - 1):+6.2f}%  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def _quantize(model: torch.nn.Module, orig: dict, config: dict, method: str) -> None:
    name, _, group = method.partition(":")
    for mod_name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and mod_name.endswith("_proj")):
            continue
        layer = int(mod_name.split(".")[2])
        prefix = f"model.layers.{layer}."
        part = {k.removeprefix(prefix): v.to(torch.bfloat16) for k, v in orig.items() if k.startswith(prefix)}
        rel = mod_name.removeprefix(prefix) + ".weight"
        if name == "int8":
            tensors, spec = sw.quantize_linear(part[rel], "int8")
        else:
            imp = input_importance(layer, rel, part, config) if name == "clip" else None
            scheme_method = "rtn" if name == "rtn" else "clip"
            tensors, spec = sw.quantize_linear(part[rel], "int4", int(group), scheme_method, importance=imp)
        mod.weight.data.copy_(sw.dequantize(tensors, spec).to(torch.bfloat16).float())


if __name__ == "__main__":
    main()
