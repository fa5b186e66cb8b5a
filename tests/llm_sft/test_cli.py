"""llm-sft train end to end on a tiny HF checkpoint: PEFT adapter (loads in PEFT, same logits), loss log, PNG."""

import copy
import csv
import json
import re
import struct

import pytest
import torch

from llm_lazy_qwen import load_part
from llm_lora_mmap import load_adapter
from llm_sft.cli import main

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "then",
    "the",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_data(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            pick = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g)]
            f.write(
                json.dumps(
                    {
                        "instruction": " ".join(pick[:4]),
                        "input": "",
                        "output": " ".join(pick[4:]),
                    }
                )
                + "\n"
            )


def test_train_writes_a_peft_adapter_loss_log_and_curve(qwen_checkpoints, tmp_path, capsys):
    ckpt = qwen_checkpoints("qwen2")
    _write_data(tmp_path / "train.jsonl", 10, seed=0)
    _write_data(tmp_path / "val.jsonl", 3, seed=1)
    out = tmp_path / "adapter"
    args = [
        "train",
        "--model",
        str(ckpt.path),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--eval-data",
        str(tmp_path / "val.jsonl"),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "sep"),
        "--max-seq-len",
        "64",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--epochs",
        "2",
        "--r",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-2",
        "--lazy",
        "--no-progress",
        "--save-every",
        "2",
    ]
    assert main(args) == 0
    assert "llm-sft: 10 examples (0 truncated, 0 dropped), 6 steps" in capsys.readouterr().err
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss_log.csv",
        "loss_log.json",
        "loss_curve.png",
        "train_config.json",
    ):
        assert (out / name).is_file(), name
    rows = _rows(out / "loss_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert [r["eval_loss"] != "" for r in rows] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert json.loads((out / "loss_log.json").read_text())[2]["eval_loss"] == pytest.approx(float(rows[2]["eval_loss"]))
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (
        640,
        400,
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")

    from peft import PeftModel

    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ckpt.model), str(out)).eval()
    ours = load_part(tmp_path / "sep", "f")
    load_adapter(ours, out)
    ours.eval()  # after load_adapter: its new LoRA modules start in train mode (dropout on)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours(ids), ckpt.model(ids).logits, atol=1e-3)  # training changed something

    assert (
        main([*args[:-2], "--save-every", "2", "--epochs", "2"]) == 0
    )  # everything done: resumes at the end, trains nothing
    assert len(_rows(out / "loss_log.csv")) == 6


def test_errors_are_one_line_and_exit_2(sep, tmp_path, capsys):
    path, _ = sep("qwen2")  # a sepweight folder works as --model too
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "output": "x"}\n')
    assert (
        main(
            [
                "train",
                "--model",
                str(path),
                "--data",
                str(tmp_path / "bad.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("llm-sft: error: ") and "column 'instruction' is missing in 1 of 1 records" in err


def _small_run(ckpt, tmp_path, *extra):
    return [
        "train",
        "--model",
        str(ckpt.path),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "sep"),
        "--max-seq-len",
        "64",
        "--batch-size",
        "2",
        "--r",
        "2",
        "--no-progress",
        *extra,
    ]


def test_a_nan_loss_still_writes_the_config_log_and_adapter(qwen_checkpoints, tmp_path, capsys):
    """A diverged run (NaN loss) crashed in the loss plot before train_config.json was written."""
    ckpt = qwen_checkpoints("qwen2")
    _write_data(tmp_path / "train.jsonl", 6, seed=0)
    with pytest.warns(UserWarning, match=r"steps have a NaN or infinite loss"):
        assert main(_small_run(ckpt, tmp_path, "--lr", "1e30", "--max-grad-norm", "0")) == 0
    out = tmp_path / "out"
    rows = _rows(out / "loss_log.csv")
    assert rows[-1]["loss"] == "nan"
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e30
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "final loss nan" in capsys.readouterr().err


def test_resume_with_other_data_template_max_seq_len_or_lora_is_refused(qwen_checkpoints, tmp_path, capsys):
    ckpt = qwen_checkpoints("qwen2")
    _write_data(tmp_path / "train.jsonl", 4, seed=0)
    assert main(_small_run(ckpt, tmp_path)) == 0
    capsys.readouterr()
    for extra, changed in (
        (["--max-seq-len", "48"], r"--max-seq-len: 64 -> 48"),
        (["--template", "chatml"], r"--template: auto -> chatml"),  # the same tokens here: the flag names it
        (["--alpha", "4"], r"lora \(r, lora_alpha, use_rslora, lora_dropout\): .* --alpha: 16 -> 4.0"),
        (["--targets", "q_proj"], r"--targets: q_proj,k_proj,.*,down_proj -> q_proj"),
    ):
        assert main(_small_run(ckpt, tmp_path, *extra)) == 2, extra  # the last --flag given wins
        err = capsys.readouterr().err
        assert re.search(rf"llm-sft: error: .*step-00000002 was written with other settings \(.*{changed}", err), err
        assert "resume with the same ones, or pass resume=False (--no-resume)" in err
    _write_data(tmp_path / "train.jsonl", 4, seed=1)  # the same file name, other content
    assert main(_small_run(ckpt, tmp_path)) == 2
    assert "--data (sha256): " in capsys.readouterr().err
    _write_data(tmp_path / "train.jsonl", 4, seed=0)
    assert main(_small_run(ckpt, tmp_path)) == 0  # the same run again: resumes, nothing to do
