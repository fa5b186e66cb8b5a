"""--memory-budget in the CLIs that load parts: llm-pipeline generate and llm-sft train."""

import csv
import json

import pytest

from llm_pipeline.cli import main as pipeline_main
from llm_sft.cli import main as sft_main


@pytest.fixture
def single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _generate(path, capsys, *extra):
    argv = ["generate", "--model", str(path), "--prompt-ids", "5 9 13 2", "--prompt-ids", "7 1"]
    argv += ["--max-new-tokens", "5", "--temperature", "0", "--json", *extra]
    assert pipeline_main(argv) == 0
    out = capsys.readouterr()
    return [json.loads(line)["new_ids"] for line in out.out.splitlines()], out.err


def test_pipeline_generate_with_a_budget_equals_ram(sep, capsys, single_process):
    path, _ = sep("qwen2")
    want, _ = _generate(path, capsys)
    got, err = _generate(path, capsys, "--memory-budget", "1.4MB", "--max-context", "64")
    assert got == want
    plan = err.split("llm-pipeline rank 0: memory plan: budget ")[1].splitlines()[0]
    assert "items resident" in plan and " 0 streamed" not in plan  # slabs + the head chunks


def test_pipeline_generate_prefills_a_prompt_longer_than_max_tokens_in_chunks(sep, capsys, single_process):
    path, _ = sep("qwen2")
    want, _ = _generate(path, capsys)
    got, err = _generate(path, capsys, "--memory-budget", "1.4MB", "--max-context", "64", "--max-tokens", "2")
    assert got == want  # the padded 4-token prompts went through each rank's cache 2 tokens at a time
    assert "activations of 2-token forwards" in err


def test_pipeline_refuses_a_bad_or_too_small_budget(sep, capsys, single_process):
    path, _ = sep("qwen2")
    with pytest.raises(SystemExit):
        pipeline_main(["generate", "--model", str(path), "--prompt-ids", "1", "--memory-budget", "6 gigs"])
    assert "argument --memory-budget: memory_budget '6 gigs' is not a size" in capsys.readouterr().err
    assert pipeline_main(["generate", "--model", str(path), "--prompt-ids", "1", "--memory-budget", "100KB"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm-pipeline: error: memory_budget 97.7 KiB is too small to run this part")


def _train(path, data, out, *extra):
    argv = ["train", "--model", str(path), "--data", str(data), "--out", str(out), "--batch-size", "2"]
    argv += ["--max-seq-len", "32", "--no-progress", "--head-chunk-size", "128", *extra]
    return sft_main(argv)


def test_sft_train_with_a_budget_equals_ram(sep, tmp_path, capsys):
    path, _ = sep("qwen2")
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w} done"} for w in ("cat", "dog", "fox", "owl")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _train(path, data, tmp_path / "ram") == 0
    assert _train(path, data, tmp_path / "budget", "--memory-budget", "2.4MB") == 0
    plan = capsys.readouterr().err.split("llm-sft: memory plan: budget ")[1].splitlines()[0]
    assert " resident " in plan and "streamed" in plan and "0 streamed" not in plan
    assert "reserved for the caller" in plan  # llm_sft.training_reserve: LoRA + AdamW, saved inputs, backward

    def losses(folder):
        with open(folder / "loss_log.csv", newline="") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    assert losses(tmp_path / "budget") == pytest.approx(losses(tmp_path / "ram"), rel=1e-4, abs=1e-5)
    assert _train(path, data, tmp_path / "small", "--memory-budget", "100KB") == 2
    assert "llm-sft: error: memory_budget 97.7 KiB is too small to run this part" in capsys.readouterr().err
