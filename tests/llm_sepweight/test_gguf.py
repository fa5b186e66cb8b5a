"""GGUF import against transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), fp32.

Tiny qwen2 / qwen3 / llama models are written as GGUF files by tests/gguf_fixtures.py (F32, F16,
BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 through gguf.quants; hand-packed Q4_K / Q6_K blocks), converted, and compared:
dequantized folders and int4 folders hold exactly the values transformers dequantizes (1e-4 on logits);
Q8_0 re-quantized to int8 per channel adds a reported error of <= 0.6% of the weight RMS.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import T, k_quant_blocks, linears, tiny_model, write_gguf

import llm_sepweight as sw
from llm_sepweight.gguf_import import convert_gguf
from llm_sepweight.gguf_quant import int4_from_q4
from llm_sepweight.gguf_reader import GGUFTensor, open_gguf
from llm_sepweight.quant import QuantSpec, dequantize

FP32 = {"atol": 1e-4, "rtol": 1e-4}
IDS = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(0))
TYPES = {"F32": linears(T.F32), "F16": linears(T.F16), "Q8_0": linears(T.Q8_0)}
TYPES |= {"Q4_0": linears(T.Q4_0, embed=T.Q8_0, head=T.F16), "Q4_1": linears(T.Q4_1)}
TYPES |= {"Q5_1": linears(T.Q5_1, embed=T.BF16, head=T.Q5_0)}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """``ggufs(arch, type) -> (gguf path, transformers model loaded from it)``, written once per module."""
    root = tmp_path_factory.mktemp("gguf")
    models: dict[str, torch.nn.Module] = {}
    cache: dict[tuple[str, str], tuple[Path, torch.nn.Module]] = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            if arch not in models:
                models[arch] = tiny_model(arch, tied=arch == "qwen3", seed=len(arch))
            path = write_gguf(models[arch], root / f"{arch}-{kind}.gguf", TYPES[kind])
            cache[arch, kind] = (path, reference(path))
        return cache[arch, kind]

    return get


def reference(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(folder: Path, lazy: bool = False) -> torch.Tensor:
    from llm_lazy_qwen import load_part

    model = load_part(folder, "f", lazy=lazy)
    with torch.no_grad():
        out = model(IDS)
    model.close()
    return out


def stored_linears(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear of a folder, dequantized with llm_sepweight.dequantize, under its HF name."""
    s = sw.SepWeights(folder)
    out = {}
    for entry in s.manifest.files.values():
        part = entry.part
        tensors = s.layer(part) if isinstance(part, int) else s.end() if part == "end" else s.begin()
        for key, meta in entry.tensors.items():
            if "quant" in meta:
                prefix = key.removesuffix(".qweight")
                mine = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
                hf = f"model.layers.{part}.{prefix}.weight" if isinstance(part, int) else f"{prefix}.weight"
                out[hf] = dequantize(mine, QuantSpec.from_json(meta["quant"]))
    return out


CASES = [("qwen2", "F32"), ("qwen2", "Q8_0"), ("qwen3", "F16"), ("qwen3", "Q4_0"), ("llama", "Q4_1"), ("llama", "Q8_0")]
CASES += [("qwen2", "Q5_1")]


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_dequantized_logits_equal_transformers(ggufs, tmp_path, arch, kind):
    path, ref = ggufs(arch, kind)
    convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="none", progress=False)
    with torch.no_grad():
        want = ref(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "sep"), want, **FP32)
    m = sw.SepWeights(tmp_path / "sep").manifest
    assert m.architecture == type(ref).__name__ and m.tie_word_embeddings == (arch == "qwen3")


def test_lazy_and_default_dtype(ggufs, tmp_path):
    path, ref = ggufs("llama", "Q8_0")
    convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="none", progress=False)
    with torch.no_grad():
        want = ref(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "sep", lazy=True), want, **FP32)
    m = convert_gguf(path, tmp_path / "bf16", progress=False)
    assert m.dtype == "bfloat16"  # the compute dtype of a GGUF import defaults to bf16


@pytest.mark.parametrize(("arch", "kind"), [("llama", "Q4_1"), ("qwen3", "Q4_0"), ("qwen2", "Q4_1")])
def test_q4_linears_kept_exactly_as_int4(ggufs, tmp_path, arch, kind):
    path, ref = ggufs(arch, kind)
    m = convert_gguf(path, tmp_path / "sep", dtype="fp32", progress=False)
    entry = m.files["mid.00000.safetensors"].tensors
    q = entry["self_attn.q_proj.qweight"]
    assert q["quant"]["scheme"] == "int4" and q["quant"]["group_size"] == 32
    assert m.format_version == 2 and m.quant["method"] == f"gguf:{kind}" and m.quant["scale_dtype"] == "float32"
    assert entry["self_attn.q_proj.scales_and_zeros"]["dtype"] == "F32"  # GGUF's fp16 block scales, exact
    assert "self_attn.q_proj.weight" not in entry and entry["input_layernorm.weight"]["dtype"] == "F32"
    want = ref.state_dict()
    got = stored_linears(tmp_path / "sep")
    assert len(got) == 7 * 2 + (arch != "qwen3") * (kind == "Q4_1")  # a F16 head stays a plain weight
    for name, w in got.items():
        torch.testing.assert_close(w, want[name], atol=1e-6, rtol=0, msg=name)  # our int4 holds GGUF's values


@pytest.mark.skipif(not hasattr(sw.SepWeights, "linears"), reason="load_part of quantized folders not landed yet")
@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_int4_folder_logits_equal_transformers(ggufs, tmp_path, lazy):
    path, ref = ggufs("llama", "Q4_1")
    convert_gguf(path, tmp_path / "sep", dtype="fp32", progress=False)
    with torch.no_grad():
        want = ref(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "sep", lazy=lazy), want, **FP32)


def test_int4_from_q4_blocks_equal_gguf_dequantize(tmp_path):
    """Q4_0, Q4_1 and Q4_K with rows permuted (llama's Q/K), odd row counts, extreme block scales."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 96)).astype(np.float32) * rng.uniform(1e-3, 10, (40, 1)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q4_1):
        writer = gguf.GGUFWriter(tmp_path / f"{qtype.name}.gguf", "llama")
        writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
        t = gguf.GGUFReader(tmp_path / f"{qtype.name}.gguf").tensors[0]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, qtype))
        rows = torch.randperm(40, generator=torch.Generator().manual_seed(1))
        ours = open_gguf(tmp_path / f"{qtype.name}.gguf").tensors["blk.0.attn_q.weight"]
        tensors, spec = int4_from_q4(ours, rows)
        assert spec.layout == "rows" and tensors["scales_and_zeros"].dtype == torch.float32  # 40 rows: no kernel
        torch.testing.assert_close(dequantize(tensors, spec), ref[rows])
    # Q4_K (gguf cannot write it): hand-packed blocks with random 6-bit scales and mins, 128 rows (kernel layout)
    raw = k_quant_blocks(T.Q4_K, 128, 512, seed=3)
    t = GGUFTensor("blk.0.ffn_up.weight", tmp_path / "k.gguf", int(T.Q4_K), "Q4_K", (128, 512), raw)
    rows = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    tensors, spec = int4_from_q4(t, rows)
    assert spec.layout != "rows" and spec.group_size == 32
    ref = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_K))
    torch.testing.assert_close(dequantize(tensors, spec), ref[rows], atol=1e-6, rtol=0)


def test_q8_0_requantized_to_int8_reports_its_error(ggufs, tmp_path, caplog):
    path, ref = ggufs("llama", "Q8_0")
    with caplog.at_level(logging.INFO, logger="llm_sepweight.gguf_import"):
        m = convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="int8", progress=False)
    errors = m.source["requantized"]
    assert len(errors) == 2 * 7 + 1 and errors["end lm_head"]["from"] == "Q8_0"
    assert any("re-quantized 15 tensor(s)" in r.message for r in caplog.records)
    want = ref.state_dict()
    for name, w in stored_linears(tmp_path / "sep").items():
        label = f"layer {name.split('.')[2]} {name.split('.', 3)[3]}" if name.startswith("model.") else "end lm_head"
        d = w - want[name]  # against transformers' dequantized Q8_0
        err = errors[label.removesuffix(".weight")]
        assert err["to"] == "int8" and 0 < err["rel_rms_err"] < 0.01
        assert abs(float(d.abs().max()) - err["max_abs_err"]) < 1e-6
        assert abs(float(d.pow(2).mean().sqrt() / want[name].pow(2).mean().sqrt()) - err["rel_rms_err"]) < 1e-5
    on_disk = json.loads((tmp_path / "sep" / "manifest.json").read_text())["source"]["requantized"]
    assert on_disk == errors
    assert m.quant == {
        "scheme": "int8",
        "group_size": None,
        "scale_dtype": "float32",
        "method": "rtn",
        "quantize_head": True,
    }
    # the logits move by what the re-quantization adds: measured max |d| 5.3e-3 on logits of max 0.69 (0.8%)
    with torch.no_grad():
        want_logits = ref(IDS).logits
    got = logits(tmp_path / "sep")
    assert float((got - want_logits).abs().max()) < 0.02 * float(want_logits.abs().max())


def test_q4_asked_as_int8_is_stored_int8(ggufs, tmp_path):
    """quant="int8" on a Q4_1 file gives an int8 folder (it kept Q4 as int4 while saying nothing)."""
    path, ref = ggufs("llama", "Q4_1")
    m = convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="int8", progress=False)
    entry = m.files["mid.00000.safetensors"].tensors
    assert entry["self_attn.q_proj.qweight"]["quant"]["scheme"] == "int8"
    assert m.quant["scheme"] == "int8"
    assert m.source["requantized"]["layer 0 self_attn.q_proj"]["from"] == "Q4_1"
    with torch.no_grad():
        want_logits = ref(IDS).logits
    got = logits(tmp_path / "sep")
    assert float((got - want_logits).abs().max()) < 0.02 * float(want_logits.abs().max())


def test_requantized_errors_survive_a_resume(ggufs, tmp_path, monkeypatch):
    import llm_sepweight.gguf_import as gi

    path, _ = ggufs("llama", "Q8_0")
    clean = convert_gguf(path, tmp_path / "clean", quant="int4", group_size=32, progress=False)
    real, calls = gi._convert_part, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gi, "_convert_part", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "sep", quant="int4", group_size=32, progress=False)
    monkeypatch.setattr(gi, "_convert_part", real)
    again = convert_gguf(path, tmp_path / "sep", quant="int4", group_size=32, progress=False)
    assert again.source["requantized"] == clean.source["requantized"] and len(clean.source["requantized"]) == 15
    assert {k: e.sha256 for k, e in again.files.items()} == {k: e.sha256 for k, e in clean.files.items()}


def test_f32_gguf_quantized_to_int4_is_not_a_requantization(ggufs, tmp_path):
    path, _ = ggufs("qwen2", "F32")
    m = convert_gguf(path, tmp_path / "sep", quant="int4", group_size=32, progress=False)
    assert m.source["requantized"] == {}
    assert m.files["mid.00001.safetensors"].tensors["mlp.up_proj.qweight"]["quant"]["group_size"] == 32


def test_k_quants(tmp_path):
    """gguf cannot write K-quants: hand-packed Q4_K (kept as int4) / Q6_K (dequantized or re-quantized) blocks."""
    model = tiny_model("llama", hidden=256, intermediate=256, seed=5)
    k_quants = {"blk.0.ffn_down.weight": T.Q4_K, "output.weight": T.Q6_K}
    hf = {"blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight", "output.weight": "lm_head.weight"}
    path = write_gguf(model, tmp_path / "k.gguf", linears(T.Q8_0), k_quants=k_quants)
    ref = reference(path)
    src = open_gguf(path)
    for name, qtype in k_quants.items():
        t = src.tensors[name]
        assert t.type_name == qtype.name and t.shape == tuple(model.state_dict()[hf[name]].shape)
        torch.testing.assert_close(t.dequantize(), torch.from_numpy(gguf.quants.dequantize(t.data, qtype)))
    convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="none", progress=False)
    with torch.no_grad():
        want = ref(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "sep"), want, **FP32)
    with pytest.raises(sw.SepweightError, match=r"k.gguf: tensor 'blk.0.attn_output.weight' has in_features K=96"):
        convert_gguf(path, tmp_path / "q4", quant="int4", group_size=64, progress=False)
    assert not (tmp_path / "q4").exists()  # checked before anything is written
    m = convert_gguf(path, tmp_path / "q4", dtype="fp32", quant="int4", group_size=32, progress=False)
    assert m.source["requantized"]["end lm_head"]["from"] == "Q6_K"  # Q6_K cannot be held: re-quantized
    assert "layer 0 mlp.down_proj" not in m.source["requantized"]  # Q4_K is our int4 with g32, kept
    assert m.quant["method"] == "clip+gguf:Q4_K" and m.quant["group_size"] == 32
    assert m.source["gguf_types"] == {"F32": 6, "Q4_K": 1, "Q6_K": 1, "Q8_0": 13}
    # the default keeps Q4_K as int4 and dequantizes the rest: logits equal transformers'
    m = convert_gguf(path, tmp_path / "kept", dtype="fp32", progress=False)
    assert list(m.files["mid.00000.safetensors"].tensors).count("mlp.down_proj.qweight") == 1
    torch.testing.assert_close(logits(tmp_path / "kept"), want, **FP32)


def test_split_files_equal_single_file(tmp_path):
    model = tiny_model("qwen2", seed=3)
    single = write_gguf(model, tmp_path / "one" / "m.gguf", linears(T.Q4_1))
    first = write_gguf(model, tmp_path / "split" / "m.gguf", linears(T.Q4_1), split_max_tensors=8)
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert files == [f"m-0000{i}-of-00004.gguf" for i in range(1, 5)] and first.name == files[0]
    a = convert_gguf(single, tmp_path / "a", progress=False)
    b = sw.convert(tmp_path / "split" / files[2], tmp_path / "b", progress=False)  # any file of the split
    assert {k: e.sha256 for k, e in a.files.items()} == {k: e.sha256 for k, e in b.files.items()}
    assert b.source["files"] == files


def test_cli_converts_gguf(ggufs, tmp_path, capsys):
    from llm_sepweight.cli import main

    path, _ = ggufs("qwen2", "Q4_1")
    assert main(["convert", str(path), str(tmp_path / "sep"), "--no-progress"]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    assert sw.verify(tmp_path / "sep").ok


def test_some_parts_and_an_unquantized_head(ggufs, tmp_path):
    path, ref = ggufs("llama", "Q4_1")
    m = sw.convert(path, tmp_path / "sep", dtype="fp32", parts="1-2 e", quantize_head=False, progress=False)
    assert sorted(m.files) == ["end.safetensors", "mid.00001.safetensors"]
    end = m.files["end.safetensors"].tensors
    assert "lm_head.weight" in end and "lm_head.qweight" not in end and m.quant["quantize_head"] is False
    torch.testing.assert_close(sw.SepWeights(tmp_path / "sep").end()["lm_head.weight"], ref.lm_head.weight)


def test_llama_attention_bias_unpermuted_like_the_weights(tmp_path):
    """A llama with q/k/v/o biases: llama.cpp permutes the q/k bias rows as the weights'; we put both back.

    The oracle is the transformers model the file was written from: transformers' GGUF loader leaves
    ``attention_bias`` at LlamaConfig's False and drops the biases (measured: logits off by ~1).
    """
    import transformers
    from qwen_fixtures import _randomise

    config = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        attention_bias=True,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    _randomise(model, 1)
    path = write_gguf(model, tmp_path / "b.gguf", linears(T.Q4_0))
    convert_gguf(path, tmp_path / "sep", dtype="fp32", quant="none", progress=False)
    want = {
        k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), T.Q4_0), T.Q4_0))
        for k, v in model.state_dict().items()
        if v.dim() == 2 and "embed" not in k
    }
    with torch.no_grad():
        model.load_state_dict(want, strict=False)  # the weights as Q4_0 holds them; biases and norms are F32
        expected = model(IDS).logits
    torch.testing.assert_close(logits(tmp_path / "sep"), expected, **FP32)
