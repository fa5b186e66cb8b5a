"""Issue 16, first measurement: a Qwen2.5-7B-shaped model streamed into limited VRAM vs in VRAM vs Accelerate.

One run on one GPU machine, built to fit one device call (``benchmarks/device/bench_gpu.sh``), with a
hard time budget (``--budget-s``): every step gets what is left of it and the table is always printed.

1. The PCIe floor: pinned (and pageable) host -> device bandwidth, 1 GiB copies, median of 5.
2. The model, built on the machine's disk (``_gpu_build.py``: random bf16 weights drawn on the GPU, and
   int8 / int4 rtn g64 folders quantized from them in the same pass; warm page cache). When the build
   would pass ``--build-max-s`` it stops at fewer layers and the output says so.
3. The host side of streaming: ``readinto`` of cached layer files into a pinned buffer (1 and 4 threads).
4. Engines, each in its own process (``_gpu_child.py``): load, a 4-token first forward, a
   ``--prefill``-token prefill, a warm-up token, then up to ``--decode`` timed tokens (median), and
   ``torch.cuda.max_memory_allocated``: ours in VRAM (load_part, RAM mode on the device: the ceiling),
   ours lazy (copy mode, prefetch 1 and 2) over the bf16 / int8 / int4 folders, Accelerate with
   ``max_memory={gpu: --accelerate-gib}`` (the layers that do not fit offloaded to the CPU), and
   transformers with the whole model in VRAM. AirLLM is not installed on the device machine. Optional
   (``--engines ...,bf16_res``): lazy bf16 with ``resident_mb=2500`` (about Accelerate's 4 GiB in all).
5. The table, the floors, and issue 16's goals as ratios of this run; also ``$OUT/bench_gpu.txt`` / ``.json``.

    python benchmarks/bench_gpu.py [--tiny] [--budget-s 330] [--engines vram,bf16_p1,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import torch
from _gpu_build import FORMATS, QWEN7B, TINY, build, complete
from _gpu_report import Report

LAZY = {"stream_mode": "copy"}
# name -> (child config, cap in seconds); run in this order (the goals' inputs first)
ENGINES: dict[str, tuple[dict, int]] = {
    "vram": ({"engine": "ours", "fmt": "bf16", "load_kw": {}}, 60),
    "bf16_p1": ({"engine": "ours", "fmt": "bf16", "load_kw": LAZY | {"lazy": True, "prefetch": 1}}, 60),
    "int4_p1": ({"engine": "ours", "fmt": "int4", "load_kw": LAZY | {"lazy": True, "prefetch": 1}}, 45),
    "int8_p1": ({"engine": "ours", "fmt": "int8", "load_kw": LAZY | {"lazy": True, "prefetch": 1}}, 50),
    "bf16_p2": ({"engine": "ours", "fmt": "bf16", "load_kw": LAZY | {"lazy": True, "prefetch": 2}}, 60),
    "int4_p2": ({"engine": "ours", "fmt": "int4", "load_kw": LAZY | {"lazy": True, "prefetch": 2}}, 45),
    "accelerate": ({"engine": "accelerate", "fmt": "bf16"}, 75),
    "hf_vram": ({"engine": "hf", "fmt": "bf16"}, 60),
    "int8_p2": ({"engine": "ours", "fmt": "int8", "load_kw": LAZY | {"lazy": True, "prefetch": 2}}, 50),
}
# not run unless named in --engines: lazy bf16 with ~2.4 GiB of layers kept in VRAM for good (with its streaming
# buffers, about Accelerate's 4 GiB)
EXTRA = {"bf16_res": ({"engine": "ours", "fmt": "bf16", "load_kw": LAZY | {"lazy": True, "resident_mb": 2500}}, 60)}
REPORT_S = 8  # kept back for the report


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pcie(device: torch.device, nbytes: int, reps: int = 5) -> dict[str, float]:
    """Host -> device GB/s, pinned and pageable: the median of `reps` copies after one warm-up."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind in ("pinned", "pageable"):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        times = []
        for _ in range(reps + 1):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=kind == "pinned")
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[kind] = nbytes / statistics.median(times[1:]) / 1e9
        del src
    return out


def host_read(files: list[Path], pin: bool) -> dict[str, float]:
    """GB/s of readinto (page cache -> one (pinned) buffer), 1 and 4 threads: the host side of copy mode."""
    size = max(p.stat().st_size for p in files)
    out = {}
    for threads in (1, 4):
        buf = torch.empty(size * threads, dtype=torch.uint8, pin_memory=pin)
        mv = memoryview(buf.numpy())

        def read(t: int, mine: list[Path], mv: memoryview = mv) -> None:
            for p in mine:
                with open(p, "rb", buffering=0) as f:
                    f.readinto(mv[t * size : t * size + p.stat().st_size])

        t0 = time.perf_counter()
        workers = [threading.Thread(target=read, args=(t, files[t::threads])) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out[f"{threads}_threads"] = sum(p.stat().st_size for p in files) / (time.perf_counter() - t0) / 1e9
    return out


def run_child(name: str, cfg: dict, timeout: float, errlog: Path) -> dict:
    """One engine in its own process; the last JSON line it printed (a partial one when it timed out)."""
    cmd = [sys.executable, str(HERE / "_gpu_child.py"), json.dumps(cfg)]
    t0 = time.perf_counter()
    with open(errlog, "a") as err:
        err.write(f"\n===== {name}: {json.dumps(cfg)}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            status = f"timeout {timeout:.0f}s"
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    res.update(status=status, wall_s=time.perf_counter() - t0)
    if status != "ok":
        tail = [ln for ln in errlog.read_text().splitlines()[-40:] if ln.strip()]
        res["error"] = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
    return res


def optional(rep: Report, what: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """A measurement the engines do not need: its failure is reported, not fatal."""
    try:
        return measure()
    except Exception as e:
        log(traceback.format_exc())
        rep.errors.append(f"{what}: {type(e).__name__}: {e}")
        return {}


def prepare(args: argparse.Namespace, rep: Report, work: Path, device: torch.device, shape: dict) -> dict[str, Path]:
    """The PCIe floor, the model's folders (built or reused), their byte counts, the host read rate."""
    if device.type == "cuda":
        log("PCIe bandwidth ...")
        rep.bw = optional(rep, "PCIe bandwidth", lambda: pcie(device, (64 << 20) if args.tiny else (1 << 30)))
    if complete(work) and json.loads((work / "sep-bf16" / "config.json").read_text())["hidden_size"] == shape["hidden"]:
        log(f"reusing the folders in {work}")
        rep.build = {
            "reused": True,
            "layers": json.loads((work / "sep-bf16" / "config.json").read_text())["num_hidden_layers"],
        }
    else:
        for f in FORMATS:
            shutil.rmtree(work / f"sep-{f}", ignore_errors=True)
        max_s = args.build_max_s if args.build_max_s is not None else 0.3 * args.budget_s
        log(f"building the model in {work} (at most {max_s:.0f} s) ...")
        rep.build = build(work, shape, device, max_s, log=log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sep = {f: work / f"sep-{f}" for f in FORMATS}
    for f, d in sep.items():  # what a lazy decode token streams: every layer and the end (embedding: rows)
        streamed = sum(p.stat().st_size for p in d.glob("mid.*.safetensors")) + (d / "end.safetensors").stat().st_size
        rep.stream_bytes[f], rep.model_bytes[f] = streamed, sum(p.stat().st_size for p in d.glob("*.safetensors"))
    layers = sorted(sep["bf16"].glob("mid.*.safetensors"))[:8]
    rep.host = optional(rep, "host read rate", lambda: host_read(layers, device.type == "cuda"))

    return sep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (tests the script, CPU is fine)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_GPU_BUDGET_S", 330)))
    ap.add_argument("--build-max-s", type=float, default=None, help="default: 30%% of the budget")
    ap.add_argument("--layers", type=int, default=None, help="build fewer layers than the shape's")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}, in this order")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=8, help="timed decode tokens (after one warm-up token)")
    ap.add_argument("--accelerate-gib", type=float, default=4.0, help="Accelerate's max_memory on the GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each engine (default torch's)")
    ap.add_argument("--work", default=os.environ.get("BENCH_GPU_WORK", "/tmp/bench_gpu"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_gpu_out"))
    ap.add_argument("--keep", action="store_true", help="keep the model folders (reused by the next run)")
    args = ap.parse_args()
    start = time.time()
    left = lambda: args.budget_s - (time.time() - start)  # noqa: E731
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES) - set(EXTRA)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES) + list(EXTRA)}")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    errlog = out / "bench_gpu_children.log"
    errlog.write_text("")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(TINY if args.tiny else QWEN7B)
    if args.layers:
        shape["layers"] = min(args.layers, shape["layers"])
    rep = Report(args, device, shape, start)

    try:
        sep = prepare(args, rep, work, device, shape)
    except Exception as e:  # the table is printed whatever happens; the error is in it
        log(traceback.format_exc())
        rep.errors.append(f"preparation failed: {type(e).__name__}: {e}")
        engines, sep = [], {}

    for name in engines:
        base, cap = (ENGINES | EXTRA)[name]
        timeout = min(cap, left() - REPORT_S)
        if timeout < 15:
            rep.rows[name] = {"status": "not run: time budget spent"}
            continue
        cfg = base | {"name": name, "sep": str(sep[base["fmt"]]), "device": str(device)}
        cfg |= {"prefill": args.prefill, "decode": args.decode, "accelerate_gib": args.accelerate_gib}
        cfg["deadline"] = time.time() + timeout - max(5.0, 0.15 * timeout)
        if args.threads:
            cfg["threads"] = args.threads
        log(f"{name} (timeout {timeout:.0f} s) ...")
        rep.rows[name] = run_child(name, cfg, timeout, errlog)
        log(f"{name}: {rep.rows[name].get('status')} decode {rep.rows[name].get('decode_s')}")

    text = rep.render()
    print(text)
    (out / "bench_gpu.txt").write_text(text)
    (out / "bench_gpu.json").write_text(json.dumps(rep.to_json(), indent=1))
    if not args.keep:
        for d in sep.values():
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
