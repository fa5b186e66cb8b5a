"""A tied-embedding model split without ``b`` still serves its head (issue 15 item 8).

The head of a tied model is the embedding matrix, so converting ``"1-3 e"`` or ``"e"`` must write
what the end part reads (the begin file); from the hub, the embedding's shard must be fetched.
"""

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch

import llm_sepweight as sw


def _hf(ckpt) -> dict[str, torch.Tensor]:
    sd = ckpt.model.state_dict()
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    return sd


@pytest.mark.parametrize("parts", ["1-3 e", "e", "b", "b 0", "0-2 e"])
def test_tied_parts_load(qwen_checkpoints, tmp_path, parts):
    ckpt = qwen_checkpoints("qwen2_tied")
    sw.convert(ckpt.path, tmp_path / "sep", parts=parts, progress=False)
    folder = sw.SepWeights(tmp_path / "sep")
    want = sw.PartSpec.parse(parts)
    assert set(want.layers) <= set(folder.spec.layers) and folder.spec.end == want.end
    assert folder.spec.begin == (want.begin or want.end)  # the tied head is the embedding: it is stored
    got = folder.load(parts).hf_state_dict()
    sd = _hf(ckpt)
    assert got and all(torch.equal(v, sd[k]) for k, v in got.items())
    if want.end:
        assert torch.equal(folder.end()["lm_head.weight"], sd["lm_head.weight"])
        assert torch.equal(folder.rows("end", "lm_head.weight", 5, 9), sd["lm_head.weight"][5:9])
    assert sw.verify(tmp_path / "sep").ok


def test_untied_end_writes_no_begin(qwen_checkpoints, tmp_path):
    sw.convert(qwen_checkpoints("qwen2").path, tmp_path / "sep", parts="1-3 e", progress=False)
    assert not (tmp_path / "sep" / "begin.safetensors").exists()
    assert str(sw.SepWeights(tmp_path / "sep").spec) == "1-3 e"


def test_tied_sepweight_source_split(sep, tmp_path):
    """Re-converting a full tied folder into its end half (no checkpoint needed) keeps the head."""
    path, ckpt = sep("qwen3_tied_sharded")
    sw.convert(path, tmp_path / "end", parts="2 e", progress=False)
    end = sw.load(tmp_path / "end", "2 e").end
    assert torch.equal(end["lm_head.weight"], _hf(ckpt)["lm_head.weight"])


@pytest.fixture
def fake_snapshot_download(tmp_path, monkeypatch):
    """``huggingface_hub.snapshot_download`` over local folders; records every call's allow_patterns."""
    import huggingface_hub

    repos: dict[str, Path] = {}
    calls: list[list[str]] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        assert allow_patterns is not None, "snapshot_download without allow_patterns downloads the whole repo"
        calls.append(list(allow_patterns))
        snap = tmp_path / "hub" / repo_id.replace("/", "--") / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                if not (snap / f.name).exists():  # a cache: a second call copies nothing
                    shutil.copy2(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, calls


def test_hub_tied_end_fetches_the_embedding_shard(qwen_checkpoints, tmp_path, fake_snapshot_download):
    repos, calls = fake_snapshot_download
    ckpt = qwen_checkpoints("qwen3_tied_sharded")
    repos["acme/tied"] = ckpt.path
    sw.convert("acme/tied", tmp_path / "sep", parts="2 e", progress=False)
    weight_map = json.loads((ckpt.path / "model.safetensors.index.json").read_text())["weight_map"]
    fetched = {n for pats in calls for n in set(weight_map.values()) if any(fnmatch.fnmatch(n, p) for p in pats)}
    assert weight_map["model.embed_tokens.weight"] in fetched
    assert fetched < set(weight_map.values())  # still not every shard: layers 0 and 1 are not needed
    end = sw.load(tmp_path / "sep", "2 e").end
    assert torch.equal(end["lm_head.weight"], _hf(ckpt)["lm_head.weight"])


def test_gguf_tied_end_without_begin(tmp_path, monkeypatch):
    """A GGUF without ``output.weight`` (tied head) split as ``"1-2 e"``: same rule, and a re-run is a no-op."""
    pytest.importorskip("gguf")
    from gguf_fixtures import T, linears, tiny_model, write_gguf

    import llm_sepweight.writer as writer

    model = tiny_model("qwen3", tied=True, seed=3)
    path = write_gguf(model, tmp_path / "m.gguf", linears(T.F32))
    first = sw.convert(path, tmp_path / "sep", dtype="fp32", parts="1-2 e", progress=False)
    assert sorted(first.files) == ["begin.safetensors", "end.safetensors", "mid.00001.safetensors"]
    head = sw.SepWeights(tmp_path / "sep").end()["lm_head.weight"]
    torch.testing.assert_close(head, model.model.embed_tokens.weight, atol=0, rtol=0)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sep").iterdir()}
    monkeypatch.setattr(writer.SepweightWriter, "__init__", lambda *a, **k: pytest.fail("re-converted"))
    assert sw.convert(path, tmp_path / "sep", dtype="fp32", parts="1-2 e", progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sep").iterdir()} == before


def test_folder_of_the_old_layout_says_what_to_do(qwen_checkpoints, tmp_path):
    """A tied '1-3 e' folder written before the rule (no begin file) is refused with a clear error."""
    sw.convert(qwen_checkpoints("qwen2_tied").path, tmp_path / "old", parts="1-3 e", progress=False)
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["files"]["begin.safetensors"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "old" / "begin.safetensors").unlink()
    with pytest.raises(sw.SepweightError, match=r"the begin part is not stored here .*convert again"):
        sw.SepWeights(tmp_path / "old").end()
    with pytest.raises(sw.SepweightError, match=r"does not store the begin part \(a tied head is the embedding"):
        sw.convert(tmp_path / "old", tmp_path / "new", parts="2 e", progress=False)
