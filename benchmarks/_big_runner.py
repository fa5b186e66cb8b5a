"""Running bench_bigger_than_ram.py's children: in a memory box, with their files evicted; the floor.

A child runs under ``../shared/tools/memlimit BOX --evict FILES -- timeout -s KILL T python child.py CFG``
(or with no box, its files evicted here first). Its last stdout line is its JSON result; memlimit's last
stderr line (cgroup peak, anon/file split, exit status) is kept with it.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
MEMLIMIT = HERE.parent.parent / "shared" / "tools" / "memlimit"


def evict(path: Path) -> None:
    """Drop a file or folder's pages from the page cache (posix_fadvise DONTNEED)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run_child(
    script: str,
    cfg: dict,
    box: str | None,
    files: list[Path],
    timeout_s: int,
    python: str = sys.executable,
    log: Path | None = None,
) -> dict:
    """Run ``script`` with ``cfg`` (JSON) in its own process; the JSON it prints plus run facts."""
    cmd = ["timeout", "-s", "KILL", str(timeout_s), python, str(HERE / script), json.dumps(cfg)]
    if box is not None:
        ev = [a for f in files for a in ("--evict", str(f))]
        cmd = [str(MEMLIMIT), box, *ev, "--", *cmd]
    else:
        for f in files:
            evict(f)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if log is not None:
        with open(log, "a") as f:
            f.write(
                f"### {cfg.get('engine')} rc={out.returncode} wall={wall:.0f}s\n{out.stdout}\n{out.stderr[-4000:]}\n"
            )
    err_lines = out.stderr.strip().splitlines()
    box_line = next((ln for ln in reversed(err_lines) if ln.startswith("memlimit:")), "")
    res: dict = {}
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode == 0 and last.startswith("{"):
        res = json.loads(last)
    elif last.startswith("{") and json.loads(last).get("decode_steps"):  # cut short: the tokens it made
        res = json.loads(last)
        steps, reads = res.pop("decode_steps"), res.pop("decode_reads")
        res.update(decode_steps=steps, decode_s=statistics.median(steps), decode_read_gb=statistics.median(reads) / 1e9)
        res["partial"] = f"killed by the {timeout_s} s timeout after {len(steps)} of {cfg.get('decode')} decode tokens"
    else:
        why = f"exit {out.returncode}"
        if out.returncode in (124, 137, -9):
            why = (
                f"killed by the {timeout_s} s timeout" if wall >= timeout_s - 2 else "killed (out of memory in the box)"
            )
        tail = [ln for ln in err_lines if not ln.startswith("memlimit:") and " Killed " not in ln]
        res["error"] = why if "timeout" in why or not tail else f"{why}; {tail[-1][:200]}"
    res["wall_s"] = wall
    res["box_line"] = box_line.removeprefix("memlimit: ")
    m = re.search(r"peak ([0-9.]+) GiB", box_line)
    res["box_peak_gib"] = float(m[1]) if m else None
    return res


def cold_read_gbps(files: list[Path], readers: int, direct: bool = False, chunk: int = 16 * 2**20) -> float:
    """Read `files` right after evicting them, `readers` threads each taking every readers-th file.

    ``direct``: ``O_DIRECT`` preads into an aligned buffer (no page cache, as our budget streaming reads),
    in 2 MiB pages (``llm_sepweight.read_buffer``, as ours): into 4 KiB pages the requests are smaller
    and, on the virtio disk of BENCHMARKS.md, half as fast.
    """
    from llm_sepweight import read_buffer

    for f in files:
        evict(f)
    total = [0] * readers

    def read(i: int) -> None:
        buf = read_buffer(chunk).numpy() if direct else mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        for p in files[i::readers]:
            fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                off = 0
                while n := os.preadv(fd, [buf], off):
                    off += n
                total[i] += off
            finally:
                os.close(fd)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gbps = sum(total) / (time.perf_counter() - t0) / 1e9
    for f in files:
        evict(f)
    return gbps
