"""One engine of bench_gpu.py in its own process: load, first forward, 512-token prefill, decode; JSON lines.

Engines: ``ours`` (llm_lazy_qwen ``load_part`` on the device, in RAM (= in VRAM) or lazy with ``load_kw``),
``hf`` (transformers' Qwen2ForCausalLM, the whole model in VRAM) and ``accelerate`` (the same model
dispatched by Accelerate with ``max_memory`` on the GPU, the decoder layers that do not fit offloaded to
the CPU: its offload hooks copy them in every forward). The transformers models get their weights from
the bf16 sepweight folder (``PartWeights.hf_state_dict``, the same tensors). A partial result is printed
after every phase, so a run cut by its timeout still reports what it measured; decode stops early (after
at least 3 timed tokens) when ``deadline`` (wall-clock ``time.time()``) comes near. Times end with a device synchronize.

    python benchmarks/_gpu_child.py '{"engine": "ours", "sep": "...", "load_kw": {"lazy": true}, ...}'
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

T0 = time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class Ours:
    def __init__(self, sep: str, device: torch.device, kw: dict) -> None:
        from llm_lazy_qwen import load_part

        self.model = load_part(sep, "f", device=device, dtype="bf16", **kw)

    def prefill(self, ids: torch.Tensor):
        cache = self.model.new_cache()
        return self.model(ids, cache=cache, logits_to_keep=1), cache

    def step(self, tok: torch.Tensor, cache):
        return self.model(tok, cache=cache), cache


def hf_model(sep: str):
    """transformers' Qwen2ForCausalLM (sdpa) on the CPU holding the folder's tensors (mmapped, not copied)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import llm_sepweight as sw

    config = Qwen2Config(**json.loads((Path(sep) / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict(sw.load(sep, "f").hf_state_dict(), assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # a non-persistent buffer: built here
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta[:5]}"
    return model.eval()


class HF:
    def __init__(self, sep: str, device: torch.device, accelerate_gib: float | None) -> None:
        model = hf_model(sep)
        self.note = ""
        if accelerate_gib is None:
            self.model = model.to(device)
            return
        from accelerate import dispatch_model, infer_auto_device_map

        gpu = {device.index or 0: int(accelerate_gib * 2**30)} if device.type == "cuda" else {}
        dm = infer_auto_device_map(
            model,
            max_memory=gpu | {"cpu": 512 * 2**30},
            no_split_module_classes=list(model._no_split_modules),
            dtype=torch.bfloat16,
        )
        n = model.config.num_hidden_layers
        on_cpu = sum(1 for i in range(n) if _placed(dm, f"model.layers.{i}") == "cpu")
        head = _placed(dm, "lm_head")
        self.note = f"{on_cpu}/{n} layers on cpu, lm_head on {head}, max_memory {accelerate_gib:g} GiB"
        self.model = dispatch_model(model, device_map=dm)

    def prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values

    def step(self, tok: torch.Tensor, state):
        out = self.model(tok, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values


def _placed(device_map: dict, name: str):
    """Where `name` lands in an Accelerate device map (its own entry or the closest parent's)."""
    while name:
        if name in device_map:
            return device_map[name]
        name = name.rpartition(".")[0]
    return device_map.get("")


def run(cfg: dict) -> None:
    device = torch.device(cfg["device"])
    deadline = cfg["deadline"]
    res: dict = {"engine": cfg["name"]}

    def emit(**kw) -> None:
        res.update(kw, peak_alloc_gib=peak_gib(device), elapsed_s=time.perf_counter() - T0)
        print(json.dumps(res), flush=True)

    vocab = json.loads((Path(cfg["sep"]) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, cfg["prefill"]), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        if cfg["engine"] == "ours":
            m = Ours(cfg["sep"], device, cfg.get("load_kw", {}))
        else:
            m = HF(cfg["sep"], device, cfg.get("accelerate_gib") if cfg["engine"] == "accelerate" else None)
            res["note"] = m.note
        sync(device)
        alloc = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        emit(load_s=time.perf_counter() - t0, loaded_alloc_gib=alloc)
        t0 = time.perf_counter()
        m.prefill(ids[:, :4])  # the first forward: kernels chosen, buffers allocated, pages touched
        sync(device)
        emit(first_s=time.perf_counter() - t0)
        runs = []
        while True:  # one prefill, up to 3 when they are short (the in-VRAM engines)
            t0 = time.perf_counter()
            logits, state = m.prefill(ids)
            sync(device)
            runs.append(time.perf_counter() - t0)
            emit(prefill_s=statistics.median(runs), prefill_runs=runs)
            if len(runs) >= 3 or runs[0] > 1.0 or time.time() + runs[0] > deadline:
                break
        tok = logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        logits, state = m.step(tok, state)  # warm-up token
        tok = logits[:, -1:].argmax(-1)
        tokens.append(int(tok))
        steps: list[float] = []
        for _ in range(cfg["decode"]):
            t0 = time.perf_counter()
            logits, state = m.step(tok, state)
            tok = logits[:, -1:].argmax(-1)
            sync(device)
            steps.append(time.perf_counter() - t0)
            tokens.append(int(tok))
            emit(decode_s=statistics.median(steps), decode_steps=steps, tokens=tokens)
            if len(steps) >= 3 and time.time() + 1.5 * max(steps) > deadline:
                break
        emit(done=True, logit_max=float(logits.float().abs().max()))


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if "threads" in cfg:
        torch.set_num_threads(cfg["threads"])
    run(cfg)
