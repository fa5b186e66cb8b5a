"""The llm-pipeline CLI stops on the model's eos ids (llm_lazy_qwen.eos_token_ids: generation_config.json,
else the config), unless --ignore-eos or --stop-tokens say otherwise."""

import json
import shutil

from llm_pipeline.cli import main


def _new_ids(folder, capsys, *extra: str) -> list[int]:
    argv = ["generate", "--model", str(folder), "--prompt-ids", "5 6 7", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "6", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])["new_ids"]


def test_default_stops_are_the_models_eos(sep, tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    path, _ = sep("qwen2")
    folder = tmp_path / "m"
    shutil.copytree(path, folder)
    free = _new_ids(folder, capsys, "--ignore-eos")
    stop = free[2]
    cut = free[: free.index(stop) + 1]  # up to and including the first stop
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    assert _new_ids(folder, capsys) == cut
    assert _new_ids(folder, capsys, "--ignore-eos") == free
    assert _new_ids(folder, capsys, "--stop-tokens", str(free[0])) == free[:1]
    (folder / "generation_config.json").unlink()  # the config's eos_token_id (2) then
    assert _new_ids(folder, capsys) == (free[: free.index(2) + 1] if 2 in free else free)
