"""The README's main job, in a reduced size, so CI proves it keeps working."""

import importlib.util
import json
from pathlib import Path

DEMO = Path(__file__).parents[2] / "demo" / "run_demo.py"
STEPS = (
    "== 1. checkpoint",
    "== 2. convert",
    "== 3. generate",
    "== 4. pipeline",
    "== 5. bundled scaled matmul",
    "== 6. fine-tune",
    "== 7. answers",
    "== summary",
)
FILES = (
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "loss_log.csv",
    "loss_curve.png",
    "sep/manifest.json",
)


def test_demo_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--workdir", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    for step in STEPS:
        assert step in out
    for row in (
        "generate (lazy)",
        "pipeline (2 processes)",
        "bsm kernel",
        "answers correct",
    ):
        assert f"| {row}" in out, row
    for f in FILES:
        assert (tmp_path / f).is_file(), f

    # step 4: 2 processes generated the same greedy tokens as the whole model in one
    pipe = json.loads((tmp_path / "pipeline.json").read_text())
    assert pipe["parts"] == "b 0-1,1-2 e"
    assert pipe["pipeline_new_ids"] == pipe["single_new_ids"]
    assert [len(r) for r in pipe["pipeline_new_ids"]] == [8, 8] and pipe["equal"]
    assert pipe["pipeline_decode_tok_s"] > 0 and pipe["single_decode_tok_s"] > 0

    # step 5: the bundle equals torch on whichever backend is there (fallback included)
    bsm = json.loads((tmp_path / "bsm.json").read_text())
    assert bsm["backend"] in ("openblas", "mkl", "torch", "fallback")
    assert bsm["equal"] and bsm["max_rel_err"] < 1e-5
    assert bsm["bsm_ms"] > 0 and bsm["torch_ms"] > 0
    assert f"bsm kernel ({bsm['backend']})" in out
