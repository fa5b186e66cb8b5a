"""Tiny GGUF files written from tiny transformers models with gguf's GGUFWriter, as llama.cpp writes them.

``write_gguf(model, path, types)`` stores each tensor as the GGML type ``types`` picks for it
(F32/F16/Q8_0/Q4_0/Q4_1 through ``gguf.quants.quantize``; Q4_K/Q6_K as hand-packed blocks, which
gguf cannot write), permutes llama's Q/K rows as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``
does, and writes the metadata and a byte-level BPE tokenizer (the tests' tiny one) with a chat template.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from qwen_fixtures import DATA, _randomise, _tokenizer

T = gguf.GGMLQuantizationType
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_model(arch: str, tied: bool = False, hidden: int = 64, intermediate: int = 96, seed: int = 0) -> Any:
    """A tiny random transformers model (randomised norms and biases) of a GGUF architecture."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "qwen3":  # transformers' GGUF loader leaves Qwen3's head_dim at its default, 128
        config = transformers.Qwen3Config(head_dim=128, **common)
    else:  # transformers' GGUF loader takes llama's head_dim from rope.dimension_count
        config = transformers.LlamaConfig(head_dim=24, **common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed=seed + 1)
    return model.eval()


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    base, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[base]}.{suffix}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head already the kv count for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def linears(qtype: T, embed: T = T.F32, head: T | None = None) -> Callable[[str, np.ndarray], T]:
    """A type policy: 2-D linears as `qtype`, the embedding as `embed`, the head as `head` (default `qtype`)."""

    def pick(name: str, w: np.ndarray) -> T:
        if w.ndim == 1:
            return T.F32
        if name == "token_embd.weight":
            return embed
        if name == "output.weight" and head is not None:
            return head
        return qtype

    return pick


def k_quant_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks (uint8 rows), with small finite fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == T.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    elif qtype == T.Q6_K:  # ql[128], qh[64], scales[16] int8, d
        raw[..., 208:210] = d
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def tokenizer_metadata(vocab_size: int, kind: str = "gpt2") -> dict[str, Any]:
    """tokens / types / merges (gpt2) or scores (llama: sentencepiece, as Llama 2 files) of a tiny vocabulary
    trained on tests/data/corpus.txt, padded to the model's vocabulary as llama.cpp pads."""
    if kind == "llama":
        from tokenizers import SentencePieceBPETokenizer

        spm = SentencePieceBPETokenizer()
        spm.train([str(DATA / "corpus.txt")], vocab_size=100, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"])
        vocab = json.loads(spm.to_str())["model"]["vocab"]
        pieces = [t for t in sorted(vocab, key=vocab.get) if t not in ("<unk>", "<s>", "</s>")]
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
        scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
        pad = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        return {
            "tokens": tokens + pad,
            "types": types + [gguf.TokenType.UNUSED] * len(pad),
            "scores": scores + [0.0] * len(pad),
            "bos": 1,
            "eos": 2,
            "pad": None,
            "unk": 0,
        }
    tok = json.loads(_tokenizer(300).to_str())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    pad = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {
        "tokens": tokens + pad,
        "types": types + [gguf.TokenType.UNUSED] * len(pad),
        "merges": merges,
        "bos": tokens.index("<|im_end|>"),
        "eos": tokens.index("<|im_end|>"),
        "pad": tokens.index("<|endoftext|>"),
        "unk": None,
    }


def write_gguf(
    model: Any,
    path: Path,
    types: Callable[[str, np.ndarray], T] | None = None,
    pre: str = "qwen2",
    add_bos: bool | None = False,
    vocab: str = "gpt2",
    split_max_tensors: int = 0,
    k_quants: dict[str, T] | None = None,
    sliding_window: bool = False,
) -> Path:
    """Write `model` as a GGUF file (or split files); returns the (first) file's path.

    `k_quants` replaces named tensors by random hand-packed K-quant blocks (transformers then loads those);
    `vocab` "llama" writes a sentencepiece vocabulary (scores, byte tokens) instead of byte-level BPE;
    `add_bos` None leaves ``tokenizer.ggml.add_bos_token`` out (as older files do). RoPE scaling is
    written as llama.cpp writes it (:func:`write_rope`); a Mistral as arch "llama", its window only with
    `sliding_window` (llama.cpp's converter leaves it out).
    """
    cfg = model.config
    arch = "llama" if cfg.model_type == "mistral" else cfg.model_type
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    write_rope(w, cfg)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    tok = tokenizer_metadata(cfg.vocab_size, vocab)
    w.add_tokenizer_model(vocab)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if tok["pad"] is not None:
        w.add_pad_token_id(tok["pad"])
    if tok["unk"] is not None:
        w.add_unk_token_id(tok["unk"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf)
        data = t.detach().float().numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            data = llama_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            data = llama_permute(data, cfg.num_key_value_heads)
        if k_quants and name in k_quants:
            qtype = k_quants[name]
            w.add_tensor(name, k_quant_blocks(qtype, *data.shape), raw_dtype=qtype)
            continue
        qtype = (types or linears(T.F32))(name, data)
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, gguf.quants.quantize(data, qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0] if split_max_tensors else path


def write_rope(w: gguf.GGUFWriter, cfg: Any) -> None:
    """RoPE scaling as convert_hf_to_gguf.py writes it: linear / yarn as metadata (TextModel's
    set_gguf_parameters), llama3 as a ``rope_freqs`` tensor (LlamaModel's generate_extra_tensors, with its
    ``old_context_len`` from the top-level config, 8192 when absent); dynamic not at all."""
    rope = dict(cfg.rope_parameters)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if (beta_fast := rope.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(beta_fast)
        if (beta_slow := rope.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(beta_slow)
    elif kind == "llama3":
        base, dim = rope["rope_theta"], cfg.head_dim
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = getattr(cfg, "original_max_position_embeddings", None) or 8192
        factors: list[Any] = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())
