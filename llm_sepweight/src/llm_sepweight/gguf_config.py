"""config.json from a GGUF model's metadata, as transformers' GGUF loader builds it.

transformers (``GGUF_CONFIG_MAPPING`` in ``integrations/ggml.py``) renames llama.cpp's keys
(``llama.embedding_length`` -> ``hidden_size``, ...), takes ``tie_word_embeddings`` from the absence of
an ``output.weight`` tensor and the special token ids from ``tokenizer.ggml.*``. We add
``architectures`` (our loaders pick the model by it) and read Qwen3's ``attention.key_length`` as its
``head_dim`` (transformers leaves Qwen3Config's default of 128, which is the same for every real Qwen3).
RoPE scaling (linear / yarn metadata, Llama 3's ``rope_freqs`` tensor) becomes ``rope_scaling``
(:mod:`llm_sepweight.gguf_rope`; transformers' loader drops it). A llama file with
``attention.sliding_window`` is a Mistral with that window (llama.cpp's converter does not write one:
Mistral 7B v0.1's files read as full attention, as llama.cpp runs them).
"""

from __future__ import annotations

from typing import Any

from .errors import SepweightError
from .gguf_reader import ARCHITECTURES, GGUFModel
from .gguf_rope import gguf_rope_scaling

# llama.cpp key (after the architecture prefix) -> config.json key
_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_TOKEN_IDS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def gguf_config(model: GGUFModel) -> dict[str, Any]:
    """The config.json dict of a qwen2 / qwen3 / llama GGUF model.

    Example::

        config = gguf_config(open_gguf("model.gguf"))
        config["architectures"], config["num_hidden_layers"]   # (['LlamaForCausalLM'], 30)
    """
    arch = model.architecture
    where = model.paths[0]
    missing = [f"{arch}.{k}" for k in _REQUIRED if model.key(k) is None]
    if missing:
        raise SepweightError(f"{where}: GGUF metadata lacks {missing}; the file is not a complete {arch} model")
    config: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu"}
    for gguf_key, key in _KEYS.items():
        if (value := model.key(gguf_key)) is not None:
            config[key] = value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    embed = model.tensors.get("token_embd.weight")
    if "vocab_size" not in config:  # as transformers: the tokenizer's length, here also the embedding's rows
        tokens = model.metadata.get("tokenizer.ggml.tokens")
        config["vocab_size"] = embed.shape[0] if embed is not None else len(tokens or ())
    if embed is not None and embed.shape != (config["vocab_size"], config["hidden_size"]):
        raise SepweightError(
            f"{where}: tensor 'token_embd.weight' has shape {list(embed.shape)}, but the metadata says "
            f"vocab_size={config['vocab_size']}, hidden_size={config['hidden_size']}"
        )
    head_dim = _head_dim(model, config)
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch != "qwen2":  # qwen2's q/k/v bias is implied by the architecture; qwen3/llama state it
        config["attention_bias"] = "blk.0.attn_q.bias" in model.tensors
    config["tie_word_embeddings"] = "output.weight" not in model.tensors
    theta = float(config.get("rope_theta", 10000.0))
    context = int(config.get("max_position_embeddings", 2048))
    dim = head_dim or config["hidden_size"] // config["num_attention_heads"]
    if (scaling := gguf_rope_scaling(model, dim, theta, context)) is not None:
        config["rope_scaling"] = scaling
    _sliding_window(model, config)
    for key, gguf_key in _TOKEN_IDS.items():
        if (value := model.metadata.get(gguf_key)) is not None:
            config[key] = value
    return config


def _head_dim(model: GGUFModel, config: dict[str, Any]) -> int | None:
    """llama: ``rope.dimension_count`` (as transformers); qwen3: ``attention.key_length`` (else 128)."""
    arch = model.architecture
    if arch == "llama":
        return model.key("rope.dimension_count", model.key("attention.key_length"))
    if arch == "qwen3":
        return model.key("attention.key_length", 128)
    return model.key("attention.key_length")


def _sliding_window(model: GGUFModel, config: dict[str, Any]) -> None:
    """llama + ``attention.sliding_window`` W > 0: MistralForCausalLM sliding over W keys on every layer."""
    window = model.key("attention.sliding_window")
    if model.architecture != "llama" or not window:
        return
    if config.get("attention_bias"):
        raise SepweightError(
            f"{model.paths[0]}: llama.attention.sliding_window={window} with q/k/v biases is neither Llama nor Mistral"
        )
    del config["attention_bias"]
    config |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": int(window)}
