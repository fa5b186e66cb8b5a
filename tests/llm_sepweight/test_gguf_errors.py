"""Bad GGUF input: a clear SepweightError naming the file (and the tensor), and no output folder left behind."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_fixtures import T, linears, tiny_model, write_gguf

import llm_sepweight as sw
from llm_sepweight.gguf_import import convert_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_gguf(tiny_model("llama", seed=2), tmp_path_factory.mktemp("good") / "m.gguf", linears(T.Q4_1))


def _copy(src: Path, dst: Path, size: int | None = None) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data if size is None else data[:size])
    return dst


def _refused(src: Path, dst: Path, match: str, **kw) -> None:
    with pytest.raises(sw.SepweightError, match=match):
        sw.convert(src, dst, progress=False, **kw)
    assert not dst.exists()


def test_truncated_tensor_data_names_file_and_tensor(good, tmp_path):
    last = gguf.GGUFReader(good).tensors[-1]
    bad = _copy(good, tmp_path / "cut.gguf", last.data_offset + 10)
    _refused(bad, tmp_path / "out", rf"cut.gguf: tensor '{last.name}' ends at byte \d+ but the file has \d+ bytes")


def test_truncated_header(good, tmp_path):
    bad = _copy(good, tmp_path / "head.gguf", 1000)
    _refused(bad, tmp_path / "out", r"head.gguf: not a readable GGUF file .*truncated")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip file")
    _refused(tmp_path / "x.gguf", tmp_path / "out", r"x.gguf: not a readable GGUF file")
    _refused(tmp_path / "missing.gguf", tmp_path / "out", r"missing.gguf: no such GGUF file")


def test_unknown_quant_type_names_the_tensor(good, tmp_path):
    bad = _copy(good, tmp_path / "type.gguf")
    t = gguf.GGUFReader(bad).tensors[3]
    name_len, name, n_dims, dims, _, _ = t.field.parts
    where = t.field.offset + name_len.nbytes + name.nbytes + n_dims.nbytes + dims.nbytes  # the type id
    data = bytearray(bad.read_bytes())
    data[where : where + 4] = (250).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    _refused(bad, tmp_path / "out", rf"type.gguf: tensor '{t.name}' has unknown quant type id 250")


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "g.gguf", "gemma2")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    _refused(tmp_path / "g.gguf", tmp_path / "out", r"g.gguf: GGUF architecture 'gemma2' is not supported")


def test_missing_split_file(tmp_path):
    first = write_gguf(tiny_model("qwen2", seed=4), tmp_path / "s" / "m.gguf", linears(T.F16), split_max_tensors=10)
    first.with_name("m-00002-of-00003.gguf").unlink()
    _refused(first, tmp_path / "out", r"m-00001-of-00003.gguf: split GGUF model is missing file\(s\) \['m-00002")


def _rewrite(src: Path, dst: Path, fields: dict | None = None, extra: dict | None = None) -> Path:
    """A copy of a GGUF file with some metadata values replaced or added and extra F32 tensors."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    fields = dict(fields or {})
    for k, f in r.fields.items():
        if not k.startswith(("GGUF.", "general.architecture")):
            value = fields.pop(k, f.contents())
            w.add_key_value(k, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for k, value in fields.items():
        w.add_string(k, value)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_rope_scaling_is_refused(good, tmp_path):
    # RoPE scaling we cannot express is refused before anything is written (what we can: test_gguf_rope.py)
    bad = _rewrite(good, tmp_path / "rope_freqs.gguf", extra={"rope_freqs.weight": np.ones(5, np.float32)})
    _refused(bad, tmp_path / "out", r"rope_freqs.gguf: tensor 'rope_freqs.weight' is F32 \[5\], expected F32 \[12\]")
    bad = _rewrite(good, tmp_path / "yarn.gguf", fields={"llama.rope.scaling.type": "yarn"})
    _refused(bad, tmp_path / "out", r"yarn.gguf: llama.rope.scaling.type is 'yarn' but .*factor is missing")


def test_unknown_tensor_and_unigram_tokenizer_are_refused(good, tmp_path):
    bad = _rewrite(good, tmp_path / "extra.gguf", extra={"blk.0.ffn_gate_exps.weight": np.ones(12, np.float32)})
    _refused(bad, tmp_path / "out", r"extra.gguf: tensor 'blk.0.ffn_gate_exps.weight' is not part of the supported")
    bad = _rewrite(good, tmp_path / "t5.gguf", fields={"tokenizer.ggml.model": "t5"})
    _refused(bad, tmp_path / "out", r"t5.gguf: tokenizer.ggml.model is 't5'; only byte-level BPE")


def test_bad_arguments(good, tmp_path):
    with pytest.raises(sw.SepweightError, match=r"quant 'int3' is not one of"):
        convert_gguf(good, tmp_path / "out", quant="int3", progress=False)
    with pytest.raises(sw.SepweightError, match=r"int4 needs a group size in \[32, 64, 128, 256\] .* got 48 / 'clip'"):
        convert_gguf(good, tmp_path / "out", quant="int4", group_size=48, progress=False)
    with pytest.raises(sw.SepweightError, match=r"dtype 'int8' is not supported"):
        convert_gguf(good, tmp_path / "out", dtype="int8", progress=False)
    assert not (tmp_path / "out").exists()


def test_killed_conversion_resumes(good, tmp_path, monkeypatch):
    """A conversion killed after some parts resumes: finished parts are kept, the result equals a clean run."""
    import llm_sepweight.gguf_import as gi

    clean = convert_gguf(good, tmp_path / "clean", progress=False)
    real = gi._convert_part
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gi, "_convert_part", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(good, tmp_path / "out", progress=False)
    with pytest.raises(sw.SepweightError, match="interrupted; re-run the same convert command to resume"):
        sw.SepWeights(tmp_path / "out")
    monkeypatch.setattr(gi, "_convert_part", real)
    again = convert_gguf(good, tmp_path / "out", progress=False)
    assert {k: e.sha256 for k, e in again.files.items()} == {k: e.sha256 for k, e in clean.files.items()}
