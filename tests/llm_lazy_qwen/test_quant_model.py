"""A quantized sepweight folder loaded by load_part (in RAM and lazy, every stream mode) equals transformers'
model with the folder's dequantized weights loaded (``llm_sepweight.dequantize``): logits and greedy tokens."""

from __future__ import annotations

import copy
import gc
import hashlib
import inspect
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from lazy_helpers import FP32, token_ids
from safetensors.torch import load_file, save_file

import llm_sepweight as sw
from llm_lazy_qwen import QuantLinear, load_part
from llm_lazy_qwen import quant as quant_mod

pytestmark = pytest.mark.skipif(
    "quant" not in inspect.signature(sw.convert).parameters or not hasattr(sw.SepWeights, "linears"),
    reason="llm_sepweight.convert(quant=...) / SepWeights.linears not there yet",
)
G = 32  # divides every in_features of the tiny models (64, 96)
_QUANT_SUFFIXES = (".qweight", ".scales", ".scales_and_zeros")


@pytest.fixture(scope="module")
def quantized(qwen_checkpoints, tmp_path_factory):
    """``quantized(name, scheme, dtype) -> (folder, TinyCheckpoint)``, converted once per module."""
    root = tmp_path_factory.mktemp("quant")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(name: str, scheme: str, dtype: str = "fp32"):
        ckpt = qwen_checkpoints(name)
        key = (name, scheme, dtype)
        if key not in cache:
            extra = {"group_size": G} if scheme == "int4" else {}
            sw.convert(ckpt.path, root / "-".join(key), dtype=dtype, quant=scheme, progress=False, **extra)
            cache[key] = root / "-".join(key)
        return cache[key], ckpt

    return get


def _dequantized_state(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The folder's weights in transformers' names, quantized linears dequantized (the oracle's weights)."""
    src = sw.SepWeights(folder)
    parts: list[tuple[int | str, str]] = [("begin", "model."), ("end", "")]
    parts += [(i, f"model.layers.{i}.") for i in range(src.num_layers)]
    out = {}
    for part, prefix in parts:
        tensors = src.begin() if part == "begin" else src.end() if part == "end" else src.layer(part)
        for name, spec in src.linears(part).items():
            mine = {k: v for k, v in tensors.items() if k.startswith(name + ".") and k.endswith(_QUANT_SUFFIXES)}
            out[f"{prefix}{name}.weight"] = sw.dequantize(mine, spec, dtype)
        for k, v in tensors.items():
            if not k.endswith(_QUANT_SUFFIXES):
                out[k if part == "end" and k == "lm_head.weight" else f"{'model.' if part == 'end' else prefix}{k}"] = (
                    v.to(dtype)
                )
    return out


def _oracle(folder: Path, ckpt, dtype: torch.dtype = torch.float32):
    model = copy.deepcopy(ckpt.model).to(dtype)
    state = _dequantized_state(folder, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if ckpt.variant.tied:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(
    ("lazy", "mode"), [(False, "auto"), (True, "mmap"), (True, "copy")], ids=["ram", "lazy-mmap", "lazy-copy"]
)
@pytest.mark.parametrize("path", ["kernel", "dequant"])
def test_quantized_folder_equals_transformers_on_dequantized_weights(quantized, scheme, lazy, mode, path, monkeypatch):
    # every product through the int kernel (decode's path; fp32 takes it for one row only), or through
    # dequantize + GEMM (prefill's path)
    monkeypatch.setattr(quant_mod, "kernel_max_rows", lambda dtype: 10**9 if path == "kernel" else 0)
    folder, ckpt = quantized("qwen2", scheme)
    ids = token_ids()
    with torch.no_grad():
        want = _oracle(folder, ckpt)(ids).logits
    part = load_part(folder, lazy=lazy, stream_mode=mode, head_chunk_size=128)
    try:
        assert any(isinstance(m, QuantLinear) for m in part.modules())
        assert isinstance(part.lm_head, QuantLinear)  # the untied head is quantized
        with torch.no_grad():
            for _ in range(2):  # streamed: the second pass maps / reads everything again
                torch.testing.assert_close(part(ids), want, **FP32)

            def settled() -> None:  # retired items unmapped by the worker, cycles collected: only live tensors left
                if lazy:
                    part._streamer._pool.submit(lambda: None).result()
                gc.collect()

            settled()
            prepared = len(quant_mod._prepared)
            for _ in range(2):  # streamed weights' prepared scales die with them: nothing accumulates
                part(ids[:, :1])
            settled()
            assert len(quant_mod._prepared) <= prepared
    finally:
        part.close()


@pytest.mark.parametrize("name", ["qwen3", "qwen2_tied"])
def test_other_variants_in_int4(quantized, name):
    folder, ckpt = quantized(name, "int4")
    ids = token_ids(seed=3)
    with torch.no_grad():
        want = _oracle(folder, ckpt)(ids).logits
        for lazy in (False, True):
            part = load_part(folder, lazy=lazy, head_chunk_size=100)  # rounded down to 64 rows for int4
            try:
                torch.testing.assert_close(part(ids), want, **FP32)
                if name == "qwen2_tied":
                    assert not isinstance(part.lm_head, QuantLinear)  # a tied head stays the embedding
            finally:
                part.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
def test_greedy_decode_with_a_kv_cache_equals_transformers(quantized, scheme, lazy):
    folder, ckpt = quantized("qwen2", scheme)
    prompt = token_ids(batch=1, seq=7, seed=5)
    steps = 16
    with torch.no_grad():
        hf = _oracle(folder, ckpt)
        want = hf.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
        part = load_part(folder, lazy=lazy)
        try:
            cache = part.new_cache()
            ids = prompt
            nxt = part(ids, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps - 1):
                ids = torch.cat([ids, nxt], 1)
                nxt = part(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        finally:
            part.close()
    assert torch.equal(ids, want)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_folder_within_bf16_tolerance(quantized, scheme):
    folder, ckpt = quantized("qwen2", scheme, "bf16")
    ids = token_ids()
    with torch.no_grad():
        want = _oracle(folder, ckpt).float()(ids).logits  # the bf16-stored weights, computed in fp32
        for lazy in (False, True):
            part = load_part(folder, lazy=lazy)
            try:
                got = part(ids)
                assert got.dtype == torch.bfloat16
                err = (got.float() - want).abs().max() / want.abs().max()
                assert err < 3e-2, f"bf16 relative error {err:.3g}"
            finally:
                part.close()


def test_fp32_compute_over_a_bf16_folder(quantized):
    folder, ckpt = quantized("qwen2", "int4", "bf16")
    ids = token_ids()
    with torch.no_grad():
        want = _oracle(folder, ckpt).float()(ids).logits
        part = load_part(folder, dtype="fp32")
        torch.testing.assert_close(part(ids), want, **FP32)


def test_head_chunks_of_a_quantized_head_are_its_dequantized_weight(quantized):
    folder, ckpt = quantized("qwen2", "int4")
    want = _oracle(folder, ckpt).lm_head.weight
    for lazy in (False, True):
        part = load_part(folder, lazy=lazy, head_chunk_size=128)
        try:
            chunks = list(part.head_chunks())
            assert [(a, b) for a, b, _ in chunks] == [(0, 128), (128, 256), (256, 384)]
            torch.testing.assert_close(torch.cat([w for _, _, w in chunks]), want, **FP32)
        finally:
            part.close()


def test_config_that_disagrees_with_the_quantized_tensors_is_a_clear_error(quantized, tmp_path):
    folder, _ = quantized("qwen2", "int8")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"] = cfg
    (bad / "manifest.json").unlink()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for lazy in (False, True):
        with pytest.raises(
            ValueError, match=r"layer 0: mlp.gate_proj: quantized weight has shape \[96, 64\], the config"
        ):
            load_part(bad, lazy=lazy)


def _repacked_folder(folder: Path, dst: Path, layout: str) -> Path:
    """A copy of `folder` whose int4 kernel-layout weights are packed for another CPU (`layout`)."""
    shutil.copytree(folder, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        tensors = load_file(dst / name)
        for key, info in entry["tensors"].items():
            q = info.get("quant")
            if q and q["scheme"] == "int4" and q["layout"] != "rows":
                tensors[key] = sw.pack_int4(sw.unpack_int4(tensors[key], q["layout"]), layout)
                q["layout"] = layout
        save_file(tensors, dst / name)
        entry["size"] = (dst / name).stat().st_size
        entry["sha256"] = hashlib.sha256((dst / name).read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_another_cpus_int4_layout_loads_with_a_warning_and_equal_logits(quantized, tmp_path):
    folder, _ = quantized("qwen2", "int4")
    other = "aten_cpu_avx512" if sw.int4_layout() != "aten_cpu_avx512" else "aten_cpu_avx2"
    foreign = _repacked_folder(folder, tmp_path / "foreign", other)
    ids = token_ids()
    with torch.no_grad():
        want = load_part(folder)(ids)
        for lazy, how in ((False, "re-packing them once at load"), (True, "dequantized per forward")):
            with pytest.warns(UserWarning, match=rf"packed for \['{other}'\], but this CPU's kernel takes .*{how}"):
                part = load_part(foreign, lazy=lazy, head_chunk_size=128)
            try:
                layouts = {m.spec.layout for m in part.modules() if isinstance(m, QuantLinear)}
                assert other not in layouts if not lazy else other in layouts
                for _ in range(2):
                    torch.testing.assert_close(part(ids), want, **FP32)
            finally:
                part.close()


def test_a_malformed_quant_entry_is_a_clear_error(quantized, tmp_path):
    folder, _ = quantized("qwen2", "int4")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["mid.00001.safetensors"]["tensors"]["mlp.down_proj.qweight"]["quant"]["layout"] = "aten_cpu_sse"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for lazy in (False, True):
        with pytest.raises(ValueError, match=r"mid.00001.safetensors: mlp.down_proj.qweight.*'aten_cpu_sse'"):
            load_part(bad, lazy=lazy)


def test_matmul_bsm_leaves_quantized_linears_on_their_own_path(quantized):
    pytest.importorskip("llm_bsm_kernel")
    folder, _ = quantized("qwen2", "int8")
    ids = token_ids(seq=40)  # 80 rows: the bsm bundles would engage for plain linears
    with torch.no_grad():
        want = load_part(folder)(ids)
        torch.testing.assert_close(load_part(folder, matmul="bsm")(ids), want, **FP32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_folder_under_a_memory_budget(quantized, scheme):
    """Items sized at their stored dtypes (ints as stored); quantized head chunks read as rows of each tensor."""
    folder, _ = quantized("qwen2", scheme)
    small = {"max_context": 64, "head_chunk_size": 128}
    everything = load_part(folder, memory_budget=10**12, **small)
    plan = everything.memory_plan
    everything.close()
    part = load_part(folder, memory_budget=(plan.minimum + plan.peak) // 2, **small)
    ids = token_ids()
    try:
        assert part.memory_plan.resident and part.memory_plan.streamed
        assert any(isinstance(i, tuple) for i in part.memory_plan.streamed + part.memory_plan.resident)
        with torch.no_grad():
            want = load_part(folder)(ids)
            for _ in range(2):
                torch.testing.assert_close(part(ids), want, **FP32)
    finally:
        part.close()


def test_resident_layers_keep_their_parameters_between_calls(quantized):
    """Under a budget, resident layers are swapped in as the same Parameters every call, so the scales
    QuantLinear prepares per weight (cached by tensor object) are prepared once, not per token."""
    folder, _ = quantized("qwen2", "int4")
    part = load_part(folder, memory_budget=10**12, max_context=64)
    try:
        assert part.memory_plan.resident and not part.memory_plan.streamed
        seen = []
        for _ in range(2):
            with part.materialized(0) as layer:
                seen.append(dict(layer.named_parameters()))  # held: ids cannot be reused
        assert seen[0] and seen[0].keys() == seen[1].keys()
        assert all(seen[0][k] is seen[1][k] for k in seen[0])
        with torch.no_grad():
            torch.testing.assert_close(part(token_ids()), load_part(folder)(token_ids()), **FP32)
    finally:
        part.close()
    # close() lets the resident weights go (the streamer drops its copies; the reused Parameters must not keep them)
    gone = weakref.ref(seen[0][next(iter(seen[0]))])
    del seen
    gc.collect()
    assert gone() is None
