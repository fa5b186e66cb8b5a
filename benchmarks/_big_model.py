"""A Qwen2.5-7B-shaped random checkpoint written straight to disk, one module per safetensors shard.

Never more than one decoder layer (~466 MB in bf16) is in RAM. One shard per module (embedding,
each layer, final norm, head) is what AirLLM's splitter hard-links instead of copying, so AirLLM's
"split" costs no disk space. Weights ~ N(0, 0.02) like a real init; norm weights ~ 1 + N(0, 0.05)
and biases ~ N(0, 0.02), so nothing is trivially 0 or 1 and activations stay finite. Deterministic:
a generator seeded per tensor name.

    python benchmarks/_big_model.py /work/cache/bench7b/hf
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

QWEN7B = dict(hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, vocab=152064)
TINY = dict(hidden=256, inter=512, layers=4, heads=4, kv_heads=2, vocab=152064)  # a smoke test of the script


def _rand(name: str, shape: tuple[int, ...], mean: float = 0.0, std: float = 0.02):
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(mean, std, generator=g)
    return t.to(torch.bfloat16)


def _layer(i: int, s: dict) -> dict:
    h, inter, d = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * d
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    out = {p + k: _rand(p + k, v) for k, v in shapes.items()}
    for k in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[p + k] = _rand(p + k, (h,), mean=1.0, std=0.05)
    return out


def _save(tensors: dict, path: Path) -> int:
    """Atomic write, fsynced, then dropped from the page cache (the builder must not warm it)."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    os.replace(tmp, path)
    return path.stat().st_size


def _tokenizer(dst: Path, vocab: int) -> None:
    """A WordLevel tokenizer (AirLLM loads one unconditionally; no hub here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)} | {"<unk>": 1000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(dst)


def build_hf(dst: Path, s: dict = QWEN7B) -> Path:
    """Write the sharded HF checkpoint into `dst` (resumable: finished shards are kept)."""
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / "model.safetensors.index.json").exists():
        return dst
    weight_map: dict[str, str] = {}
    total = 0
    h, v = s["hidden"], s["vocab"]
    modules: list[tuple[str, object]] = [("embed", lambda: {"model.embed_tokens.weight": _rand("embed", (v, h))})]
    modules += [(f"layer{i:02d}", lambda i=i: _layer(i, s)) for i in range(s["layers"])]
    modules += [("norm", lambda: {"model.norm.weight": _rand("norm", (h,), mean=1.0, std=0.05)})]
    modules += [("head", lambda: {"lm_head.weight": _rand("head", (v, h))})]
    for n, (name, make) in enumerate(modules):
        fname = f"model-{n + 1:05d}-of-{len(modules):05d}.safetensors"
        path = dst / fname
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
            total += path.stat().st_size
        else:
            tensors = make()  # type: ignore[operator]
            keys = list(tensors)
            total += _save(tensors, path)
            del tensors
        weight_map.update({k: fname for k in keys})
        print(f"  {fname} ({name})", file=sys.stderr, flush=True)
    cfg = dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=h,
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=v,
        tie_word_embeddings=False,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        hidden_act="silu",
        torch_dtype="bfloat16",
        use_cache=True,
    )
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    _tokenizer(dst, v)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = dst / "index.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, dst / "model.safetensors.index.json")
    return dst


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern))


if __name__ == "__main__":
    build_hf(Path(sys.argv[1]))
