"""A model's named chat templates (``additional_chat_templates/NAME.jinja``, as transformers 5 saves them)
come along with the tokenizer: from an HF folder, from the hub, and from a sepweight folder converted again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import llm_sepweight as sw

TEMPLATES = {"tool_use": "{{ 'tools' }}", "rag": "{{ 'documents' }}"}


@pytest.fixture
def hf(qwen_checkpoints, tmp_path) -> Path:
    """The tiny checkpoint with chat_template.jinja and two named templates."""
    folder = tmp_path / "hf"
    shutil.copytree(qwen_checkpoints("qwen2").path, folder)
    (folder / "chat_template.jinja").write_text("{{ 'default' }}")
    (folder / "additional_chat_templates").mkdir()
    for name, text in TEMPLATES.items():
        (folder / "additional_chat_templates" / f"{name}.jinja").write_text(text)
    (folder / "additional_chat_templates" / "notes.txt").write_text("not a template")
    return folder


def _templates(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((folder / "additional_chat_templates").iterdir())}


def test_copied_from_a_folder_and_again_from_the_conversion(hf, tmp_path) -> None:
    m = sw.convert(hf, tmp_path / "sep", progress=False)
    names = {"additional_chat_templates/rag.jinja", "additional_chat_templates/tool_use.jinja", "chat_template.jinja"}
    assert names <= set(m.extra_files) and "additional_chat_templates/notes.txt" not in m.extra_files
    assert _templates(tmp_path / "sep") == TEMPLATES
    again = sw.convert(tmp_path / "sep", tmp_path / "int8", quant="int8", progress=False)
    assert names <= set(again.extra_files)
    assert _templates(tmp_path / "int8") == TEMPLATES
    sw.verify(tmp_path / "int8")


def test_an_edited_template_converts_again(hf, tmp_path) -> None:
    sw.convert(hf, tmp_path / "sep", progress=False)
    (hf / "additional_chat_templates" / "rag.jinja").write_text("{{ 'edited' }}")
    sw.convert(hf, tmp_path / "sep", progress=False)
    assert (tmp_path / "sep" / "additional_chat_templates" / "rag.jinja").read_text() == "{{ 'edited' }}"


def test_fetched_from_the_hub(hf, tmp_path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    snapshot = tmp_path / "hub" / ("0" * 40)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        files = [p.relative_to(hf).as_posix() for p in hf.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):  # huggingface_hub's own filter
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hf / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sw.convert("acme/tiny-qwen", tmp_path / "sep", progress=False)
    assert _templates(tmp_path / "sep") == TEMPLATES


def test_a_manifest_cannot_name_a_file_outside_the_folder(hf, tmp_path) -> None:
    sw.convert(hf, tmp_path / "sep", progress=False)
    manifest = tmp_path / "sep" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["extra_files"]["../evil.jinja"] = raw["extra_files"]["chat_template.jinja"]
    shutil.copy(hf / "chat_template.jinja", tmp_path / "evil.jinja")
    manifest.write_text(json.dumps(raw))
    with pytest.raises(sw.SepweightError, match=r"'../evil.jinja' is not a config, tokenizer or chat template file"):
        sw.convert(tmp_path / "sep", tmp_path / "a" / "out", quant="int8", progress=False)
    assert not (tmp_path / "a" / "evil.jinja").exists()
