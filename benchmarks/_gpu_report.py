"""bench_gpu.py's output: the header, the engines' table, the floors, and issue 16's goals as ratios of one run."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

WHAT = {
    "vram": "ours, whole model in VRAM (load_part RAM mode: the ceiling)",
    "bf16_p1": "ours lazy bf16, copy mode, prefetch 1",
    "bf16_p2": "ours lazy bf16, copy mode, prefetch 2",
    "int8_p1": "ours lazy int8, copy mode, prefetch 1",
    "int8_p2": "ours lazy int8, copy mode, prefetch 2",
    "int4_p1": "ours lazy int4 g64, copy mode, prefetch 1",
    "int4_p2": "ours lazy int4 g64, copy mode, prefetch 2",
    "bf16_res": "ours lazy bf16, copy mode, prefetch 1, resident_mb=2500",
    "accelerate": "Accelerate dispatch_model, CPU offload hooks",
    "hf_vram": "transformers Qwen2ForCausalLM, whole model in VRAM",
}


def _v(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class Report:
    def __init__(self, args: argparse.Namespace, device: torch.device, shape: dict, start: float) -> None:
        self.args, self.device, self.shape, self.start = args, device, shape, start
        self.bw: dict[str, float] = {}
        self.host: dict[str, float] = {}
        self.build: dict = {}
        self.stream_bytes: dict[str, int] = {}
        self.model_bytes: dict[str, int] = {}
        self.rows: dict[str, dict] = {}
        self.errors: list[str] = []

    def header(self) -> list[str]:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            dev = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        else:
            dev = "no CUDA device: CPU (a test of the script, not a measurement of issue 16)"
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln
            ),
            "?",
        )
        s, b = self.shape, self.build
        layers = b.get("layers", s["layers"])
        full = QWEN_LAYERS if not self.args.tiny else s["layers"]
        lines = [
            f"Command: `python benchmarks/bench_gpu.py {shlex.join(sys.argv[1:])}`",
            f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {(commit.stdout or '?').strip()}",
            f"Device: {dev}; CPU: {cpu}, {os.cpu_count()} cores",
            f"torch {torch.__version__}, transformers {_v('transformers')}, accelerate {_v('accelerate')}",
            f"Model: Qwen2.5-{'7B' if not self.args.tiny else 'tiny'} shape (hidden {s['hidden']}, intermediate "
            f"{s['inter']}, {s['heads']} heads / {s['kv_heads']} KV, vocab {s['vocab']}, untied head), random bf16 "
            f"weights; {layers} of its {full} layers",
        ]
        if layers < full:
            lines.append(
                f"  NOTE: only {layers} of {full} layers were built within the build's time limit "
                f"({b.get('per_layer_s', 0):.2f} s/layer): every per-token time and byte count below is for "
                f"{layers} layers + embedding + head; the ratios compare like with like (the head weighs more "
                "in them than in the full model)."
            )
        if b.get("seconds") is not None:
            lines.append(f"Build: {b['seconds']:.1f} s for the bf16 + int8 + int4 folders (warm page cache after)")
        lines.append(
            f"Prefill {self.args.prefill} tokens; decode = median of up to {self.args.decode} timed tokens after "
            f"a warm-up token; batch 1; budget {self.args.budget_s:.0f} s"
        )
        return lines

    def floors(self) -> list[str]:
        lines = []
        if self.bw:
            lines.append(
                f"Host -> device: pinned {self.bw['pinned']:.1f} GB/s, pageable {self.bw['pageable']:.1f} GB/s "
                "(1 GiB copies, median of 5)"
            )
        if self.host:
            lines.append(
                f"Page cache -> (pinned) host buffer, readinto: 1 thread {self.host['1_threads']:.1f} GB/s, "
                f"4 threads {self.host['4_threads']:.1f} GB/s"
            )
        for f, nb in self.stream_bytes.items():
            pcie = nb / 1e9 / self.bw["pinned"] if self.bw else None
            host = nb / 1e9 / self.host["1_threads"] if self.host else None
            lines.append(
                f"  {f}: {nb / 1e9:.2f} GB streamed per token (layers + head; model {self.model_bytes[f] / 1e9:.2f} "
                f"GB): PCIe floor {_f(pcie)} s/token, one reader's host floor {_f(host)} s/token"
            )
        return lines

    def floor_s(self, fmt: str) -> float | None:
        return self.stream_bytes[fmt] / 1e9 / self.bw["pinned"] if self.bw and fmt in self.stream_bytes else None

    def table(self) -> list[str]:
        vram = self.rows.get("vram", {})
        head = "| engine | what | load s | first s | prefill s | prefill x VRAM | decode s/tok (n) | tok/s | x floor "
        head += "| decode x VRAM | peak alloc GiB | after load GiB | tokens = VRAM's | status |"
        lines = [head, "|" + "---|" * 14]
        for name, r in self.rows.items():
            fmt = next((f for f in ("bf16", "int8", "int4") if name.startswith(f)), "bf16")
            dec, pre = r.get("decode_s"), r.get("prefill_s")
            n = len(r.get("decode_steps", []))
            floor = self.floor_s(fmt) if name != "vram" and name != "hf_vram" else None
            status = r.get("status", "")
            if r.get("note"):
                status += f"; {r['note']}"
            if r.get("error"):
                status += f"; {r['error'][:160]}"
            lines.append(
                f"| {name} | {WHAT[name]} | {_f(r.get('load_s'), 1)} | {_f(r.get('first_s'))} | {_f(pre)} | "
                f"{_f(_ratio(pre, vram.get('prefill_s')), 2)} | {_f(dec, 4)} ({n}) | {_f(_ratio(1, dec), 2)} | "
                f"{_f(_ratio(dec, floor), 2)} | {_f(_ratio(dec, vram.get('decode_s')), 1)} | "
                f"{_f(r.get('peak_alloc_gib'), 2)} | {_f(r.get('loaded_alloc_gib'), 2)} | "
                f"{self._same_tokens(name, r)} | {status} |"
            )
        return lines

    def _same_tokens(self, name: str, r: dict) -> str:
        """Ours bf16 lazy must pick the same greedy tokens as ours in VRAM (same weights, same kernels)."""
        want, got = self.rows.get("vram", {}).get("tokens"), r.get("tokens")
        if not name.startswith("bf16") or not want or not got:
            return "-"
        n = min(len(want), len(got))
        return "yes" if want[:n] == got[:n] else f"NO: {got[:n]} vs {want[:n]}"

    def _best(self, fmt: str) -> tuple[str | None, float | None]:
        got = [(r["decode_s"], n) for n, r in self.rows.items() if n.startswith(fmt + "_p") and r.get("decode_s")]
        return (min(got)[1], min(got)[0]) if got else (None, None)

    def goals(self) -> list[str]:
        def line(what: str, value: float | None, goal: str, ok: bool | None) -> str:
            verdict = "not measured" if value is None else ("met" if ok else "NOT met")
            return f"- {what}: {_f(value, 2)} (goal {goal}): {verdict}"

        b_name, b16 = self._best("bf16")
        i_name, i4 = self._best("int4")
        floor = self.floor_s("bf16")
        vram = self.rows.get("vram", {}).get("prefill_s")
        hf = self.rows.get("hf_vram", {}).get("prefill_s")
        pre = self.rows.get(b_name or "", {}).get("prefill_s")
        acc = self.rows.get("accelerate", {}).get("decode_s")
        r1, r2, r3, r4 = _ratio(b16, floor), _ratio(i4, b16), _ratio(pre, vram), _ratio(acc, b16)
        return [
            "Goals of issue 16 (ratios of this run; lazy = the faster prefetch of each format):",
            line(f"bf16 lazy decode ({b_name}) / its PCIe floor", r1, "<= 1.2", r1 is not None and r1 <= 1.2),
            line(
                f"int4 lazy decode ({i_name}) / bf16 lazy decode ({b_name})",
                r2,
                "<= 0.35",
                r2 is not None and r2 <= 0.35,
            ),
            line(
                f"prefill {self.args.prefill}: bf16 lazy ({b_name}) / ours in VRAM",
                r3,
                "<= 1.5",
                r3 is not None and r3 <= 1.5,
            ),
            f"  (bf16 lazy prefill / transformers in VRAM: {_f(_ratio(pre, hf), 2)})",
            line("Accelerate CPU offload decode / bf16 lazy decode", r4, ">= 3", r4 is not None and r4 >= 3),
            "  AirLLM: not installed on the device machine (no internet there): not measured.",
            "  The stress test (every logit equal to the in-VRAM model's) is device_checks.sh's lazy_cuda_stress.",
        ]

    def render(self) -> str:
        took = f"Total: {time.time() - self.start:.0f} s of the {self.args.budget_s:.0f} s budget"
        errors = [f"ERROR: {e}" for e in self.errors]
        parts = [*self.header(), *errors, "", *self.floors(), "", *self.table(), "", *self.goals(), "", took]
        return "\n".join(parts) + "\n"

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "build": self.build,
            "bandwidth_gbps": self.bw,
            "host_read_gbps": self.host,
            "stream_bytes": self.stream_bytes,
            "model_bytes": self.model_bytes,
            "engines": self.rows,
            "device": str(self.device),
            "errors": self.errors,
        }


QWEN_LAYERS = 28
