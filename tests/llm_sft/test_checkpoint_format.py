"""Checkpoint files: no pickle (safetensors + JSON), an exact round trip of a real optimizer state,
damaged files named in the error, and an older llm_sft's state.pt still resumes bit for bit."""

import json
import logging
import shutil

import pytest
import torch
from sft_helpers import checkpointed_run

from llm_sepweight import load_safetensors
from llm_sft import latest_checkpoint, warmup_cosine
from llm_sft.checkpoint import load_checkpoint, save_checkpoint

PICKLE_OR_ZIP = (b"PK\x03\x04", b"\x80")  # torch.save's zip; a pickle of protocol >= 2


def _assert_same(got, want, where="state"):
    """Equal values of the same types: tensors by torch.equal and dtype, dict keys with their types."""
    assert type(got) is type(want) or (isinstance(got, dict) and isinstance(want, dict)), (where, got, want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.cpu(), want.cpu()), where
    elif isinstance(want, dict):
        assert list(got) == list(want) and [type(k) for k in got] == [type(k) for k in want], where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}.{i}")
    else:
        assert got == want, where


def test_a_checkpoint_folder_holds_no_pickle(sep, tmp_path):
    path, _ = sep("qwen2")
    checkpointed_run(path, tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "progress.json", "state.json", "state.safetensors"]
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    for f in files:
        assert not f.read_bytes().startswith(PICKLE_OR_ZIP), f
    tensors = load_safetensors(ckpt / "state.safetensors")
    assert tensors["optimizer.state.0.exp_avg"].dtype == torch.float32
    assert tensors["optimizer.state.0.step"].shape == ()
    assert tensors["rng.cpu.0"].dtype == torch.uint8
    assert any(k.startswith("trainable.") and k.endswith("lora_A.weight") for k in tensors)
    skeleton = json.loads((ckpt / "state.json").read_text())
    assert skeleton["format"] == "llm_sft.checkpoint.state/1"
    assert skeleton["state"]["optimizer"]["param_groups"][0]["betas"] == {"$tuple": [0.9, 0.999]}


def test_a_real_optimizer_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(4, 2).to(torch.bfloat16)})
    opt = torch.optim.AdamW(
        [{"params": model["a"].parameters()}, {"params": model["b"].parameters(), "lr": 0.5, "weight_decay": 0.0}]
    )
    sched = warmup_cosine(opt, 1, 10)
    for _ in range(3):
        x = torch.randn(5, 3)
        model["b"](model["a"](x).to(torch.bfloat16)).float().square().sum().backward()
        opt.step()
        sched.step()
    state = {
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {
            "cpu": [torch.get_rng_state(), torch.get_rng_state()],
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else None,
        },
        "other": {"count": torch.tensor([1, 2**40], dtype=torch.int64), "flag": torch.tensor(True), "none": None},
    }
    assert {v["exp_avg"].dtype for v in state["optimizer"]["state"].values()} == {torch.float32, torch.bfloat16}
    ckpt = save_checkpoint(tmp_path, 3, state, {"step": 3})
    got, progress = load_checkpoint(ckpt)
    _assert_same(got, state)
    assert progress == {"step": 3}

    # and the loaded optimizer steps exactly as the original
    fresh = torch.optim.AdamW(
        [{"params": model["a"].parameters()}, {"params": model["b"].parameters(), "lr": 0.5, "weight_decay": 0.0}]
    )
    fresh.load_state_dict(got["optimizer"])
    _assert_same(fresh.state_dict(), opt.state_dict())


def test_a_state_that_cannot_be_stored_names_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint state 'scheduler.fn': a function cannot be stored"):
        save_checkpoint(tmp_path, 1, {"scheduler": {"fn": lambda s: s}}, {})
    assert latest_checkpoint(tmp_path) is None  # nothing half-written in its place


@pytest.mark.parametrize(
    "damage, file, why",
    [
        (
            lambda c: _truncate(c / "state.safetensors"),
            "state.safetensors",
            "not a valid safetensors file .*truncated.*",
        ),
        (lambda c: (c / "state.json").write_text('{"format": '), "state.json", "Expecting value.*"),
        (lambda c: (c / "state.json").unlink(), "state.json", "the file is missing"),
        (lambda c: _truncate(c / "progress.json"), "progress.json", ".*"),
    ],
)
def test_a_damaged_checkpoint_names_the_file(sep, tmp_path, damage, file, why):
    path, _ = sep("qwen2")
    checkpointed_run(path, tmp_path, stop_at=1)
    ckpt = latest_checkpoint(tmp_path)
    damage(ckpt)
    msg = rf"{file}: this checkpoint cannot be read \({why}\); delete .*step-00000001 to resume from the one before it"
    with pytest.raises(ValueError, match=msg):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match=rf"{file}: this checkpoint cannot be read .*resume=False \(--no-resume\)"):
        checkpointed_run(path, tmp_path)  # what the user meets: sft resuming from it


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _to_legacy(ckpt):
    """Turn a checkpoint into what llm_sft wrote before (torch.save's state.pt), to test reading it back."""
    state, _ = load_checkpoint(ckpt)
    torch.save(state, ckpt / "state.pt")
    (ckpt / "state.safetensors").unlink()
    (ckpt / "state.json").unlink()


def test_an_older_state_pt_resumes_bit_for_bit(sep, tmp_path, caplog):
    path, _ = sep("qwen2")
    want, want_losses = checkpointed_run(path, tmp_path / "a")  # never interrupted

    checkpointed_run(path, tmp_path / "b", stop_at=1)
    _to_legacy(latest_checkpoint(tmp_path / "b"))
    with caplog.at_level(logging.WARNING, logger="llm_sft.checkpoint"):
        got, got_losses = checkpointed_run(path, tmp_path / "b")
    assert "a checkpoint of an older llm_sft (state.pt): read with torch.load(weights_only=True)" in caplog.text
    assert got_losses == want_losses
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ckpt = latest_checkpoint(tmp_path / "b")  # the ones written after the resume: the new format
    assert ckpt.name == "step-00000003" and not (ckpt / "state.pt").exists()


def test_a_truncated_state_pt_names_the_file(sep, tmp_path):
    path, _ = sep("qwen2")
    checkpointed_run(path, tmp_path, stop_at=1)
    ckpt = latest_checkpoint(tmp_path)
    _to_legacy(ckpt)
    _truncate(ckpt / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt: this checkpoint cannot be read \(.*\); delete "):
        load_checkpoint(ckpt)
    shutil.rmtree(ckpt)
    assert latest_checkpoint(tmp_path) is None
