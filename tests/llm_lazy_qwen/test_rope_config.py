"""RoPE configs read as transformers reads them; rope.py's table equals its ROPE_INIT_FUNCTIONS; the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_fixtures import build_family
from lazy_helpers import FP32

import llm_sepweight as sw
from llm_lazy_qwen import ConfigError, QwenConfig, load_part
from llm_lazy_qwen.rope import ROPE_INIT

ROPES = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "linear", "factor": 1},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 3.0,
        "original_max_position_embeddings": 100,
    },
    {"rope_type": "yarn", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24, "truncate": False},
    {"rope_type": "yarn", "factor": 3.0, "beta_fast": 8, "beta_slow": 2, "mscale": 1.3, "mscale_all_dim": 0.7},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},  # factor = the length ratio
    {"type": "yarn", "factor": 0.5},  # v4 key; a factor <= 1 has no attention temperature
]


def _base(**extra) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=64,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=24,
        vocab_size=10,
        max_position_embeddings=64,
        **extra,
    )


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: str(r.get("rope_type", r.get("type"))))
@pytest.mark.parametrize("style", ["v4", "v5"])
def test_table_equals_transformers(rope, style):
    """inv_freq and the attention factor, bit for bit, from the same config.json through both readers."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = _base(rope_parameters={**rope, "rope_theta": 5e5})
    if style == "v4":
        raw = _base(rope_scaling=dict(rope), rope_theta=5e5)
    ours = QwenConfig.from_dict(json.loads(json.dumps(raw)))
    theirs = LlamaConfig(**json.loads(json.dumps(raw)))
    rope_type = theirs.rope_parameters["rope_type"]
    assert ours.rope_type == rope_type
    assert ours.rope_parameters == theirs.rope_parameters
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[rope_type](theirs) if rope_type != "default" else (None, 1.0)
    got_inv, got_factor = ROPE_INIT[rope_type](ours.rope_parameters, 24, 64, None)
    if want_inv is None:  # the default is the model class's own function
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want_inv, want_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(theirs)
    assert got_factor == want_factor
    torch.testing.assert_close(got_inv, want_inv, atol=0, rtol=0)
    for seq_len in [100, torch.tensor(100)] if rope_type == "dynamic" else []:  # the run-time recompute
        torch.testing.assert_close(
            ROPE_INIT["dynamic"](ours.rope_parameters, 24, 64, seq_len)[0],
            ROPE_INIT_FUNCTIONS["dynamic"](theirs, seq_len=seq_len)[0],
            atol=0,
            rtol=0,
        )


def test_rope_parameters_theta_wins_over_top_level(tmp_path):
    """Issue 15 #12: config.json with rope_theta 1e4 at the top and 5e5 in rope_parameters: transformers uses 5e5."""
    ckpt = build_family("linear", tmp_path)
    cfg = json.loads((ckpt.hf / "config.json").read_text())
    cfg["rope_theta"], cfg["rope_parameters"]["rope_theta"] = 10000.0, 5e5
    (ckpt.hf / "config.json").write_text(json.dumps(cfg))
    sw.convert(ckpt.hf, tmp_path / "sep2", progress=False)
    assert QwenConfig.from_json(ckpt.hf / "config.json").rope_theta == 5e5
    tokens = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(0))
    hf = ckpt.oracle()
    assert hf.config.rope_parameters["rope_theta"] == 5e5
    with torch.no_grad():
        torch.testing.assert_close(load_part(tmp_path / "sep2")(tokens), hf(tokens).logits, **FP32)


def test_v4_scaling_folds_like_transformers():
    # rope_scaling wins over rope_parameters; the top-level theta and original length fill it in
    cfg = QwenConfig.from_dict(
        _base(
            rope_theta=1e6,
            rope_parameters={"rope_type": "default", "rope_theta": 7.0},
            rope_scaling={"type": "yarn", "factor": 4.0},
        )
    )
    assert (cfg.rope_type, cfg.rope_theta) == ("yarn", 1e6)
    assert cfg.rope_parameters["original_max_position_embeddings"] == 64
    top = _base(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    top["original_max_position_embeddings"] = 32  # a top-level original length wins (as transformers)
    assert QwenConfig.from_dict(top).rope_parameters["original_max_position_embeddings"] == 32
    # YaRN serves factor x the original length; dynamic scaling any length
    qwen = QwenConfig.from_dict(
        {**_base(), "model_type": "qwen2", "max_position_embeddings": 32768,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    )  # fmt: skip
    assert qwen.max_positions == 131072
    assert QwenConfig.from_dict(_base(rope_scaling={"type": "linear", "factor": 4.0})).max_positions == 64


def test_yarn_serves_factor_times_the_original_length(tmp_path):
    """Qwen2.5's recipe: max_position_embeddings left at the original length, YaRN factor 4 on top."""
    ckpt = build_family("yarn", tmp_path)  # factor 4 x original 64
    cfg = json.loads((ckpt.hf / "config.json").read_text()) | {"max_position_embeddings": 64}
    (ckpt.hf / "config.json").write_text(json.dumps(cfg))
    sw.convert(ckpt.hf, tmp_path / "sep64", progress=False)
    part = load_part(tmp_path / "sep64")
    tokens = torch.randint(0, 384, (1, 5), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[180, 181, 182, 250, 255]])
    with torch.no_grad():
        want = ckpt.oracle()(tokens, position_ids=positions).logits
        torch.testing.assert_close(part(tokens, position_ids=positions), want, **FP32)
        with pytest.raises(ValueError, match="position 256 is beyond YaRN's length=256"):
            part(tokens[:, :1], position_ids=torch.tensor([[256]]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, r"rope_scaling: rope type 'longrope' is not supported \(supported: default, linear, dynamic, yarn, llama3\)"),
        ({"rope_parameters": {"rope_type": "su"}}, r"rope_parameters: rope type 'su' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, r"rope_parameters: rope type 'llama3' needs \['low_freq_factor', 'high_freq_factor'\]"),
        ({"rope_scaling": {"type": "linear"}}, r"rope_scaling: rope type 'linear' needs \['factor'\]"),
        ({"rope_scaling": {"type": "dynamic", "factor": "2"}}, r"rope_scaling.factor must be a number, got '2'"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, r"rope_parameters.partial_rotary_factor=0.5 is not supported"),
        ({"partial_rotary_factor": 0.25}, r"partial_rotary_factor=0.25 is not supported"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters: RoPE parameters per layer type are not supported"),
        ({"rope_scaling": [2.0]}, r"rope_scaling must be an object"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ],
)  # fmt: skip
def test_unsupported_fields_are_named(extra, message):
    with pytest.raises(ConfigError, match=rf"^cfg\.json: {message}"):
        QwenConfig.from_dict(_base(**extra), source="cfg.json")


def test_unknown_architecture_is_named():
    raw = {**_base(), "architectures": ["GemmaForCausalLM"], "model_type": "gemma"}
    with pytest.raises(
        ConfigError, match=r"model_type 'gemma' / architectures \['GemmaForCausalLM'\] is not a supported"
    ):
        QwenConfig.from_dict(raw)
    raw = {k: v for k, v in _base().items() if k != "model_type"} | {"architectures": ["MistralForCausalLM"]}
    assert QwenConfig.from_dict(raw).model_type == "mistral"


def test_loaders_read_the_manifest_and_name_it(tmp_path):
    """Issue 15 #12: one source of truth, the config inside manifest.json; errors name that file."""
    ckpt = build_family("llama_bias", tmp_path)
    config_json = ckpt.sep / "config.json"
    original = config_json.read_text()
    edited = json.loads(original) | {"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}
    config_json.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=r"sep/config.json differs from the config recorded in .*sep/manifest.json"):
        load_part(ckpt.sep)
    config_json.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json differs from the config recorded"):
        load_part(ckpt.sep)
    config_json.write_text(original)
    load_part(ckpt.sep)  # restored: loads
    # a folder converted from a config we refuse: the message names manifest.json, the file read
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (bad / "config.json").write_text(json.dumps(cfg))
    sw.convert(bad, tmp_path / "bad-sep", progress=False)
    with pytest.raises(ConfigError, match=r"bad-sep/manifest.json \(config\): rope_parameters: rope type 'longrope'"):
        load_part(tmp_path / "bad-sep")
