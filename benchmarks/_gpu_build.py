"""bench_gpu.py's model: a random Qwen2.5-7B-shaped model written straight into bf16, int8 and int4 sepweight folders.

Weights are drawn on the device (``torch.randn`` on CUDA takes seconds for 7.6 B values, where the CPU's
generator takes minutes): N(0, 0.02) in bf16, norm weights 1 + N(0, 0.05), biases N(0, 0.02), untied head;
deterministic (one generator seeded per tensor name). The int8 / int4 folders hold the same bf16 weights
quantized by ``llm_sepweight.quantize_linear`` (what ``convert(..., quant=...)`` calls per linear; int4 rtn,
g64), run on the device's tensors too, so all three folders come out of one pass. Writes skip fsync: on a
128 GiB machine the folders stay in the page cache, so the engines read RAM, not the disk (bench_gpu.py
measures PCIe, not storage). Order: begin, end, then layers; when ``max_s`` runs out the model keeps the
layers written so far (``num_hidden_layers`` says how many), and the caller prints that.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

import llm_sepweight as sw

QWEN7B = dict(hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, vocab=152064)
TINY = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=8192)  # tests the script on a CPU
FORMATS = ("bf16", "int8", "int4")
GROUP = 64
_warned: list[bool] = []


def config(s: dict, layers: int) -> dict:
    """The HF config.json of the shape (Qwen2.5 defaults)."""
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=layers,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=s["vocab"],
        tie_word_embeddings=False,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        hidden_act="silu",
        torch_dtype="bfloat16",
        use_cache=True,
    )


def _rand(name: str, shape: tuple[int, ...], device: torch.device, mean: float = 0.0, std: float = 0.02):
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return t.mul_(std).add_(mean).to(torch.bfloat16)


def _part(part: int | str, s: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """One part's bf16 tensors on `device`, keys relative to the part (as stored)."""
    h, inter, v = s["hidden"], s["inter"], s["vocab"]
    if part == "begin":
        return {"embed_tokens.weight": _rand("embed", (v, h), device)}
    if part == "end":
        return {
            "norm.weight": _rand("norm", (h,), device, mean=1.0, std=0.05),
            "lm_head.weight": _rand("head", (v, h), device),
        }
    kv = s["kv_heads"] * (h // s["heads"])
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    out = {k: _rand(f"{part}.{k}", shape, device) for k, shape in shapes.items()}
    for k in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[k] = _rand(f"{part}.{k}", (h,), device, mean=1.0, std=0.05)
    return out


def _quantized(part: int | str, tensors: dict[str, torch.Tensor], scheme: str) -> tuple[dict, dict]:
    """(CPU tensors to store, {"P.qweight": QuantSpec}) with every linear of the part quantized."""
    out, entries = {}, {}
    for key, t in tensors.items():
        if not sw.is_linear(part, key):
            out[key] = t.cpu()
            continue
        prefix = key.removesuffix(".weight")
        try:
            q, spec = sw.quantize_linear(t, scheme, GROUP, "rtn", torch.bfloat16, name=f"{part} {key}")
        except Exception as e:  # the device's tensors refused: the CPU path convert() takes
            if t.device.type == "cpu":
                raise
            if not _warned:
                _warned.append(True)
                print(f"quantize_linear on {t.device} failed ({type(e).__name__}: {e}); quantizing on the CPU")
            q, spec = sw.quantize_linear(t.cpu(), scheme, GROUP, "rtn", torch.bfloat16, name=f"{part} {key}")
        out.update({f"{prefix}.{k}": v.cpu() for k, v in q.items()})
        entries[f"{prefix}.qweight"] = spec
    return out, entries


def _top_quant(scheme: str) -> dict | None:
    """The manifest's top-level ``quant`` (QUANT_FORMAT.md), as convert() writes it."""
    if scheme == "bf16":
        return None
    group = GROUP if scheme == "int4" else None
    return {"scheme": scheme, "group_size": group, "scale_dtype": "bfloat16", "method": "rtn", "quantize_head": True}


def complete(work: Path, formats: tuple[str, ...] = FORMATS) -> bool:
    return all((work / f"sep-{f}" / "manifest.json").is_file() for f in formats)


def build(
    work: Path,
    shape: dict,
    device: torch.device,
    max_s: float,
    formats: tuple[str, ...] = FORMATS,
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``work/sep-{fmt}`` for each format; returns {"layers", "seconds", "per_layer_s", "truncated"}."""
    t0 = time.perf_counter()
    cfg = config(shape, shape["layers"])
    writers = {
        f: sw.SepweightWriter(work / f"sep-{f}", cfg, fsync=False, quant=_top_quant(f), source={"bench_gpu": f})
        for f in formats
    }
    pool = ThreadPoolExecutor(max_workers=len(formats))  # one writer per folder: writes + hashes overlap
    pending: list[Future] = []

    def write(part: int | str) -> None:
        tensors = _part(part, shape, device)
        stored = {"bf16": ({k: v.cpu() for k, v in tensors.items()}, {})}
        stored |= {f: _quantized(part, tensors, f) for f in formats if f != "bf16"}
        del tensors
        for fut in pending:  # the previous part's files are written before this one's are queued
            fut.result()
        pending.clear()
        pending.extend(pool.submit(writers[f].write, part, stored[f][0], quant=stored[f][1]) for f in formats)

    write("begin")
    write("end")
    built, layer_s = 0, 0.0
    for i in range(shape["layers"]):
        t1 = time.perf_counter()
        write(i)
        built += 1
        layer_s = (time.perf_counter() - t1) if i == 0 else 0.5 * layer_s + 0.5 * (time.perf_counter() - t1)
        if built >= 2 and time.perf_counter() - t0 + 1.5 * layer_s > max_s:
            break
    for fut in pending:
        fut.result()
    pool.shutdown()
    for w in writers.values():
        w.config["num_hidden_layers"] = built
        w.finish()
    seconds = time.perf_counter() - t0
    log(f"built {built} of {shape['layers']} layers in {seconds:.1f} s ({', '.join(formats)}; {layer_s:.2f} s/layer)")
    return {"layers": built, "seconds": seconds, "per_layer_s": layer_s, "truncated": built < shape["layers"]}
