"""Converting from a hub repo id fetches config/tokenizer and only the shards the parts need."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import llm_sepweight as sw


@pytest.fixture
def fake_hub(qwen_checkpoints, tmp_path, monkeypatch):
    import huggingface_hub

    repo = qwen_checkpoints("qwen2_sharded").path
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    fetched: list[str] = []

    def list_repo_files(repo_id, revision=None, **kw):
        assert repo_id == "acme/tiny-qwen"
        return sorted(p.name for p in repo.iterdir())

    def hf_hub_download(repo_id, filename, revision=None, **kw):
        fetched.append(filename)
        shutil.copy(repo / filename, cache / filename)
        return str(cache / filename)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return repo, fetched


def test_fetches_only_needed_shards(fake_hub, tmp_path, qwen_checkpoints):
    repo, fetched = fake_hub
    sw.convert("acme/tiny-qwen", tmp_path / "sep", parts="b 0", progress=False)
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

    monkeypatch.setattr(huggingface_hub, "list_repo_files", boom)
    with pytest.raises(sw.SepweightError, match=r"cannot list files of hub repo 'acme/missing': OSError: no network"):
        sw.convert("acme/missing", tmp_path / "sep", progress=False)
    assert not Path("acme/missing").exists()
