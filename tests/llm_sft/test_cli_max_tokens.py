"""llm-sft train --memory-budget plans for the training forward itself: one batch of --max-seq-len tokens per row
with no KV cache to chunk through, so load_part gets max_tokens=--max-seq-len (a smaller one would refuse it)."""

import json

import llm_sft.cli as cli
from llm_lazy_qwen import load_part


def test_the_budget_is_planned_for_max_seq_len_tokens_per_row(sep, tmp_path, monkeypatch):
    path, _ = sep("qwen2")
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} done"} for w in ("cat", "dog", "fox")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs, load_part(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(cli, "load_part", spy)
    argv = ["train", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "2"]
    argv += ["--max-seq-len", "48", "--no-progress", "--head-chunk-size", "128", "--memory-budget", "4MB"]
    assert cli.main(argv) == 0
    (kwargs, part), *_ = calls
    assert kwargs["max_tokens"] == kwargs["max_context"] == 48 and kwargs["max_batch"] == 2
    assert part.max_tokens == 48 and part.memory_plan.runtime.tokens == 48
