"""Every bad input gets a SepweightError naming the file/key and what to do."""

import json
import shutil

import pytest

import llm_sepweight as sw


@pytest.fixture
def src(qwen_checkpoints, tmp_path):
    """A private copy of a sharded checkpoint we may damage."""
    path = tmp_path / "src"
    shutil.copytree(qwen_checkpoints("qwen2_sharded").path, path)
    return path


@pytest.fixture
def single(qwen_checkpoints, tmp_path):
    path = tmp_path / "single"
    shutil.copytree(qwen_checkpoints("qwen2").path, path)
    return path


@pytest.fixture
def sep(qwen_checkpoints, tmp_path):
    path = tmp_path / "sep"
    sw.convert(qwen_checkpoints("qwen2").path, path, progress=False)
    return path


def _shard(src, key="model.layers.1.mlp.up_proj.weight"):
    return src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_truncated_source_data(single, tmp_path):
    f = single / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(
        sw.SepweightError, match=r"model\.safetensors: not a valid safetensors file \(data section truncated"
    ):
        sw.convert(single, tmp_path / "out", progress=False)


def test_corrupted_source_header(src, tmp_path):
    shard = _shard(src)
    raw = bytearray(shard.read_bytes())
    raw[9:12] = b"\x00\xff\x00"
    shard.write_bytes(bytes(raw))
    with pytest.raises(
        sw.SepweightError, match=rf"{shard.name}: not a valid safetensors file \(header is not valid JSON"
    ):
        sw.convert(src, tmp_path / "out", progress=False)


def test_missing_shard_named_in_index(src, tmp_path):
    shard = _shard(src)
    shard.unlink()
    with pytest.raises(
        sw.SepweightError, match=rf"{shard.name}: shard named in model\.safetensors\.index\.json is missing"
    ):
        sw.convert(src, tmp_path / "out", progress=False)


def test_index_lies_about_a_shard(src, tmp_path):
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.1.mlp.up_proj.weight"] = _shard(src, "model.norm.weight").name
    index.write_text(json.dumps(data))
    with pytest.raises(
        sw.SepweightError, match=r"says it holds 'model\.layers\.1\.mlp\.up_proj\.weight', but it does not"
    ):
        sw.convert(src, tmp_path / "out", progress=False)


def test_missing_layer_tensor(single, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(single / "model.safetensors"))
    del sd["model.layers.2.mlp.down_proj.weight"]
    save_file(sd, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        sw.SepweightError, match=r"layer 2 has a different set of tensors than layer 0: \['mlp\.down_proj\.weight'\]"
    ):
        sw.convert(single, tmp_path / "out", progress=False)


def test_untied_config_without_head(single, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(single / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        sw.SepweightError, match=r"no 'lm_head\.weight' but config\.json says tie_word_embeddings=false"
    ):
        sw.convert(single, tmp_path / "out", progress=False)


def test_unknown_tensor_name(single, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(single / "model.safetensors"))
    sd["transformer.h.0.attn.weight"] = sd["model.norm.weight"].clone()
    save_file(sd, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        sw.SepweightError, match=r"tensor 'transformer\.h\.0\.attn\.weight' is not part of the supported layout"
    ):
        sw.convert(single, tmp_path / "out", progress=False)


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "architectures", "vocab_size"])
def test_config_without_required_key(single, tmp_path, key):
    cfg = json.loads((single / "config.json").read_text())
    del cfg[key]
    (single / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(sw.SepweightError, match=rf"config\.json: missing required key\(s\) \['{key}'\]"):
        sw.convert(single, tmp_path / "out", progress=False)


def test_unsupported_architecture(single, tmp_path):
    cfg = json.loads((single / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (single / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        sw.SepweightError, match=r"architecture \['GPT2LMHeadModel'\] is not supported; supported: \['Qwen2ForCausalLM'"
    ):
        sw.convert(single, tmp_path / "out", progress=False)


def test_config_not_json(single, tmp_path):
    (single / "config.json").write_text("{not json")
    with pytest.raises(sw.SepweightError, match=r"config\.json: not valid JSON"):
        sw.convert(single, tmp_path / "out", progress=False)


def test_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 8})
    )
    with pytest.raises(sw.SepweightError, match="no weights found"):
        sw.convert(tmp_path / "empty", tmp_path / "out", progress=False)


def test_source_does_not_exist(tmp_path):
    with pytest.raises(sw.SepweightError, match="no such folder, and not a hub repo id"):
        sw.convert(tmp_path / "nope" / "x" / "y", tmp_path / "out", progress=False)


def test_bad_dtype(single, tmp_path):
    with pytest.raises(sw.SepweightError, match=r"dtype 'int8' is not supported; use one of bf16, fp16, fp32"):
        sw.convert(single, tmp_path / "out", dtype="int8", progress=False)


def test_bad_parts(single, tmp_path):
    with pytest.raises(sw.SepweightError, match="asks for layer 3, but the model has 3 layers"):
        sw.convert(single, tmp_path / "out", parts="b 0-8", progress=False)


# ------------------------------------------------------------------------------ sepweight folders


def test_layer_file_missing_from_folder(sep):
    (sep / "mid.00001.safetensors").unlink()
    with pytest.raises(
        sw.SepweightError, match=r"mid\.00001\.safetensors: listed in manifest\.json \(layer 1\) but missing"
    ):
        sw.SepWeights(sep)
    report = sw.verify(sep)
    assert not report.ok and "mid.00001.safetensors: missing" in str(report)


def test_truncated_part_file(sep):
    f = sep / "mid.00000.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(
        sw.SepweightError, match=r"mid\.00000\.safetensors: \d+ bytes, manifest\.json says \d+; the file is truncated"
    ):
        sw.SepWeights(sep)


def test_checksum_mismatch_is_reported(sep):
    f = sep / "mid.00002.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # same size, same header, different data
    f.write_bytes(bytes(raw))
    (sep / "tokenizer.json").write_text("{}")
    report = sw.verify(sep)
    assert not report.ok
    text = str(report)
    assert "mid.00002.safetensors: sha256 does not match manifest.json" in text
    assert "tokenizer.json: size" in text  # every mismatch is reported, not just the first
    assert len(report.problems) == 2


def test_manifest_checksum_edited(sep):
    m = json.loads((sep / "manifest.json").read_text())
    m["files"]["begin.safetensors"]["sha256"] = "0" * 64
    (sep / "manifest.json").write_text(json.dumps(m))
    report = sw.verify(sep)
    assert [p for p in report.problems if "begin.safetensors: sha256 does not match" in p]


def test_header_does_not_match_manifest(sep):
    m = json.loads((sep / "manifest.json").read_text())
    m["files"]["mid.00000.safetensors"]["tensors"]["mlp.up_proj.weight"]["shape"] = [1, 2]
    (sep / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        sw.SepweightError,
        match=r"mid\.00000\.safetensors: tensors do not match manifest\.json .*different dtype/shape \['mlp\.up_proj\.weight'\]",
    ):
        sw.SepWeights(sep).layer(0)


def test_no_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(sw.SepweightError, match="no manifest.json, so this is not a complete sepweight folder"):
        sw.load(tmp_path / "x")


def test_manifest_from_the_future(sep):
    m = json.loads((sep / "manifest.json").read_text())
    m["format_version"] = 99
    (sep / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(sw.SepweightError, match="format_version 99 is newer than this llm_sepweight understands"):
        sw.SepWeights(sep)


def test_malformed_manifest(sep):
    (sep / "manifest.json").write_text('{"format": "llm_sepweight", "format_version": 1}')
    with pytest.raises(sw.SepweightError, match="malformed manifest"):
        sw.SepWeights(sep)


def test_layer_index_out_of_range(sep):
    with pytest.raises(sw.SepweightError, match=r"layer index 3 is outside the model's layers 0\.\.2"):
        sw.SepWeights(sep).layer(3)
    with pytest.raises(sw.SepweightError, match="asks for layer 3, but the model has 3 layers"):
        sw.load(sep, "b 0-6")
