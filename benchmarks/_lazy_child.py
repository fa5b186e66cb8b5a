"""One engine, one process: load, prefill, decode; prints a JSON line. Used by bench_lazy_qwen.py."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _mem import PeakMemory, status_kb  # noqa: E402


def evict(folder: Path) -> None:
    for p in folder.rglob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


class HF:
    def __init__(self, src: Path, offload: Path | None) -> None:
        from transformers import AutoModelForCausalLM

        kw: dict = {"dtype": torch.bfloat16}
        if offload is not None:
            n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
            device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
            device_map.update({f"model.layers.{i}": "disk" for i in range(n)})
            kw.update(device_map=device_map, offload_folder=str(offload))
        self.model = AutoModelForCausalLM.from_pretrained(src, **kw).eval()

    def prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values

    def step(self, tok: torch.Tensor, state):
        out = self.model(tok, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values


class Ours:
    def __init__(self, sep: Path, lazy: bool, prefetch: int, stream_mode: str = "auto") -> None:
        from llm_lazy_qwen import load_part

        kw = {"lazy": lazy, "prefetch": prefetch, "stream_mode": stream_mode}
        self.model = load_part(sep, "f", dtype=torch.bfloat16, **kw)

    def prefill(self, ids: torch.Tensor):
        cache = self.model.new_cache()
        return self.model(ids, cache=cache, logits_to_keep=1), cache

    def step(self, tok: torch.Tensor, cache):
        return self.model(tok, cache=cache), cache


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    engine, src, sep = cfg["engine"], Path(cfg["src"]), Path(cfg["sep"])
    res: dict = {"engine": engine}
    ids = torch.randint(0, 151936, (1, cfg["prefill"]))
    short = ids[:, :16]
    # Phase 1, memory: a sampler thread reads /proc/self/status every 2 ms while the engine loads,
    # prefills and decodes. Phase 2, time: the same work again with no sampler competing for the
    # GIL and the 2 cores (it slowed lazy decode, which runs a Python prefetch thread, by up to 1.8x).
    with torch.inference_mode(), PeakMemory() as peak:
        t0 = time.perf_counter()
        if engine == "hf":
            m = HF(src, None)
        elif engine == "accelerate":
            m = HF(src, Path(cfg["offload"]))
        else:
            mode = "copy" if engine == "lazy_copy" else "auto"
            m = Ours(sep, lazy=engine.startswith("lazy"), prefetch=cfg.get("prefetch", 1), stream_mode=mode)
        res["load_s"] = time.perf_counter() - t0
        m.prefill(short)  # warm-up (oneDNN primitive creation)
        m.prefill(ids)
        logits, state = m.prefill(short)
        for _ in range(3):
            logits, state = m.step(logits[:, -1:].argmax(-1), state)
    with torch.inference_mode():
        times = []
        for _ in range(cfg["prefill_runs"]):
            t0 = time.perf_counter()
            m.prefill(ids)
            times.append(time.perf_counter() - t0)
        res["prefill_s"] = statistics.median(times)
        # decode: prefill 16 tokens, then `decode` steps one token at a time with the KV cache
        logits, state = m.prefill(short)
        tok = logits[:, -1:].argmax(-1)
        m.step(tok, state)  # warm-up step
        steps = []
        for _ in range(cfg["decode"]):
            t0 = time.perf_counter()
            logits, state = m.step(tok, state)
            steps.append(time.perf_counter() - t0)
            tok = logits[:, -1:].argmax(-1)
        res["decode_s"] = statistics.median(steps)
        res["decode_min_s"] = min(steps)
        if cfg.get("cold"):
            evict(sep if engine.startswith("lazy") or engine.startswith("ram") else src)
            if cfg.get("offload"):
                evict(Path(cfg["offload"]))
            t0 = time.perf_counter()
            m.step(tok, state)
            res["cold_step_s"] = time.perf_counter() - t0
    s = status_kb()
    res.update(
        peak_anon_mb=peak.anon_above_mb,
        peak_file_mb=peak.file_above_mb,
        peak_total_mb=peak.total_mb,
        base_mb=peak.base_anon_mb + peak.base_file_mb,
        end_anon_mb=s["RssAnon"] / 1024,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
