"""GGUF import of RoPE scaling (linear / yarn metadata, Llama 3's rope_freqs tensor) and Mistral's window.

transformers' GGUF loader drops RoPE scaling for llama files, so the oracle is the original transformers
model: a tiny Llama / Qwen2 / Mistral with rope scaling (random norms and biases) is written as
llama.cpp's convert_hf_to_gguf.py writes it (tests/gguf_fixtures.py: write_rope), converted with
quant "none" in fp32, and our part's logits are compared with the original's (1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import write_gguf
from qwen_fixtures import _randomise

import llm_sepweight as sw
from llm_sepweight.gguf_import import convert_gguf
from llm_sepweight.gguf_reader import GGUFModel, GGUFTensor
from llm_sepweight.gguf_rope import ROPE_FREQS, gguf_rope_scaling, llama3_divisors

FP32 = {"atol": 1e-4, "rtol": 1e-4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3 |= {"original_max_position_embeddings": 8192}
LLAMA3_ARGS = (8.0, 1.0, 4.0, 8192)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("llama", {"rope_type": "linear", "factor": 2.0}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn_betas_attention": (
        "llama",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0}
        | {"beta_slow": 2.0, "attention_factor": 1.25},
    ),
    "llama3": ("llama", LLAMA3),  # Llama 3.1's parameters: recovered exactly
    "llama3_other": ("llama", LLAMA3 | {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}),
    "qwen2_yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


def tiny(arch: str, rope: dict[str, Any] | None = None, seed: int = 0, **extra: Any) -> Any:
    """A tiny random transformers model of `arch` with `rope` as its rope_parameters."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,  # llama3's original 8192 below it, as transformers wants
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"} | (rope or {}),
    )
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}.get(arch, transformers.MistralConfig)
    if arch != "qwen2":
        common["head_dim"] = 24  # 12 frequencies: llama3's ramp holds two of them at theta 1e4
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**(common | extra)))
    _randomise(model, seed=seed + 1)
    return model.eval()


def ids(n: int) -> torch.Tensor:
    return torch.randint(0, 384, (2, n), generator=torch.Generator().manual_seed(n))


def ours(folder: Path, x: torch.Tensor) -> torch.Tensor:
    from llm_lazy_qwen import load_part

    part = load_part(folder, "f")
    with torch.no_grad():
        out = part(x)
    part.close()
    return out


def converted(model: Any, tmp_path: Path, **write: Any) -> tuple[Path, dict[str, Any]]:
    path = write_gguf(model, tmp_path / "model.gguf", **write)
    folder = tmp_path / "sep"
    convert_gguf(path, folder, dtype="fp32", quant="none", progress=False)
    return folder, json.loads((folder / "manifest.json").read_text())["config"]


@pytest.mark.parametrize("case", list(CASES))
def test_rope_scaling_equals_the_original_model(case, tmp_path):
    arch, rope = CASES[case]
    model = tiny(arch, rope)
    folder, config = converted(model, tmp_path)
    assert config["rope_scaling"] == rope
    x = ids(300)  # llama3 divides wavelengths > 2048 positions: visible from a few hundred on
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(ours(folder, x), expected, **FP32)
    default = tiny(arch, seed=0)  # the same weights without scaling fail the comparison: the test can fail
    default.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(default(x).logits, expected, **FP32)


def test_transformers_gguf_loader_drops_llama3_scaling(tmp_path):
    """Why the oracle is the original model: transformers' own loader reads the file as default RoPE."""
    from transformers import AutoModelForCausalLM

    model = tiny("llama", LLAMA3)
    path = write_gguf(model, tmp_path / "model.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == "default"


def test_dynamic_rope_reads_as_default(tmp_path):
    # llama.cpp writes nothing for dynamic NTK: the file is default RoPE, equal within max_position_embeddings
    model = tiny("llama", {"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=64)
    folder, config = converted(model, tmp_path)
    assert "rope_scaling" not in config
    x = ids(40)
    with torch.no_grad():
        torch.testing.assert_close(ours(folder, x), model(x).logits, **FP32)


def test_mistral_window(tmp_path):
    model = tiny("mistral", sliding_window=8)
    folder, config = converted(model, tmp_path / "swa", sliding_window=True)
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 8
    x = ids(20)  # past the window
    with torch.no_grad():
        torch.testing.assert_close(ours(folder, x), model(x).logits, **FP32)
    # as llama.cpp's converter writes it (no window): a Llama, equal to the Mistral within its window
    folder, config = converted(model, tmp_path / "plain")
    assert config["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in config
    x = ids(8)
    with torch.no_grad():
        torch.testing.assert_close(ours(folder, x), model(x).logits, **FP32)


def _fake(metadata: dict[str, Any], divisors: np.ndarray | None = None) -> GGUFModel:
    tensors = {}
    if divisors is not None:
        data = divisors.astype(np.float32)
        tensors[ROPE_FREQS] = GGUFTensor(
            ROPE_FREQS, Path("m.gguf"), int(gguf.GGMLQuantizationType.F32), "F32", data.shape, data
        )
    return GGUFModel([Path("m.gguf")], {"general.architecture": "llama"} | metadata, tensors)


@pytest.mark.parametrize(
    "theta, dim, factor, low, high",
    [(500000.0, 128, 8.0, 1.0, 4.0), (500000.0, 64, 32.0, 1.0, 4.0), (500000.0, 128, 16.0, 1.5, 6.0)],
)
def test_llama3_recovered_from_real_shapes(theta, dim, factor, low, high):
    # Llama 3.1 8B / 3.2 1B shapes exactly; other ramp parameters through the fit
    d = llama3_divisors(theta, dim, factor, low, high, 8192).numpy()
    got = gguf_rope_scaling(_fake({}, d), dim, theta, 131072)
    expected = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high}
    assert got == expected | {"original_max_position_embeddings": 8192}


def test_bad_rope_metadata_is_refused():
    def refused(metadata: dict[str, Any], match: str, divisors: np.ndarray | None = None) -> None:
        with pytest.raises(sw.SepweightError, match=match):
            gguf_rope_scaling(_fake(metadata, divisors), 24, 10000.0, 256)

    refused({}, r"m.gguf: tensor 'rope_freqs.weight' is F32 \[5\], expected F32 \[12\]", np.ones(5))
    wrong = np.linspace(1.0, 3.0, 12)  # a ramp over every frequency: no Llama 3 parameters give it
    refused({}, r"tensor 'rope_freqs.weight': these per-frequency RoPE divisors are not Llama 3's", wrong)
    refused({}, r"non-positive or non-finite divisors", np.zeros(12))
    refused({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, r"llama3 RoPE\) and", np.ones(12))
    refused({"llama.rope.scaling.type": "yarn"}, r"llama.rope.scaling.type is 'yarn' but .*factor is missing")
    refused({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0}, r"'longrope'; supported")
    refused({"llama.rope.scaling.alpha": 1000.0}, r"\['llama.rope.scaling.alpha'\] is RoPE scaling we cannot map")
    attn = {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 2.0,
        "llama.rope.scaling.attn_factor": 2.0,
    }
    refused(attn, r"attn_factor=2.0 is only supported with yarn")
    ext = {
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 2.0,
        "llama.rope.scaling.yarn_ext_factor": 0.5,
    }
    refused(ext, r"yarn_ext_factor=0.5 is not supported")


def test_rope_metadata_as_llama_cpp_reads_it():
    assert gguf_rope_scaling(_fake({}, np.ones(12)), 24, 1e4, 256) is None  # divides nothing
    unit = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}
    assert gguf_rope_scaling(_fake(unit, llama3_divisors(1e4, 24, *LLAMA3_ARGS).numpy()), 24, 1e4, 256) == LLAMA3
    assert gguf_rope_scaling(_fake({"llama.rope.scale_linear": 4.0}), 24, 1e4, 256) == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    yarn = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    plain = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}  # llama.cpp's default
    assert gguf_rope_scaling(_fake(yarn), 24, 1e4, 256) == plain
    # Mistral-format files: yarn_log_multiplier is mscale_all_dim (mscale 1), as llama.cpp computes
    got = gguf_rope_scaling(_fake(yarn | {"llama.rope.scaling.yarn_log_multiplier": 1.0}), 24, 1e4, 256)
    assert got == plain | {"mscale": 1.0, "mscale_all_dim": 1.0}
    # attn_factor multiplies the factor transformers would compute (0.1 ln 4 + 1)
    got = gguf_rope_scaling(_fake(yarn | {"llama.rope.scaling.attn_factor": 2.0}), 24, 1e4, 256)
    assert got == plain | {"attention_factor": pytest.approx(2 * (0.1 * np.log(4.0) + 1))}
