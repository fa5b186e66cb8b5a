"""Converting from a hub repo id fetches config/tokenizer and only the shards the parts need."""

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch

import llm_sepweight as sw


@pytest.fixture
def fake_hub(qwen_checkpoints, tmp_path, monkeypatch):
    """``snapshot_download`` over a local checkpoint, a cache in tmp_path; records what each call fetched."""
    import huggingface_hub

    repo = qwen_checkpoints("qwen2_sharded").path
    cache = tmp_path / "hub-cache" / ("0" * 40)
    cache.mkdir(parents=True)
    fetched: list[str] = []
    calls: list[list[str]] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        assert repo_id == "acme/tiny-qwen" and allow_patterns is not None
        calls.append(list(allow_patterns))
        for f in sorted(repo.iterdir()):
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns) and not (cache / f.name).exists():
                fetched.append(f.name)
                shutil.copy2(f, cache / f.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repo, fetched, calls


def test_fetches_only_needed_shards(fake_hub, tmp_path, qwen_checkpoints):
    repo, fetched, calls = fake_hub
    sw.convert("acme/tiny-qwen", tmp_path / "sep", parts="b 0", progress=False)
    assert len(calls) == 2  # config/tokenizer/index, then every needed shard in one call
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if k == "model.embed_tokens.weight" or k.startswith("model.layers.0.")}
    shards = {f for f in fetched if f.endswith(".safetensors")}
    assert shards == needed and len(needed) < len(set(weight_map.values()))
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(fetched)
    sd = qwen_checkpoints("qwen2_sharded").model.state_dict()
    part = sw.load(tmp_path / "sep", "b 0")
    for k, v in part.hf_state_dict().items():
        assert torch.equal(v, sd[k])


def test_hub_errors_name_the_repo(monkeypatch, tmp_path):
    import huggingface_hub

    def boom(repo_id, revision=None, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(
        sw.SepweightError, match=r"cannot download config.json from hub repo 'acme/missing': OSError: no network"
    ):
        sw.convert("acme/missing", tmp_path / "sep", progress=False)
    assert not Path("acme/missing").exists()
