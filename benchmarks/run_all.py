"""Run every benchmarks/bench_*.py and rewrite BENCHMARKS.md with their output.

    hatch run bench:all                 # all benchmarks
    hatch run bench:all sepweight       # only those whose file name contains "sepweight"

Each section keeps the exact command that produced it. Sections of benchmarks that were not run
this time are kept from the previous BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure below is printed by a script in `benchmarks/`; ratios compare against an anchor measured\nin the same run. Regenerate everything with `hatch run bench:all`.\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^<!-- bench: (\S+) -->\n", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def main() -> int:
    wanted = sys.argv[1:]
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not wanted or any(w in p.name for w in wanted))
    old = sections(OUT.read_text()) if OUT.exists() else {}
    new: dict[str, str] = {}
    for script in scripts:
        cmd = f"python benchmarks/{script.name}"
        print(f"running {cmd}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent)
        took = time.perf_counter() - t0
        body = (
            proc.stdout.strip()
            if proc.returncode == 0
            else f"FAILED (exit {proc.returncode}):\n```\n{proc.stderr[-3000:]}\n```"
        )
        stamp = time.strftime("%Y-%m-%d")
        new[script.stem] = f"Command: `{cmd}` ({stamp}, {took:.0f} s; {machine()})\n\n{body}\n\n"
        print(body)
    merged = {**old, **new}
    text = HEADER + "".join(f"\n<!-- bench: {k} -->\n{v}" for k, v in sorted(merged.items()))
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
