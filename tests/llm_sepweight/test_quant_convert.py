"""Quantized conversion: from an HF folder and from a sepweight folder, resume, reading back (QUANT_FORMAT.md)."""

import json

import pytest
import torch

import llm_sepweight as sw
import llm_sepweight.quant as quant_mod
import llm_sepweight.writer as writer_mod
from llm_sepweight.quant_importance import input_importance

G = 32  # the tiny models' in_features are 64 and 96


def _hf(ckpt) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in ckpt.model.state_dict().items()}


def _stored_name(part, rel: str) -> str:
    if part == "begin":
        return f"model.{rel}"
    if part == "end":
        return rel if rel.startswith("lm_head") else f"model.{rel}"
    return f"model.layers.{part}.{rel}"


def _unquantized_keys(stored: dict, linears: dict) -> list[str]:
    quantized = {f"{p}.{suffix}" for p in linears for suffix in ("qweight", "scales", "scales_and_zeros")}
    return [k for k in stored if k not in quantized] + [f"{p}.weight" for p in linears]


def _parts(folder: sw.SepWeights) -> list:
    return ["begin", *range(folder.num_layers), "end"]


def _read(folder: sw.SepWeights, part) -> dict[str, torch.Tensor]:
    return folder.begin() if part == "begin" else folder.end() if part == "end" else folder.layer(part)


@pytest.fixture(scope="module")
def int4_folder(qwen_checkpoints, tmp_path_factory):
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path_factory.mktemp("q") / "int4"
    sw.convert(ckpt.path, dst, quant="int4", group_size=G, progress=False)
    return dst, ckpt


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_linears_are_quantized_as_quantize_linear_does_and_the_rest_is_untouched(qwen_checkpoints, tmp_path, scheme):
    ckpt = qwen_checkpoints("qwen2")
    m = sw.convert(ckpt.path, tmp_path / "q", quant=scheme, group_size=G, progress=False)
    assert m.format_version == 2 and m.dtype == "float32"
    want_quant = {"scheme": scheme, "group_size": G if scheme == "int4" else None, "scale_dtype": "float32"}
    assert {k: m.quant[k] for k in want_quant} == want_quant and m.quant["quantize_head"] is True
    folder, hf = sw.SepWeights(tmp_path / "q"), _hf(ckpt)
    assert folder.quant == m.quant
    n_linears = 0
    for part in _parts(folder):
        stored, linears = _read(folder, part), folder.linears(part)
        hf_part = {rel: hf[_stored_name(part, rel)] for rel in _unquantized_keys(stored, linears)}
        for prefix, spec in linears.items():
            w = hf[_stored_name(part, f"{prefix}.weight")]
            imp = input_importance(part, f"{prefix}.weight", hf_part, folder.config) if scheme == "int4" else None
            assert imp is not None or scheme == "int8"  # every linear of the model has an estimate
            tensors, want_spec = sw.quantize_linear(w, scheme, G, importance=imp)
            assert spec == want_spec and f"{prefix}.weight" not in stored
            for suffix, t in tensors.items():
                assert torch.equal(stored[f"{prefix}.{suffix}"], t), (part, prefix, suffix)
            w_hat = sw.dequantize({k: stored[f"{prefix}.{k}"] for k in tensors}, spec)
            assert (w_hat - w).norm() / w.norm() < (0.15 if scheme == "int4" else 0.01)
            n_linears += 1
        plain = {k for k in stored if not any(k.startswith(p + ".") for p in linears)}
        for rel in plain:  # embedding, norms, biases: exactly the checkpoint's
            assert torch.equal(stored[rel], hf[_stored_name(part, rel)]), rel
    assert n_linears == 7 * folder.num_layers + 1  # q k v o gate up down per layer, and the untied head


def test_tied_head_and_no_quantize_head_stay_unquantized(qwen_checkpoints, tmp_path):
    tied = qwen_checkpoints("qwen2_tied")
    sw.convert(tied.path, tmp_path / "tied", quant="int4", group_size=G, progress=False)
    folder = sw.SepWeights(tmp_path / "tied")
    assert folder.linears("end") == {} and torch.equal(folder.end()["lm_head.weight"], _hf(tied)["lm_head.weight"])
    untied = qwen_checkpoints("qwen2")
    sw.convert(untied.path, tmp_path / "head", quant="int8", quantize_head=False, progress=False)
    folder = sw.SepWeights(tmp_path / "head")
    assert folder.linears("end") == {} and len(folder.linears(0)) == 7
    assert folder.quant["quantize_head"] is False
    assert torch.equal(folder.end()["lm_head.weight"], _hf(untied)["lm_head.weight"])


def test_bf16_folder_has_bf16_scales_and_compute_dtype(qwen_checkpoints, tmp_path):
    ckpt = qwen_checkpoints("qwen2")
    m = sw.convert(ckpt.path, tmp_path / "q", dtype="bf16", quant="int4", group_size=G, progress=False)
    assert m.dtype == "bfloat16" and m.quant["scale_dtype"] == "bfloat16"
    layer = sw.SepWeights(tmp_path / "q").layer(0)
    assert layer["mlp.up_proj.scales_and_zeros"].dtype == torch.bfloat16
    assert layer["input_layernorm.weight"].dtype == torch.bfloat16
    assert sw.verify(tmp_path / "q").ok


def test_converting_a_sepweight_folder_equals_converting_the_checkpoint(sep, int4_folder, tmp_path):
    plain, ckpt = sep("qwen2")  # an unquantized fp32 folder: lossless, so the results are the same bytes
    sw.convert(plain, tmp_path / "from_sep", quant="int4", group_size=G, progress=False)
    direct = sw.Manifest.read(int4_folder[0])
    again = sw.Manifest.read(tmp_path / "from_sep")
    assert {n: e.sha256 for n, e in again.files.items()} == {n: e.sha256 for n, e in direct.files.items()}
    assert again.quant == direct.quant and again.config == direct.config
    assert set(again.extra_files) == set(direct.extra_files)  # tokenizer files come along


def test_requantizing_and_dequantizing_a_quantized_folder(int4_folder, tmp_path):
    src = sw.SepWeights(int4_folder[0])
    sw.convert(int4_folder[0], tmp_path / "int8", quant="int8", progress=False)
    sw.convert(int4_folder[0], tmp_path / "plain", progress=False)
    int8, plain = sw.SepWeights(tmp_path / "int8"), sw.SepWeights(tmp_path / "plain")
    assert plain.manifest.format_version == 1 and plain.quant is None and plain.linears(1) == {}
    assert int8.quant["scheme"] == "int8"
    for part in _parts(src):
        stored = _read(src, part)
        for prefix, spec in src.linears(part).items():
            w = sw.dequantize(
                {k.removeprefix(prefix + "."): v for k, v in stored.items() if k.startswith(prefix)}, spec
            )
            assert torch.equal(_read(plain, part)[f"{prefix}.weight"], w)
            q, s = sw.quantize_int8(w)
            assert torch.equal(_read(int8, part)[f"{prefix}.qweight"], q)
            assert torch.equal(_read(int8, part)[f"{prefix}.scales"], s)


def test_interrupted_quantized_conversion_resumes(qwen_checkpoints, int4_folder, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    dst = tmp_path / "q"
    real = writer_mod.write_part_file
    written: list = []

    def crash_after_two(root, part, *args, **kwargs):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(part)
        return real(root, part, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(writer_mod, "write_part_file", crash_after_two)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sw.convert(ckpt.path, dst, quant="int4", group_size=G, progress=False)
    written.clear()

    def count(root, part, *args, **kwargs):
        written.append(part)
        return real(root, part, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "write_part_file", count)
    sw.convert(ckpt.path, dst, quant="int4", group_size=G, progress=False)
    assert written == [1, 2, "end"]  # begin and layer 0 were kept
    resumed, direct = sw.Manifest.read(dst), sw.Manifest.read(int4_folder[0])
    assert resumed.files == direct.files  # same bytes and the same per-tensor quant entries
    assert sw.verify(dst).ok

    written.clear()  # other quantization settings: nothing is reused
    sw.convert(ckpt.path, dst, quant="int4", group_size=G, quant_method="rtn", progress=False)
    assert written == ["begin", 0, 1, 2, "end"]
    assert sw.SepWeights(dst).quant["method"] == "rtn"


def test_a_new_version_of_the_int4_method_reconverts_a_finished_folder_once(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2")
    clip, rtn = tmp_path / "clip", tmp_path / "rtn"
    sw.convert(ckpt.path, clip, quant="int4", group_size=G, progress=False)
    sw.convert(ckpt.path, rtn, quant="int4", group_size=G, quant_method="rtn", progress=False)
    real, written = writer_mod.write_part_file, []

    def count(root, part, *args, **kwargs):
        written.append(part)
        return real(root, part, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "write_part_file", count)
    sw.convert(ckpt.path, clip, quant="int4", group_size=G, progress=False)
    assert written == []  # the same conversion: a no-op
    monkeypatch.setitem(quant_mod.METHOD_VERSIONS, "clip", quant_mod.METHOD_VERSIONS["clip"] + 1)
    sw.convert(ckpt.path, clip, quant="int4", group_size=G, progress=False)
    assert written == ["begin", 0, 1, 2, "end"]  # the clip search changed: re-quantized once
    sw.convert(ckpt.path, clip, quant="int4", group_size=G, progress=False)
    sw.convert(ckpt.path, rtn, quant="int4", group_size=G, quant_method="rtn", progress=False)
    assert written == ["begin", 0, 1, 2, "end"]  # then a no-op again; rtn folders are not touched
    assert sw.verify(clip).ok


def test_reading_quantized_tensors_by_rows_and_into_buffers(int4_folder):
    folder = sw.SepWeights(int4_folder[0])
    spec = folder.linears("end")["lm_head"]
    assert spec.shape == (384, 64) and spec.layout == sw.int4_layout()
    end = folder.end()
    full = sw.dequantize({"qweight": end["lm_head.qweight"], "scales_and_zeros": end["lm_head.scales_and_zeros"]}, spec)
    chunk = {suffix: folder.rows("end", f"lm_head.{suffix}", 64, 192) for suffix in ("qweight", "scales_and_zeros")}
    assert torch.equal(sw.dequantize(chunk, spec), full[64:192])
    buf = torch.empty(folder.nbytes(0), dtype=torch.uint8)
    layer = folder.read_into(0, buf)
    for k, v in folder.layer(0).items():
        assert torch.equal(layer[k], v) and layer[k].dtype == v.dtype, k
    rows = ("lm_head.qweight", 0, 64)
    q_rows = folder.read_into("end", torch.empty(folder.nbytes("end", rows), dtype=torch.uint8), rows)
    assert torch.equal(q_rows["lm_head.qweight"], end["lm_head.qweight"][:64])


def test_hf_state_dict_keeps_the_stored_keys(int4_folder):
    sd = sw.load(int4_folder[0]).hf_state_dict()
    assert "model.layers.0.mlp.up_proj.qweight" in sd and "model.layers.0.mlp.up_proj.scales_and_zeros" in sd
    assert "model.layers.0.mlp.up_proj.weight" not in sd and "lm_head.qweight" in sd
    assert "model.layers.0.self_attn.q_proj.bias" in sd


def test_manifest_reads_versions_1_and_2(sep, int4_folder):
    assert sw.Manifest.read(sep("qwen2")[0]).format_version == 1
    assert sw.Manifest.read(sep("qwen2")[0]).quant is None
    assert sw.Manifest.read(int4_folder[0]).format_version == 2
    raw = json.loads((int4_folder[0] / "manifest.json").read_text())
    assert raw["files"]["mid.00000.safetensors"]["tensors"]["mlp.down_proj.qweight"]["quant"] == {
        "scheme": "int4",
        "shape": [64, 96],
        "group_size": G,
        "layout": sw.int4_layout(),
    }
