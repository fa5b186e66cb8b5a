"""One engine of bench_bigger_than_ram.py in one process: load, first forward, prefill, decode; a JSON line.

Runs under ``memlimit`` (the parent wraps it) and, for AirLLM, under /work/venv-airllm's Python, so it
imports only torch and the stdlib-only ``_mem`` at the top. Memory: peak RssAnon / RssFile above the
values right after ``import torch`` (sampled every 10 ms). I/O: ``/proc/self/io`` read_bytes per phase
(block I/O this process caused, its prefetch threads included).

    python benchmarks/_big_child.py '{"engine": "r", "sep": "...", "prefill": 256, "decode": 8, ...}'
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
if __name__ == "__main__" and len(sys.argv) > 1 and json.loads(sys.argv[1]).get("omp_passive"):
    import os  # OpenMP reads its wait policy when torch loads it: set it before the import

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch  # noqa: E402
from _mem import PeakMemory  # noqa: E402

VOCAB = 152064


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


class Ours:
    """llm_lazy_qwen on a sepweight folder (bf16, int8 or int4 storage), bf16 compute."""

    def __init__(self, sep: str, kw: dict, no_bsm: bool = False) -> None:
        from llm_lazy_qwen import load_part

        if no_bsm:  # QuantLinear as without the [bsm] extra: torch's int kernels (as bench_quant_decode.py)
            import llm_lazy_qwen.quant as quant_mod

            quant_mod._bsm = lambda: None  # type: ignore[assignment]
        self.model = load_part(sep, "f", dtype="bf16", **kw)

    def prefill(self, ids: torch.Tensor):
        cache = self.model.new_cache()
        return self.model(ids, cache=cache, logits_to_keep=1), cache

    def step(self, tok: torch.Tensor, cache):
        return self.model(tok, cache=cache), cache


class HF:
    """transformers in RAM, or Accelerate disk offload (every decoder layer on "disk")."""

    def __init__(self, src: str, offload: str | None) -> None:
        from transformers import AutoModelForCausalLM

        kw: dict = {"dtype": torch.bfloat16}
        if offload is not None:
            n = json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"]
            device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
            device_map.update({f"model.layers.{i}": "disk" for i in range(n)})
            kw.update(device_map=device_map, offload_folder=offload)
        self.model = AutoModelForCausalLM.from_pretrained(src, **kw).eval()

    def prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values

    def step(self, tok: torch.Tensor, state):
        out = self.model(tok, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values


class AirLLM:
    """AirLLM 4.0 on CPU (``device="cpu"``), its own split folder (hard links of our one-module shards)."""

    def __init__(self, src: str, split: str) -> None:
        from airllm import AutoModel

        self.model = AutoModel.from_pretrained(
            src, device="cpu", dtype=torch.bfloat16, layer_shards_saving_path=split, prefetching=True
        )

    def prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True)
        return out.logits[:, -1:], out.past_key_values

    def step(self, tok: torch.Tensor, state):
        out = self.model(tok, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values


def build(cfg: dict):
    e = cfg["engine"]
    if e in ("hf", "accelerate"):
        return HF(cfg["hf"], cfg.get("offload") if e == "accelerate" else None)
    if e == "airllm":
        return AirLLM(cfg["hf"], cfg["split"])
    return Ours(cfg["sep"], cfg.get("load_kw", {}), cfg.get("no_bsm", False))


def infer(cfg: dict) -> dict:
    res: dict = {"engine": cfg["engine"]}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, cfg["prefill"]), generator=g)
    with torch.inference_mode(), PeakMemory(interval_s=0.01) as peak:
        t0, r0 = time.perf_counter(), read_bytes()
        m = build(cfg)
        res["load_s"], res["load_read_gb"] = time.perf_counter() - t0, (read_bytes() - r0) / 1e9
        # first forward (4 tokens): pays the cold reads, oneDNN primitive creation
        t0, r0 = time.perf_counter(), read_bytes()
        m.prefill(ids[:, :4])
        res["first_s"], res["first_read_gb"] = time.perf_counter() - t0, (read_bytes() - r0) / 1e9
        t0, r0 = time.perf_counter(), read_bytes()
        logits, state = m.prefill(ids)
        res["prefill_s"], res["prefill_read_gb"] = time.perf_counter() - t0, (read_bytes() - r0) / 1e9
        res["peak_anon_mb"], res["peak_file_mb"] = peak.anon_above_mb, peak.file_above_mb  # so far
        tok = logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        logits, state = m.step(tok, state)  # warm-up token
        tok = logits[:, -1:].argmax(-1)
        tokens.append(int(tok))
        steps, reads, cpu = [], [], []
        for _ in range(cfg["decode"]):
            t0, r0, c0 = time.perf_counter(), read_bytes(), time.process_time()
            logits, state = m.step(tok, state)
            steps.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # all threads of this process: on a shared box wall time is noise
            reads.append(read_bytes() - r0)
            tok = logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
            # a partial result after every token: a run cut by its timeout still reports the tokens it made
            print(json.dumps(res | {"partial": True, "decode_steps": steps, "decode_reads": reads, "tokens": tokens}))
            sys.stdout.flush()
        res.update(
            decode_s=statistics.median(steps),
            decode_steps=steps,
            decode_cpu_s=statistics.median(cpu),
            decode_read_gb=statistics.median(reads) / 1e9,
            tokens=tokens,
            logit_max=float(logits.float().abs().max()),
        )
    res.update(peak_anon_mb=peak.anon_above_mb, peak_file_mb=peak.file_above_mb, base_mb=peak.base_anon_mb)
    return res


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft(cfg: dict) -> dict:
    """One LoRA step (r=8, all 7 projections, batch 1 x seq), llm_sft's layer-wise engine or HF + PEFT."""
    res: dict = {"engine": cfg["engine"]}
    seq = cfg["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["sft_dtype"]]
    with PeakMemory(interval_s=0.01) as peak:
        t0, r0 = time.perf_counter(), read_bytes()
        if cfg["engine"] == "sft_hfpeft":
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(cfg["hf"], dtype=dtype)
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step() -> float:
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss)
        else:
            from llm_lazy_qwen import load_part
            from llm_lora_mmap import apply_lora, mark_only_lora_trainable
            from llm_sft import Batch, LayerwiseEngine

            part = load_part(cfg["sep"], "f", dtype=dtype, head_chunk_size=8192, **cfg.get("load_kw", {}))
            apply_lora(part, TARGETS, r=8, lora_alpha=16)
            opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=1e-4)
            engine = LayerwiseEngine(part.train())
            batch = Batch(ids, labels, torch.ones_like(ids), torch.arange(seq).expand(1, seq))

            def step() -> float:
                out = engine.forward_backward(batch)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return out.mean

        res["load_s"], res["load_read_gb"] = time.perf_counter() - t0, (read_bytes() - r0) / 1e9
        times, losses, rd = [], [], []
        for _ in range(cfg["steps"]):
            t0, r0 = time.perf_counter(), read_bytes()
            losses.append(step())
            times.append(time.perf_counter() - t0)
            rd.append((read_bytes() - r0) / 1e9)
    res.update(
        step_s=times[-1],
        step_times=times,
        step_read_gb=rd[-1],
        losses=losses,
        peak_anon_mb=peak.anon_above_mb,
        peak_file_mb=peak.file_above_mb,
    )
    return res


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    res = sft(cfg) if cfg["engine"].startswith("sft") else infer(cfg)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
