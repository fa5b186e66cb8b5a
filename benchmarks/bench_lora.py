"""LoRA forward+backward of one Qwen2.5-0.5B-shaped layer: llm_lora_mmap vs PEFT on transformers, side by side.

Ours: an llm_lazy_qwen part holding one layer, its frozen weights zero-copy mmapped from a sepweight
folder, LoRA from llm_lora_mmap. Anchor: transformers' Qwen2DecoderLayer with the same weights loaded
into RAM, LoRA from PEFT (``get_peft_model``: fp32 adapters). r=8, lora_alpha=16, all 7 projections,
batch 1, the input requires grad (a middle layer of a training step), torch.set_num_threads(2).

Time: both engines in one process per configuration, interleaved over ``--rounds`` rounds (which one
goes first alternates); medians. Memory: each engine alone in a fresh process; peak RssAnon / RssFile
above the baseline right after ``import torch``, sampled every 2 ms by a thread; medians over
``--mem-rounds`` processes.

    python benchmarks/bench_lora.py [--rounds 15] [--mem-rounds 3] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _mem import PeakMemory, loadavg, status_kb

SHAPE = {"hidden": 896, "inter": 4864, "heads": 14, "kv_heads": 2}  # one Qwen2.5-0.5B layer
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (stored dtype, compute dtype); PEFT holds the weights in the compute dtype
CONFIGS = {
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "bf16 stored, fp32 compute": ("bfloat16", "float32"),
}


def hf_config() -> dict:
    s = SHAPE
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": 1,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
    }


def make_folder(root: Path, dtype: str) -> Path:
    """A sepweight folder holding layer 0 only, random weights (std 0.02, norms ~1)."""
    import torch

    import llm_sepweight as sw

    h, i, kv = SHAPE["hidden"], SHAPE["inter"], SHAPE["kv_heads"] * SHAPE["hidden"] // SHAPE["heads"]
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02 + mean).to(getattr(torch, dtype))

    out = root / dtype
    w = sw.SepweightWriter(out, hf_config(), fsync=False)
    w.write(
        0,
        {
            "self_attn.q_proj.weight": r(h, h),
            "self_attn.q_proj.bias": r(h),
            "self_attn.k_proj.weight": r(kv, h),
            "self_attn.k_proj.bias": r(kv),
            "self_attn.v_proj.weight": r(kv, h),
            "self_attn.v_proj.bias": r(kv),
            "self_attn.o_proj.weight": r(h, h),
            "mlp.gate_proj.weight": r(i, h),
            "mlp.up_proj.weight": r(i, h),
            "mlp.down_proj.weight": r(h, i),
            "input_layernorm.weight": r(h, mean=1.0),
            "post_attention_layernorm.weight": r(h, mean=1.0),
        },
    )
    w.finish()
    return out


# ------------------------------------------------------------------------------------- engines (child side)
def build(engine: str, folder: Path, compute: str, seq: int, lora: bool = True):
    """A ``step()`` running forward + backward once, the module and its trainable parameters.

    ``lora=False``: the same layer, frozen, without adapters (to separate the cost of LoRA from
    the cost of the layer implementation)."""
    import torch

    dtype = getattr(torch, compute)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, seq, SHAPE["hidden"], generator=g).to(dtype).requires_grad_()
    grad = torch.randn(1, seq, SHAPE["hidden"], generator=g).to(dtype)
    if engine == "ours":
        from llm_lazy_qwen import load_part
        from llm_lora_mmap import apply_lora, mark_only_lora_trainable

        part = load_part(folder, "0")  # the stored dtype, zero-copy; fp32 input -> fp32 compute
        params = []
        if lora:
            apply_lora(part, TARGETS, r=8, lora_alpha=16)
            params = mark_only_lora_trainable(part)

        def step() -> None:
            part(x).backward(grad)

        return step, part, params
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RotaryEmbedding,
    )

    cfg = Qwen2Config(**hf_config())
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(cfg, 0)
    # load_file returns views of a mapping of the file: copy, so the anchor holds its weights in RAM
    sd = {k: v.to(dtype, copy=True) for k, v in load_file(folder / "mid.00000.safetensors").items()}
    layer.load_state_dict(sd, assign=True)
    del sd
    model = (
        get_peft_model(layer, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        if lora
        else layer.requires_grad_(False)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    rope = Qwen2RotaryEmbedding(cfg)
    pos = torch.arange(seq)[None]

    def step() -> None:
        cos, sin = rope(x, pos)
        out = model(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return step, model, params


def child_time(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    steps = {}
    keep = []
    engines = [("ours", True), ("peft", True)]
    if cfg["same_dtype"]:  # a plain nn.Linear cannot multiply fp32 activations by bf16 weights
        engines += [("ours base", False), ("hf base", False)]
    for engine, lora in engines:
        step, module, params = build(
            engine.split()[0].replace("hf", "peft"), Path(cfg["folder"]), cfg["compute"], cfg["seq"], lora
        )
        keep.append(module)

        def run(step=step, params=params) -> float:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        run(), run()  # warm-up: page faults of the mmapped weights, oneDNN kernels
        steps[engine] = run
    times: dict[str, list[float]] = {engine: [] for engine in steps}
    for r in range(cfg["rounds"]):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for engine in order:
            times[engine].append(steps[engine]())
    return times


def child_mem(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    base = status_kb()
    with PeakMemory() as peak:
        if cfg["engine"] == "ours":
            import llm_lazy_qwen  # noqa: F401
            import llm_lora_mmap  # noqa: F401
        else:
            import peft  # noqa: F401
            import transformers.models.qwen2.modeling_qwen2  # noqa: F401
        # both engines build modules on the meta device; its first use imports torch's meta-tensor
        # machinery (~50 MB; transformers' import already did it): a fixed cost, counted with the imports
        torch.nn.Embedding(2, 2, device="meta")
        imports = status_kb()["RssAnon"] - base["RssAnon"]
        step, _module, params = build(cfg["engine"], Path(cfg["folder"]), cfg["compute"], cfg["seq"])
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    return {
        "anon_mb": peak.anon_mb - base["RssAnon"] / 1024,
        "file_mb": peak.file_mb - base["RssFile"] / 1024,
        "imports_mb": imports / 1024,
    }


# ------------------------------------------------------------------------------------- parent
def spawn(cfg: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mem-rounds", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(child_time(cfg) if cfg["kind"] == "time" else child_mem(cfg)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_lora-"))
    try:
        folders = {d: make_folder(work, d) for d in ("float32", "bfloat16")}
        before = loadavg()
        rows = []
        for name, (stored, compute) in CONFIGS.items():
            base = {"folder": str(folders[stored]), "compute": compute, "seq": args.seq, "threads": args.threads}
            times = spawn(dict(base, kind="time", rounds=args.rounds, same_dtype=stored == compute))
            # the anchor holds its weights in the compute dtype: for "bf16 stored, fp32 compute" an fp32 layer
            peft_folder = str(folders[compute])
            mem: dict[str, list[dict]] = {"ours": [], "peft": []}
            for _ in range(args.mem_rounds):
                mem["ours"].append(spawn(dict(base, kind="mem", engine="ours")))
                mem["peft"].append(spawn(dict(base, kind="mem", engine="peft", folder=peft_folder)))
            rows.append((name, times, mem))
        after = loadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print("## llm_lora_mmap: forward+backward of one LoRA-wrapped Qwen2.5-0.5B-shaped layer vs PEFT in RAM\n")
    print(
        f"hidden {SHAPE['hidden']}, intermediate {SHAPE['inter']}, {SHAPE['heads']} heads / {SHAPE['kv_heads']} KV "
        f"heads; r=8 on all 7 projections; batch 1 x seq {args.seq}; {args.threads} threads; input requires grad. "
        f"Medians of {args.rounds} interleaved rounds (time) and {args.mem_rounds} fresh processes per engine "
        f"(memory: peak above the `import torch` baseline, fixed costs included)."
    )
    print(
        f"loadavg before: {before}, after: {after}. This machine is shared and noisy: ratios move by ~10% "
        "between runs.\n"
    )
    print(
        "| dtype | ours ms | PEFT ms | time ratio (goal <= 1.1) | ratio of fastest runs | LoRA overhead ours / PEFT | ours anon MB (fixed) "
        "| PEFT anon MB (fixed) | anon ratio | anon ratio without fixed costs | ours / PEFT file-backed MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, times, mem in rows:
        t_ours, t_peft = med(times["ours"]) * 1e3, med(times["peft"]) * 1e3
        overhead = "n/a"
        if "ours base" in times:
            overhead = f"{t_ours / (med(times['ours base']) * 1e3):.2f} / {t_peft / (med(times['hf base']) * 1e3):.2f}"
        a_ours, a_peft = (med([m["anon_mb"] for m in mem[e]]) for e in ("ours", "peft"))
        i_ours, i_peft = (med([m["imports_mb"] for m in mem[e]]) for e in ("ours", "peft"))
        f_ours, f_peft = (med([m["file_mb"] for m in mem[e]]) for e in ("ours", "peft"))
        fastest = min(times["ours"]) / min(times["peft"])
        print(
            f"| {name} | {t_ours:.0f} | {t_peft:.0f} | {t_ours / t_peft:.2f} | {fastest:.2f} | {overhead} | "
            f"{a_ours:.0f} ({i_ours:.0f}) | "
            f"{a_peft:.0f} ({i_peft:.0f}) | {a_ours / a_peft:.2f} | {(a_ours - i_ours) / (a_peft - i_peft):.2f} | "
            f"{f_ours:.0f} / {f_peft:.0f} |"
        )
    print(
        '\nTimes are medians; "ratio of fastest runs" divides the minimums (noise only ever adds time, so it '
        "is the steadier estimate on a loaded machine). LoRA overhead: forward+backward time with LoRA over the same frozen layer without it "
        "(ours: llm_lazy_qwen's layer; PEFT: transformers' Qwen2DecoderLayer), timed in the same rounds."
    )
    w32 = 14.1e6 * 4 / 2**20
    print(
        f"\nThe layer's weights are {w32:.0f} MB in fp32, {w32 / 2:.0f} MB in bf16: anonymous (in RAM) for the "
        "anchor, file-backed pages the kernel may drop for ours. Anonymous memory above the `import torch` baseline "
        "includes fixed costs (in brackets: importing transformers + PEFT for the anchor, llm_lazy_qwen + "
        "llm_lora_mmap for ours, and torch's meta-device machinery for both); the rest is weights (anchor only), activations, adapters and their gradients. "
        '"bf16 stored, fp32 compute": ours casts each bf16 weight to fp32 for one matmul at a time (and again in '
        "backward), the anchor holds the layer in fp32."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
