"""Perplexity of llm_sepweight's int4 scale choices on real weights, with transformers as the model.

Each linear (``*_proj``) of an HF folder is quantized with ``llm_sepweight.quantize_linear`` the way
``convert(quant=...)`` does it, dequantized back into the transformers model, and the perplexity of
the first ``--tokens`` tokens of the ``pydoc_data.topics`` strings (sorted by key, joined with blank
lines) is printed per method. Isolates the quantizer from any runtime (no kernels involved).

    python benchmarks/bench_quant_methods.py /work/cache/bench7b/quality/hf-bf16 --tokens 1024 \\
        --methods bf16 int8 rtn:64 clip-unweighted:64 clip-moment:64 clip:64 rtn:32 clip:32

Methods: ``bf16``, ``int8``, and ``NAME:GROUP`` with NAME ``rtn``, ``clip`` (the default: the search
weighted by ``input_importance``), ``clip-moment`` (weighted by the ``E[x^2]`` estimate alone, the
default before the column balance) or ``clip-unweighted``. ``--start`` skips that many tokens
(a second text window). (``hf-bf16`` is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to bf16,
written by benchmarks/_quality.py.)

``--time-7b-layer`` instead times quantizing one Qwen2.5-7B-shaped layer (hidden 3584, intermediate
18944, 28 / 4 heads of 128; ``torch.randn * 0.02`` weights, bf16, norms ``1 + 0.1 randn``) per
method, importance estimate included, as ``convert`` does it: seconds per layer.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import llm_sepweight as sw
from llm_sepweight.quant_importance import input_importance, input_moment

WEIGHTINGS = {"clip": input_importance, "clip-moment": input_moment}


def text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf", nargs="?", help="HF folder (bf16); not needed with --time-7b-layer")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["bf16", "int8", "rtn:64", "clip:64"])
    ap.add_argument("--start", type=int, default=0, help="first token of the window")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-7b-layer", action="store_true", help="time one 7B-shaped layer instead (hf unused)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.time_7b_layer:
        return time_7b_layer([m for m in args.methods if ":" in m])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(args.hf)(text(), return_tensors="pt").input_ids
    ids = ids[:, args.start : args.start + args.tokens]
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
    for mod_name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and mod_name.endswith("_proj")):
            continue
        layer = int(mod_name.split(".")[2])
        prefix = f"model.layers.{layer}."
        part = {k.removeprefix(prefix): v.to(torch.bfloat16) for k, v in orig.items() if k.startswith(prefix)}
        rel = mod_name.removeprefix(prefix) + ".weight"
        tensors, spec = _quantize_one(layer, rel, part, config, method)
        mod.weight.data.copy_(sw.dequantize(tensors, spec).to(torch.bfloat16).float())


def _quantize_one(layer: int, rel: str, part: dict, config: dict, method: str) -> tuple[dict, sw.QuantSpec]:
    name, _, group = method.partition(":")
    if name == "int8":
        return sw.quantize_linear(part[rel], "int8")
    weighting = WEIGHTINGS.get(name)
    imp = weighting(layer, rel, part, config) if weighting else None
    return sw.quantize_linear(part[rel], "int4", int(group), "rtn" if name == "rtn" else "clip", importance=imp)


def time_7b_layer(methods: list[str]) -> None:
    """Seconds to quantize one Qwen2.5-7B-shaped layer per method."""
    h, i, kv = 3584, 18944, 512
    g = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    part = {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        part[norm] = (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16)
    config = {"num_attention_heads": 28, "num_key_value_heads": 4}
    for method in methods or ["rtn:64", "clip-moment:64", "clip:64"]:
        t0, c0 = time.perf_counter(), time.process_time()
        for rel in shapes:
            _quantize_one(0, rel, part, config, method)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{method:<20} {wall:6.2f} s per 7B layer (CPU {cpu:6.2f} s)", flush=True)


if __name__ == "__main__":
    main()
