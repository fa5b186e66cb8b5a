"""Quantized folders from the command line, in `info`, checked by `verify`, and the input convert() rejects."""

import json
import re
import shutil

import pytest
import torch

import llm_sepweight as sw
from llm_sepweight.cli import info_text, main


@pytest.fixture(scope="module")
def q4(qwen_checkpoints, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "q4"
    assert (
        main(
            [
                "convert",
                str(qwen_checkpoints("qwen2").path),
                str(dst),
                "--quant",
                "int4",
                "--group-size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    return dst


def test_cli_convert_and_info(q4, capsys, tmp_path):
    folder = sw.SepWeights(q4)
    assert folder.quant["scheme"] == "int4" and folder.quant["group_size"] == 32 and folder.quant["method"] == "clip"
    text = info_text(q4)
    assert "(llm_sepweight format v2)" in text
    layout = sw.int4_layout()
    assert (
        f"quant                     int4 g32 clip, layout rows (+ {layout}: 10), scales float32  (22 linears)" in text
    )
    assert "mid.00000.safetensors   layer 0         19" in text and text.count("7 int4") == 3
    assert "end.safetensors         end              3" in text and "1 int4" in text
    assert "begin.safetensors       begin            1" in text
    plain_line = [line for line in text.splitlines() if line.startswith("begin.safetensors")][0]
    assert plain_line.endswith("  -")

    assert (
        main(["convert", str(q4), str(tmp_path / "q8"), "--quant", "int8", "--no-quantize-head", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "quant                     int8 rtn, scales float32, head not quantized  (21 linears)" in out
    assert main(["info", str(tmp_path / "q8")]) == 0


def test_cli_rejects_an_unknown_scheme_and_group_size(qwen_checkpoints, tmp_path, capsys):
    src = str(qwen_checkpoints("qwen2").path)
    with pytest.raises(SystemExit):
        main(["convert", src, str(tmp_path / "x"), "--quant", "int3"])
    with pytest.raises(SystemExit):
        main(["convert", src, str(tmp_path / "x"), "--quant", "int4", "--group-size", "48"])
    assert main(["convert", src, str(tmp_path / "x"), "--quant", "int4", "--group-size", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "layer 0 mlp.down_proj.weight: in_features 96 is not a multiple of the group size 64" in err
    assert not (tmp_path / "x").exists()  # rejected before anything was written


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quant": "int3"}, r"quant 'int3' is not one of \['int8', 'int4'\]"),
        ({"quant": "int4", "group_size": 48}, r"group size 48 is not one of \[32, 64, 128, 256\]"),
        ({"quant": "int4", "quant_method": "gptq"}, r"quantization method 'gptq' is not one of \['clip', 'rtn'\]"),
        (
            {"quant": "int4", "group_size": 64},
            r"layer 0 mlp.down_proj.weight: in_features 96 .* group size 64; use --group-size 32",
        ),
    ],
)
def test_bad_quant_settings_are_rejected_before_anything_is_written(qwen_checkpoints, tmp_path, kwargs, match):
    with pytest.raises(sw.SepweightError, match=match):
        sw.convert(qwen_checkpoints("qwen2").path, tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_converting_a_folder_into_itself_or_from_an_interrupted_one_is_refused(q4, tmp_path):
    with pytest.raises(sw.SepweightError, match="the output folder is the source folder"):
        sw.convert(q4, q4, quant="int8", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".sepweight-journal.json").write_text("{}")
    with pytest.raises(sw.SepweightError, match="interrupted; re-run the same convert command"):
        sw.convert(broken, tmp_path / "y", quant="int8", progress=False)
    sw.convert(q4, tmp_path / "half", parts="b 0-1", progress=False)  # begin and layer 0
    with pytest.raises(sw.SepweightError, match=r"source folder does not store layer 2 \(it holds 'b 0'\)"):
        sw.convert(tmp_path / "half", tmp_path / "z", parts="2", progress=False)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_verify_catches_nan_scales_written_with_a_matching_checksum(q4, tmp_path):
    folder = _copy(q4, tmp_path / "nan")
    assert sw.verify(folder).ok
    layer = {k: v.clone() for k, v in sw.SepWeights(folder).layer(1).items()}
    layer["mlp.up_proj.scales_and_zeros"][3, 0, 0] = float("nan")
    sw.save_part(folder, 1, layer)
    manifest = sw.Manifest.read(folder)
    assert "quant" in manifest.files["mid.00001.safetensors"].tensors["mlp.up_proj.qweight"]  # save_part kept it
    report = sw.verify(folder)
    assert not report.ok and len(report.problems) == 1
    assert "mid.00001.safetensors: mlp.up_proj.scales_and_zeros has NaN or inf values" in report.problems[0]


def _edit_manifest(folder, edit) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    edit(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m["files"]["mid.00000.safetensors"]["tensors"]["mlp.down_proj.qweight"]["quant"].update(
                group_size=64, shape=[64, 128]
            ),
            r"mlp.down_proj \(int4 \[64, 128\]\): qweight has shape \[64, 48\], its quant entry implies \[64, 64\]",
        ),
        (
            lambda m: m["files"]["mid.00000.safetensors"]["tensors"]["mlp.down_proj.qweight"]["quant"].update(
                scheme="int8", group_size=None, layout=None
            ),
            r"mlp.down_proj \(int8 \[64, 96\]\): stores \['qweight', 'scales_and_zeros'\], its quant entry implies \['qweight', 'scales'\]",
        ),
        (
            lambda m: m["files"]["end.safetensors"]["tensors"]["lm_head.qweight"]["quant"].update(layout="nibbles"),
            r"layout 'nibbles' is not one of",
        ),
        (
            lambda m: m["files"]["end.safetensors"]["tensors"]["lm_head.qweight"].pop("quant"),
            r"\['lm_head.qweight', 'lm_head.scales_and_zeros'\] look quantized but have no quant entry",
        ),
        (lambda m: m.update(format_version=1), r"has quantized linears but manifest.json says format_version 1"),
        (lambda m: m["quant"].update(scale_dtype="bfloat16"), r"scales_and_zeros is F32, expected BF16"),
    ],
)
def test_verify_reports_a_quant_entry_that_disagrees_with_the_file(q4, tmp_path, edit, match):
    folder = _copy(q4, tmp_path / "edited")
    _edit_manifest(folder, edit)
    report = sw.verify(folder)
    assert not report.ok
    assert any(re.search(match, p) for p in report.problems), report.problems


def test_linears_names_the_file_of_a_malformed_quant_entry(q4, tmp_path):
    folder = _copy(q4, tmp_path / "bad")
    _edit_manifest(folder, lambda m: m["files"]["end.safetensors"]["tensors"]["lm_head.qweight"]["quant"].pop("shape"))
    with pytest.raises(
        sw.SepweightError, match=r"manifest.json \(end.safetensors: lm_head.qweight\): malformed quant entry"
    ):
        sw.SepWeights(folder).linears("end")
    assert torch.equal(
        sw.SepWeights(folder).layer(0)["mlp.up_proj.qweight"], sw.SepWeights(q4).layer(0)["mlp.up_proj.qweight"]
    )
