"""A checkpoint's JSON edited by hand (outside review): a wrong type or value is a ValueError naming the
file and the key, never a TypeError deep in torch's optimizer or scheduler, nor a silently different run."""

import json

import pytest
from sft_helpers import checkpointed_run

from llm_sepweight import load_safetensors, save_safetensors
from llm_sft import latest_checkpoint


def _set(*keys, value=None, drop=False):
    def edit(doc):
        for k in keys[:-1]:
            doc = doc[k]
        if drop:
            del doc[keys[-1]]
        else:
            doc[keys[-1]] = value

    return edit


EDITS = [
    (
        "state.json",
        _set("state", "optimizer", "param_groups", 0, "lr", value="0.01"),
        r"optimizer\.param_groups\.0\.lr",
    ),
    ("state.json", _set("state", "optimizer", "param_groups", 0, "weight_decay", value=None), r"weight_decay"),
    ("state.json", _set("state", "scheduler", "last_epoch", value="1"), r"scheduler\.last_epoch"),
    ("progress.json", _set("step", value="1"), r"'step'"),
    ("progress.json", _set("epoch", value=0.0), r"'epoch'"),
    ("progress.json", _set("groups_done", value=-1), r"'groups_done'"),
    ("progress.json", _set("history", 0, "loss", drop=True), r"'history'"),
    ("progress.json", _set("settings", drop=True), r"'settings'"),
]


@pytest.mark.parametrize("file, edit, key", EDITS, ids=[f"{f}:{k}" for f, _, k in EDITS])
def test_a_hand_edited_checkpoint_names_the_file_and_key(sep, tmp_path, file, edit, key):
    path, _ = sep("qwen2")
    checkpointed_run(path, tmp_path, stop_at=1)
    f = latest_checkpoint(tmp_path) / file
    doc = json.loads(f.read_text())
    edit(doc)
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{file}: this checkpoint cannot be read \(.*{key}.*\); delete "):
        checkpointed_run(path, tmp_path)


def test_an_edit_of_the_right_type_resumes(sep, tmp_path):
    """The check compares kinds, not values: a new learning rate typed as an int is fine (torch takes it)."""
    path, _ = sep("qwen2")
    want = checkpointed_run(path, tmp_path / "a")[1]
    checkpointed_run(path, tmp_path / "b", stop_at=1)
    f = latest_checkpoint(tmp_path / "b") / "state.json"
    doc = json.loads(f.read_text())
    doc["state"]["optimizer"]["param_groups"][0]["betas"] = [0.9, 0.999]  # a list where a tuple was: torch takes it
    f.write_text(json.dumps(doc))
    assert checkpointed_run(path, tmp_path / "b")[1] == want


def test_a_trainable_tensor_of_another_shape_is_refused_not_broadcast(sep, tmp_path):
    """p.copy_ broadcasts: a (1, r) tensor in place of an (out, r) one would have filled every row with it."""
    path, _ = sep("qwen2")
    checkpointed_run(path, tmp_path, stop_at=1)
    f = latest_checkpoint(tmp_path) / "state.safetensors"
    tensors = dict(load_safetensors(f, use_mmap=False))
    key = next(k for k in sorted(tensors) if k.startswith("trainable.") and k.endswith("lora_B.weight"))
    tensors[key] = tensors[key][:1].clone()
    save_safetensors(f, tensors, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"state.safetensors: this checkpoint cannot be read \({key} is not a tensor"):
        checkpointed_run(path, tmp_path)
