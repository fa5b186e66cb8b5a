"""llm-sft train on a local .gguf file: converted once, the tokenizer read from the converted folder."""

import json

from llm_lora_mmap import load_adapter
from llm_sft.cli import main


def _data(path, n=4):
    with open(path, "w") as f:
        for k in range(n):
            f.write(json.dumps({"instruction": f"Hello {k}", "input": "", "output": "Hello world"}) + "\n")


def _train(model, tmp_path, out, *extra):
    args = ["train", "--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--out", str(out)]
    args += ["--max-seq-len", "96", "--batch-size", "2", "--epochs", "1", "--r", "2", "--no-progress", *extra]
    return main(args)


def test_a_local_gguf_file_trains_with_the_tokenizer_built_from_its_metadata(tmp_path, monkeypatch, capsys):
    from gguf_fixtures import T, linears, tiny_model, write_gguf

    from llm_lazy_qwen import cache_folder, load_part

    path = write_gguf(tiny_model("qwen2", seed=3), tmp_path / "tiny.gguf", linears(T.F32))
    _data(tmp_path / "train.jsonl")
    monkeypatch.setenv("LLM_MICROLIBS_CACHE", str(tmp_path / "cache"))
    # before: the hub cache was asked for the tokenizer of a local file ("tiny.gguf" is no hub id)
    assert _train(path, tmp_path, tmp_path / "a") == 0, capsys.readouterr().err
    folder = cache_folder(path, "f")
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "tokenizer.json").is_file()
    assert "llm-sft: 4 examples" in capsys.readouterr().err
    part = load_part(folder, "f")
    load_adapter(part, tmp_path / "a")  # a PEFT adapter for the converted model
    # --cache-dir: converted there instead, the tokenizer found there too
    assert _train(path, tmp_path, tmp_path / "b", "--cache-dir", str(tmp_path / "sep")) == 0
    assert (tmp_path / "sep" / "tokenizer.json").is_file() and (tmp_path / "b" / "adapter_model.safetensors").is_file()
