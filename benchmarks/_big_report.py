"""The tables of bench_bigger_than_ram.py: decode / prefill, SFT, quality, and issue 13's Goals with pass/fail."""

from __future__ import annotations

import argparse
import re
import sys

NAMES = {
    "r": "R: ours bf16, lazy, no limit",
    "hf": "HF transformers, in RAM, no limit",
    "bf16": "ours bf16",
    "bf16_passive": "ours bf16, OMP_WAIT_POLICY=PASSIVE",
    "int8": "ours int8",
    "int4": "ours int4",
    "int8_torch": "ours int8, torch's int8 kernel (llm_bsm_kernel hidden)",
    "int4_torch": "ours int4, torch's int4 kernel (llm_bsm_kernel hidden)",
    "accelerate": "Accelerate disk offload (28 layers on disk)",
    "airllm": "AirLLM 4.0 (device=cpu, prefetching)",
    "sft_r": "R: llm_sft layer-wise, bf16, lazy, no limit",
    "sft_int8": "llm_sft layer-wise, int8 (QLoRA)",
    "sft_int4": "llm_sft layer-wise, int4 (QLoRA)",
    "sft_hfpeft": "HF + PEFT (gradient checkpointing)",
}


def parse_bytes(size: str) -> int:
    m = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)(i?)B?", size.strip(), re.I)
    if not m:
        raise ValueError(f"size {size!r}: use e.g. 7GiB or 7G")
    return int(float(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))  # G = GiB, as memlimit reads it


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


class Report:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: dict[str, dict] = {}
        self.stream_bytes: dict[str, int] = {}  # layers + head per token, by storage format
        self.gbps: dict[tuple[int, bool], float] = {}  # cold read bandwidth by (readers, O_DIRECT)
        self.load_note: dict[str, str] = {}
        self.quality: dict = {}
        self.quality_note = ""
        self.small: dict[str, dict] = {}
        self.budget = parse_bytes(args.budget)

    def add(self, engine: str, res: dict) -> None:
        self.rows[engine] = res
        keys = ("decode_s", "decode_read_gb", "prefill_s", "step_s", "peak_anon_mb", "box_peak_gib", "error", "wall_s")
        print(f"  {engine}: " + ", ".join(f"{k}={res[k]}" for k in keys if k in res), file=sys.stderr, flush=True)

    def _ok(self, e: str) -> dict | None:
        r = self.rows.get(e)
        return r if r and "error" not in r else None

    def floor_s(self, fmt: str) -> tuple[float, float]:
        """(bytes that must be read per token, seconds at the measured cold bandwidth) for a format in the box."""
        must = max(0, self.stream_bytes.get(fmt, 0) - self.budget)
        return must, must / (self.bandwidth() * 1e9)

    def bandwidth(self) -> float:
        """The floor's bandwidth: the fastest cold read measured (1 or as many readers as ours uses at most,
        buffered or O_DIRECT: our streaming times these ways and keeps the fastest, llm_lazy_qwen/read_choice.py)."""
        return max(self.gbps.values())

    def print_decode(self) -> None:
        a = self.args
        if not self.gbps:
            return
        r = self._ok("r")
        bw = ", ".join(
            f"{k} reader{'s' * (k > 1)}{' O_DIRECT' * d} {v:.2f} GB/s" for (k, d), v in sorted(self.gbps.items())
        )
        print(f"## Qwen2.5-7B shape (random bf16, untied head) in a {a.box} box: decode and prefill\n")
        print(
            f"Cold read bandwidth of this disk, measured in this run: {bw} (the floor uses the fastest of these, as our streaming "
            f"picks among these ways: {self.bandwidth():.2f} GB/s). "
            f"Per token: bf16 layers + head {self.stream_bytes.get('bf16', 0) / 1e9:.2f} GB"
            + "".join(f", {f} {self.stream_bytes[f] / 1e9:.2f} GB" for f in ("int8", "int4") if f in self.stream_bytes)
            + f"; budget {a.budget} = {self.budget / 1e9:.2f} GB; floor = max(0, per-token bytes - budget) / bandwidth. "
            f"Decode: median of {a.decode} tokens after a warm-up token, after a {a.prefill}-token prefill "
            f"(itself after a cold 4-token first forward). Our engines in the box: "
            + "; ".join(f"{k}: {v}" for k, v in self.load_note.items())
            + "\n"
        )
        print(
            f"| engine | box | decode s/token | ÷ R | read GB/token | floor s/token | ÷ floor | prefill {a.prefill} s | ÷ R "
            "| prefill read GB | first fwd s (cold) | peak RSS above baseline anon / file MB | box peak GiB | same tokens as R |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        notes: list[str] = []
        for e in (
            "r",
            "hf",
            "bf16",
            "bf16_passive",
            "int8",
            "int8_torch",
            "int4",
            "int4_torch",
            "accelerate",
            "airllm",
        ):
            if e not in self.rows:
                continue
            x = self.rows[e]
            box = "none" if e in ("r", "hf") else a.box
            if "error" in x:
                print(f"| {NAMES[e]} | {box} | failed: {x['error']} (after {x.get('wall_s', 0):.0f} s) |" + " |" * 11)
                continue
            fmt = e.removesuffix("_torch") if e.startswith("int") else "bf16"
            must, fl = self.floor_s(fmt) if box != "none" else (0, 0.0)
            floor = f"{fl:.2f} ({must / 1e9:.1f} GB)" if box != "none" else "-"
            if x.get("partial"):
                notes.append(f"{NAMES[e]}: {x['partial']}")
            same = (
                "-"
                if r is None or e == "r"
                else ("yes" if x["tokens"] == r["tokens"][: len(x["tokens"])] else f"no ({x['tokens'][:4]}...)")
            )
            print(
                f"| {NAMES[e]} | {box} | {x['decode_s']:.2f} | {_f(x['decode_s'] / r['decode_s'] if r else None)} | "
                f"{x['decode_read_gb']:.2f} | {floor} | {_f(x['decode_s'] / fl if fl else None)} | {x['prefill_s']:.1f} | "
                f"{_f(x['prefill_s'] / r['prefill_s'] if r else None)} | {x['prefill_read_gb']:.1f} | {x['first_s']:.1f} | "
                f"{x['peak_anon_mb']:.0f} / {x['peak_file_mb']:.0f} | {_f(x.get('box_peak_gib'))} | {same} |"
            )
        cpu = {e: x["decode_cpu_s"] for e, x in self.rows.items() if "decode_cpu_s" in x}
        if cpu:  # CPU time of the process per token (all its threads): what a shared box cannot inflate by preemption
            rc = cpu.get("r")
            notes.append(
                "decode CPU s/token (process time, median): "
                + ", ".join(f"{e} {c:.2f}" + (f" ({c / rc:.2f}x R)" if rc and e != "r" else "") for e, c in cpu.items())
            )
        print("".join(f"\n- {n}" for n in notes))

    def print_sft(self) -> None:
        a = self.args
        if not any(e.startswith("sft") for e in self.rows):
            return
        r = self._ok("sft_r")
        print(f"## One LoRA SFT step (r=8, all 7 projections, batch 1 x {a.sft_seq}, {a.sft_dtype} compute, AdamW)\n")
        print(
            "| engine | box | step s | ÷ R | read GB in the step | peak RSS above baseline anon / file MB | box peak GiB | loss |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for e in ("sft_r", "sft_int8", "sft_int4", "sft_hfpeft"):
            if e not in self.rows:
                continue
            x = self.rows[e]
            box = "none" if e == "sft_r" else a.box
            if "error" in x:
                print(
                    f"| {NAMES[e]} | {box} | failed: {x['error']} (after {x.get('wall_s', 0):.0f} s, box peak {_f(x.get('box_peak_gib'))} GiB) | | | | | |"
                )
                continue
            print(
                f"| {NAMES[e]} | {box} | {x['step_s']:.1f} | {_f(x['step_s'] / r['step_s'] if r else None)} | "
                f"{x['step_read_gb']:.1f} | {x['peak_anon_mb']:.0f} / {x['peak_file_mb']:.0f} | {_f(x.get('box_peak_gib'))} | "
                f"{x['losses'][-1]:.4f} |"
            )
        print()

    def print_quality(self) -> None:
        q = self.quality
        if not q:
            return
        print("## Quality: SmolLM2-135M-Instruct perplexity on `pydoc_data.topics`\n")
        if "ppl" not in q:
            print(f"failed: {q.get('error')}\n")
            return
        print(
            f"{q['tokens']} tokens, one sequence, {q['dtype']} compute. Source: {q['gguf']} (the published file is "
            "itself Q4_1: the bf16 baseline is that GGUF dequantized, so every row carries Q4_1's error; int8 / int4 "
            "are re-quantized from the bf16 folder).\n"
        )
        if self.quality_note:
            print(f"({self.quality_note}, {q.get('seconds', 0) / 60:.0f} min.)\n")
        print("| storage | perplexity | vs ours bf16 |")
        print("|---|---|---|")
        labels = {
            "hf_bf16": "transformers, bf16 HF folder (oracle)",
            "bf16": "ours bf16",
            "int8": "ours int8 (per channel)",
            "int4": "ours int4 (default scales)",
            "int4_rtn": "int4 plain RTN",
        }
        b = q["ppl"].get("bf16")
        for k, lab in labels.items():
            if k in q["ppl"]:
                p = q["ppl"][k]
                print(f"| {lab} | {p:.4f} | {_f((p / b - 1) * 100 if b else None, '+.2f')}% |")
            elif k in q.get("errors", {}):
                print(f"| {lab} | failed: {q['errors'][k]} | |")
        print()

    def goals(self) -> list[tuple[str, str, bool | None]]:
        """(goal, measured, pass) for issue 13's Goals; None = not measured in this run."""
        g: list[tuple[str, str, bool | None]] = []
        d = {e: self._ok(e)["decode_s"] for e in ("r", "bf16", "int8", "int4", "accelerate", "airllm") if self._ok(e)}
        r = d.get("r")
        for fmt, lim in (("int8", 0.8), ("int4", 0.5)):
            ok = fmt in d and r is not None
            g.append(
                (
                    f"{fmt} decode <= {lim}x R",
                    f"{d[fmt] / r:.2f}x" if ok else "not run",
                    d[fmt] / r <= lim if ok else None,
                )
            )
        if "bf16" in d:
            must, fl = self.floor_s("bf16")
            got = self.rows["bf16"]["decode_read_gb"] * 1e9
            g.append(
                (
                    "bf16 (budget) decode <= 1.3x its floor",
                    f"{d['bf16'] / fl:.2f}x" if fl else "floor 0",
                    d["bf16"] / fl <= 1.3 if fl else None,
                )
            )
            g.append(
                (
                    "bf16 reads <= (model - budget) + 5% per token",
                    f"{got / 1e9:.2f} GB vs {must / 1e9:.2f} GB + 5%",
                    got <= must * 1.05,
                )
            )
        else:
            g += [
                ("bf16 (budget) decode <= 1.3x its floor", "not run", None),
                ("bf16 reads <= (model - budget) + 5%", "not run", None),
            ]
        for fmt, lim in (("int8", 10), ("int4", 10), ("bf16", 1.5)):
            for anchor in ("accelerate", "airllm"):
                ok = fmt in d and anchor in d
                g.append(
                    (
                        f"{fmt} >= {lim}x faster than {anchor} per token",
                        f"{d[anchor] / d[fmt]:.1f}x" if ok else "not run",
                        d[anchor] / d[fmt] >= lim if ok else None,
                    )
                )
        s4, sr = self._ok("sft_int4"), self._ok("sft_r")
        ok = s4 is not None and sr is not None
        g.append(
            (
                "SFT step int4 in the box <= 1.5x R's bf16 step",
                f"{s4['step_s'] / sr['step_s']:.2f}x" if ok else "not run",
                s4["step_s"] / sr["step_s"] <= 1.5 if ok else None,
            )
        )
        hp = self.rows.get("sft_hfpeft")
        g.append(
            (
                "HF + PEFT cannot train the model in the box (no step within its timeout)",
                hp.get("error", "it ran") if hp else "not run",
                ("error" in hp) if hp else None,
            )
        )
        p = self.quality.get("ppl", {})
        if {"bf16", "int8"} <= p.keys():
            inc = p["int8"] / p["bf16"] - 1
            g.append(("int8 perplexity within +0.5% of bf16", f"{inc * 100:+.2f}%", inc <= 0.005))
        else:
            g.append(("int8 perplexity within +0.5% of bf16", "not run", None))
        if {"bf16", "int4", "int4_rtn"} <= p.keys():
            ours, rtn = p["int4"] / p["bf16"] - 1, p["int4_rtn"] / p["bf16"] - 1
            g.append(
                (
                    "our int4 increase <= half of plain RTN's",
                    f"{ours * 100:+.2f}% vs RTN {rtn * 100:+.2f}%",
                    ours <= rtn / 2,
                )
            )
        else:
            g.append(("our int4 increase <= half of plain RTN's", "not run", None))
        hf, lz = self.small.get("hf", {}), self.small.get("lazy", {})
        ok = "decode_s" in hf and "decode_s" in lz
        g.append(
            (
                "unchanged: 0.5B shape lazy decode <= 1.25x HF in RAM",
                f"{lz['decode_s'] / hf['decode_s']:.2f}x ({lz['decode_s']:.3f} vs {hf['decode_s']:.3f} s)"
                if ok
                else "not run",
                lz["decode_s"] / hf["decode_s"] <= 1.25 if ok else None,
            )
        )
        return g

    def print(self, build_s: dict[str, float], load_after: str, wall_s: float) -> None:
        self.print_decode()
        self.print_sft()
        self.print_quality()
        print("## Goals (issue 13)\n")
        print("| goal | measured | pass |")
        print("|---|---|---|")
        for goal, got, ok in self.goals():
            print(f"| {goal} | {got} | {'-' if ok is None else ('**pass**' if ok else '**FAIL**')} |")
        print()
        built = ", ".join(f"{k} {v:.0f} s" for k, v in build_s.items())
        print(
            f"Files built in this run: {built or 'none (already there)'}. loadavg after: {load_after}; wall {wall_s / 60:.1f} min."
        )
        for e, x in self.rows.items():
            if x.get("box_line"):
                # cgroup v1's cache / rss split reads 0 once the box is empty: keep the peak
                line = re.sub(r"total_\w+ [0-9.]+ GiB\s+", "", x["box_line"])
                print(f"- {e}: memlimit {line}")
