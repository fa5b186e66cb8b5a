"""Demo step 4: the same question answered from bf16 / int8 / int4 folders side by side.

Each row runs in a fresh process, so its peak RSS (``/proc/self/status``: RssAnon and RssFile, sampled
by benchmarks/_mem.py) is its own: anonymous memory is what the process allocated, file-backed memory
is the mmapped weights the kernel can drop and re-read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
QUESTION = "What is the capital of Japan?"

WORKER = """
import json, sys, time
sys.path[:0] = [{bench!r}, {here!r}]
import torch
torch.set_num_threads({threads})
from _mem import PeakMemory
from llm_lazy_qwen import load_part
from step_chat import load_chat_tokenizer, prompt_ids, stream_answer
folder = __import__("pathlib").Path({folder!r})
tok, ends = load_chat_tokenizer(folder)
ids = prompt_ids(folder, tok, [{{"role": "user", "content": {question!r}}}])
with PeakMemory() as peak:
    part = load_part(folder, "f", lazy={lazy}, dtype={dtype!r}).eval()
    t0 = time.perf_counter()
    new, tok_s = stream_answer(part, tok, ids, ends, {n}, echo=False)
    total = time.perf_counter() - t0
print(json.dumps(dict(tok_s=tok_s, total_s=total, tokens=len(new), answer=tok.decode(new).strip(),
                      anon=peak.anon_above_mb, file=peak.file_above_mb)))
"""


def folder_mb(folder: Path) -> float:
    """Size on disk of a sepweight folder's part files (manifest sizes), in MB."""
    import llm_sepweight as sw

    return sum(f.size for f in sw.SepWeights(folder).manifest.files.values()) / 1e6


def answer_in_child(folder: Path, lazy: bool, dtype: str, n: int, threads: int) -> dict[str, Any]:
    """One row: a fresh process loads ``folder`` and answers QUESTION greedily."""
    code = WORKER.format(
        bench=str(HERE.parent / "benchmarks"),
        here=str(HERE),
        threads=threads,
        folder=str(folder),
        question=QUESTION,
        lazy=lazy,
        dtype=dtype,
        n=n,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {folder.name} worker failed:\n{out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rows: dict[str, tuple[Path, bool]], dtype: str, n: int, threads: int) -> dict[str, dict[str, Any]]:
    """``{label: (folder, lazy)}`` -> each row's size, tokens/s, peak RSS and answer."""
    out = {}
    for label, (folder, lazy) in rows.items():
        out[label] = {"mb": folder_mb(folder), "lazy": lazy, **answer_in_child(folder, lazy, dtype, n, threads)}
    return out


def show_compare(result: dict[str, dict[str, Any]], dtype: str) -> list[tuple[str, str]]:
    """Print step 4's table; return its summary rows."""
    print(f"question: {QUESTION!r}; greedy, {dtype} compute, each row in a fresh process")
    print(f"{'storage':<16}{'on disk MB':>11}{'tokens/s':>10}{'peak RSS anon / file MB':>26}  answer")
    rows = []
    for label, r in result.items():
        rss = f"{r['anon']:.0f} / {r['file']:.0f}"
        print(f"{label:<16}{r['mb']:>11.1f}{r['tok_s']:>10.1f}{rss:>26}  {r['answer'][:60]!r}")
        rows.append(
            (
                f"generate ({label})",
                f"{r['mb']:.0f} MB, {r['tok_s']:.1f} tok/s, peak RSS +{r['anon']:.0f} MB anon / +{r['file']:.0f} MB file",
            )
        )
    answers = {r["answer"] for r in result.values()}
    print("the same answer from every storage" if len(answers) == 1 else f"{len(answers)} different answers")
    return rows
