"""Convert every fixture and compare the loaded parts with the transformers model's own state_dict()."""

import json

import pytest
import torch
from qwen_fixtures import VARIANTS

import llm_sepweight as sw

ALL = list(VARIANTS)


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k  # bit for bit


@pytest.mark.parametrize("name", ALL)
def test_roundtrip_bit_for_bit(qwen_checkpoints, tmp_path, name):
    ckpt = qwen_checkpoints(name)
    manifest = sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    assert manifest.num_layers == ckpt.variant.num_layers
    assert manifest.tie_word_embeddings == ckpt.variant.tied
    part = sw.load(tmp_path / "sep", "f")
    _assert_same(part.hf_state_dict(), ckpt.model.state_dict())
    assert sw.verify(tmp_path / "sep").ok
    # config and tokenizer files are copied unchanged
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "sep" / f).read_bytes() == (ckpt.path / f).read_bytes()
    assert manifest.config == json.loads((ckpt.path / "config.json").read_text())


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_tied_sharded"])
def test_tied_head_is_not_stored_twice(qwen_checkpoints, tmp_path, name):
    sw.convert(qwen_checkpoints(name).path, tmp_path / "sep", progress=False)
    m = sw.Manifest.read(tmp_path / "sep")
    assert list(m.files["end.safetensors"].tensors) == ["norm.weight"]
    part = sw.load(tmp_path / "sep", "f")
    assert part.end["lm_head.weight"].data_ptr() == part.begin["embed_tokens.weight"].data_ptr()
    # the end part alone still serves the head (read from begin.safetensors)
    end = sw.SepWeights(tmp_path / "sep").end()
    assert torch.equal(end["lm_head.weight"], part.begin["embed_tokens.weight"])


@pytest.mark.parametrize(("name", "dtype"), [("qwen2", "bf16"), ("qwen2", "fp16"), ("qwen2_bf16", "fp32")])
def test_dtype_conversion(qwen_checkpoints, tmp_path, name, dtype):
    ckpt = qwen_checkpoints(name)
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    m = sw.convert(ckpt.path, tmp_path / "sep", dtype=dtype, progress=False)
    assert m.dtype == str(target).removeprefix("torch.")
    want = {k: v.to(target) for k, v in ckpt.model.state_dict().items()}
    _assert_same(sw.load(tmp_path / "sep").hf_state_dict(), want)


def test_layers_are_stored_relative_to_the_layer(qwen_checkpoints, tmp_path):
    sw.convert(qwen_checkpoints("qwen2").path, tmp_path / "sep", progress=False)
    layer = sw.SepWeights(tmp_path / "sep").layer(2)
    assert "self_attn.q_proj.weight" in layer and "mlp.down_proj.weight" in layer
    assert all(not k.startswith("model.") for k in layer)


def test_load_with_dtype_and_without_mmap(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2")
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    part = sw.load(tmp_path / "sep", "1-3 e", dtype=torch.float64, mmap=False)
    assert part.begin is None and sorted(part.layers) == [1, 2]
    sd = ckpt.model.state_dict()
    assert torch.equal(part.layers[1]["mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"].double())
    assert torch.equal(part.end["lm_head.weight"], sd["lm_head.weight"].double())


def test_partial_conversion(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2_sharded")
    m = sw.convert(ckpt.path, tmp_path / "sep", parts="b 0-1", progress=False)
    assert sorted(m.files) == ["begin.safetensors", "mid.00000.safetensors"]
    weights = sw.SepWeights(tmp_path / "sep")
    assert str(weights.spec) == "b 0"
    with pytest.raises(sw.SepweightError, match=r"layer 1 is not stored here \(this folder holds 'b 0'\)"):
        weights.layer(1)
    with pytest.raises(sw.SepweightError, match="end part is not stored here"):
        weights.end()


def test_partial_conversion_needs_only_its_shards(qwen_checkpoints, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(qwen_checkpoints("qwen2_sharded").path, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in index.items() if k.startswith("model.layers.2.")}
    for f in set(index.values()) - needed:
        (src / f).unlink()
    sw.convert(src, tmp_path / "sep", parts="2", progress=False)
    assert sorted(sw.SepWeights(tmp_path / "sep").layer(2)) == sorted(
        k.removeprefix("model.layers.2.") for k in index if k.startswith("model.layers.2.")
    )


def test_mmap_load_adds_no_anonymous_memory(tmp_path):
    """Loading (and reading) a 64 MB layer with mmap grows RssFile, not RssAnon."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import torch, json
        from pathlib import Path
        import llm_sepweight as sw
        root = Path({str(tmp_path / "sep")!r})
        cfg = {{"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 1, "hidden_size": 4096, "vocab_size": 8}}
        w = sw.SepweightWriter(root, cfg)
        w.write(0, {{"mlp.up_proj.weight": torch.randn(4096, 4096)}})
        w.finish()
        def status():
            d = dict(l.split(":", 1) for l in open("/proc/self/status"))
            return {{k: int(d[k].split()[0]) for k in ("RssAnon", "RssFile")}}
        before = status()
        layer = sw.SepWeights(root).layer(0)
        total = float(layer["mlp.up_proj.weight"].max())
        after = status()
        print(json.dumps({{"anon_kb": after["RssAnon"] - before["RssAnon"], "file_kb": after["RssFile"] - before["RssFile"]}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["file_kb"] > 60_000  # the 64 MB file is mapped and read
    assert growth["anon_kb"] < 8_000, growth  # ... without becoming anonymous memory


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_rows_map_only_a_slice(qwen_checkpoints, tmp_path, name):
    ckpt = qwen_checkpoints(name)
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    w = sw.SepWeights(tmp_path / "sep")
    head = ckpt.model.state_dict()["lm_head.weight"]
    assert w.shape("end", "lm_head.weight") == tuple(head.shape)
    for start, stop in [(0, 7), (5, 300), (383, 384), (10, 10)]:
        got = w.rows("end", "lm_head.weight", start, stop)
        assert torch.equal(got, head[start:stop])
    with pytest.raises(sw.SepweightError, match=r"rows 0:999 are outside tensor"):
        w.rows("end", "lm_head.weight", 0, 999)
    with pytest.raises(sw.SepweightError, match="no tensor 'nope'"):
        w.rows("begin", "nope", 0, 1)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_read_into_a_reusable_buffer(qwen_checkpoints, tmp_path, name):
    ckpt = qwen_checkpoints(name)
    sw.convert(ckpt.path, tmp_path / "sep", progress=False)
    w = sw.SepWeights(tmp_path / "sep")
    sd = ckpt.model.state_dict()
    buf = torch.empty(max(w.nbytes(i) for i in range(3)), dtype=torch.uint8)
    for i in range(3):
        layer = w.read_into(i, buf)
        for k, v in layer.items():
            assert torch.equal(v, sd[f"model.layers.{i}.{k}"]) and v.data_ptr() >= buf.data_ptr()
    rows = ("lm_head.weight", 10, 50)
    head = w.read_into("end", torch.empty(w.nbytes("end", rows), dtype=torch.uint8), rows)
    assert torch.equal(head["lm_head.weight"], sd["lm_head.weight"][10:50])
    with pytest.raises(sw.SepweightError, match="needs a buffer of"):
        w.read_into(0, torch.empty(10, dtype=torch.uint8))


def test_sentencepiece_tokenizer_model_is_copied(qwen_checkpoints, tmp_path):
    """Llama / Mistral repos may ship only tokenizer.model: the converted folder keeps it (byte for byte)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(qwen_checkpoints("qwen2").path, src)
    (src / "tokenizer.model").write_bytes(b"\x0a\x05<unk>sentencepiece-bytes")
    sw.convert(src, tmp_path / "sep", progress=False)
    assert (tmp_path / "sep" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
