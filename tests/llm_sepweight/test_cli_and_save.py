import json
import subprocess
import sys

import pytest
import torch

import llm_sepweight as sw
from llm_sepweight.cli import main


def test_cli_convert_info_verify(qwen_checkpoints, tmp_path, capsys):
    src = qwen_checkpoints("qwen2_tied").path
    assert main(["convert", str(src), str(tmp_path / "sep"), "--dtype", "bf16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "begin.safetensors" in out and "mid.00002.safetensors" in out and "bfloat16" in out
    assert "tied head" in out and "yes" in out
    assert main(["info", str(tmp_path / "sep")]) == 0
    assert "stored: b 0-3 e" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "sep")]) == 0
    assert "OK (" in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "sep").mkdir()
    assert main(["info", str(tmp_path / "sep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-sepweight: error:") and "Traceback" not in err
    assert main(["verify", str(tmp_path / "sep")]) == 1


def test_cli_bad_spec(qwen_checkpoints, tmp_path, capsys):
    assert main(["convert", str(qwen_checkpoints("qwen2").path), str(tmp_path / "o"), "--parts", "b x"]) == 2
    assert "token 'x' is not understood" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    exe = [sys.executable, "-m", "llm_sepweight.cli", "--help"]
    out = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    assert "convert" in out and "verify" in out


def test_save_part_replaces_a_layer(qwen_checkpoints, tmp_path):
    sep = tmp_path / "sep"
    sw.convert(qwen_checkpoints("qwen2").path, sep, progress=False)
    layer = {k: v.clone() for k, v in sw.SepWeights(sep).layer(1).items()}
    layer["mlp.down_proj.weight"] += 1.0
    sw.save_part(sep, 1, layer)
    assert sw.verify(sep).ok
    assert torch.equal(sw.SepWeights(sep).layer(1)["mlp.down_proj.weight"], layer["mlp.down_proj.weight"])
    with pytest.raises(sw.SepweightError, match="do not match the stored names/shapes"):
        sw.save_part(sep, 1, {"mlp.down_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(sw.SepweightError, match=r"layer 9 is outside the model's layers 0\.\.2"):
        sw.save_part(sep, 9, layer)


def test_writer_builds_a_new_folder(qwen_checkpoints, tmp_path):
    """What a LoRA merge does: stream a source folder into a new one, layer by layer."""
    src = tmp_path / "src"
    sw.convert(qwen_checkpoints("qwen2_tied").path, src, progress=False)
    s = sw.SepWeights(src)
    w = sw.SepweightWriter(tmp_path / "new", s.config)
    w.write("begin", s.begin())
    for i in range(s.num_layers):
        w.write(i, {k: v * 2 if k.endswith("proj.weight") else v for k, v in s.layer(i).items()}, dtype=torch.bfloat16)
    w.write("end", {"norm.weight": s.end()["norm.weight"]})
    assert not (tmp_path / "new" / "manifest.json").exists()
    m = w.finish()
    assert m.dtype == "mixed" and m.tie_word_embeddings
    new = sw.SepWeights(tmp_path / "new")
    want = (s.layer(2)["self_attn.q_proj.weight"] * 2).to(torch.bfloat16)
    assert torch.equal(new.layer(2)["self_attn.q_proj.weight"], want)
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == s.config
    assert sw.verify(tmp_path / "new").ok
