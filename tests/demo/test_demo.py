"""The README's main job, in a reduced size, so CI proves it keeps working."""

import importlib.util
from pathlib import Path

DEMO = Path(__file__).parents[2] / "demo" / "run_demo.py"


def test_demo_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--workdir", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    for step in ("== 1. checkpoint", "== 2. convert", "== 3. generate", "== 4. fine-tune", "== 5. answers", "== summary"):
        assert step in out
    assert "answers correct" in out and "generate (lazy)" in out
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss_log.csv", "loss_curve.png", "sep/manifest.json"):
        assert (tmp_path / f).is_file(), f
