"""Converting more parts into a folder (outside review): "b 0-1" then "b 0-3" writes layers 1-2 and keeps
the files already written for the same source and options, instead of rewriting them all."""

import pytest
import torch

import llm_sepweight as sw


def _stamps(root):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*.safetensors")}


@pytest.mark.parametrize("name", ["qwen2", "qwen2_sharded"])
def test_more_layers_keep_the_written_ones(qwen_checkpoints, tmp_path, name):
    ckpt = qwen_checkpoints(name)
    dst = tmp_path / "sep"
    sw.convert(ckpt.path, dst, parts="b 0-1", progress=False)
    kept = _stamps(dst)
    m = sw.convert(ckpt.path, dst, parts="b 0-3 e", progress=False)
    assert m.source["parts"] == "b 0-3 e" and list(m.files) == [
        "begin.safetensors",
        "mid.00000.safetensors",
        "mid.00001.safetensors",
        "mid.00002.safetensors",
        "end.safetensors",
    ]
    now = _stamps(dst)
    assert {k: now[k] for k in kept} == kept  # begin and layer 0 not rewritten
    assert sw.verify(dst).ok
    want = ckpt.model.state_dict()
    got = sw.load(dst).hf_state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)


def test_other_options_or_changed_weights_rewrite_them(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "sep"
    sw.convert(ckpt.path, dst, parts="b 0-1", progress=False)
    kept = _stamps(dst)
    m = sw.convert(ckpt.path, dst, parts="b 0-2", dtype="bf16", progress=False)
    now = _stamps(dst)
    assert all(now[k] != v for k, v in kept.items())
    assert m.dtype == "bfloat16" and sw.verify(dst).ok
