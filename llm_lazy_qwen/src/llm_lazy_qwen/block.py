"""Attention and the decoder layer, equal to transformers' Qwen2/Qwen3/Llama/Mistral (eager/sdpa) implementations."""

from __future__ import annotations

import torch
from torch import nn

from . import bsm_path
from .attention import grouped_attention
from .bsm_path import Matmul
from .config import QwenConfig
from .kv_cache import LayerCache, attention_mask
from .layers import MLP, RMSNorm, linear
from .rope import apply_rope


class Attention(nn.Module):
    """GQA self-attention (k and v are not repeated over the query heads: attention.py); Qwen3 adds
    per-head RMSNorm on q and k before RoPE (``cfg.qk_norm``).

    ``matmul="bsm"`` computes q/k/v and the attention products as llm_bsm_kernel bundles (bsm_path.py);
    quantized q/k/v (``QuantLinear``) are not plain ``nn.Linear`` and keep their own path.
    """

    def __init__(
        self, cfg: QwenConfig, layer: int, device: torch.device | str | None = None, matmul: Matmul = "torch"
    ) -> None:
        super().__init__()
        self.matmul = matmul
        assert cfg.head_dim is not None and cfg.num_key_value_heads is not None
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window(layer)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(h, self.n_heads * d, cfg.qkv_bias, device)
        self.k_proj = linear(h, self.n_kv * d, cfg.qkv_bias, device)
        self.v_proj = linear(h, self.n_kv * d, cfg.qkv_bias, device)
        self.o_proj = linear(self.n_heads * d, h, cfg.o_bias, device)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, device) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        cos: torch.Tensor,  # (B, T, d)
        sin: torch.Tensor,
        start: int,
        cache: LayerCache | None,
        key_mask: torch.Tensor | None,  # (B, start + T) bool, None = no padding
    ) -> torch.Tensor:
        B, T, _ = x.shape
        bsm = self.matmul == "bsm" and bsm_path.worth_it(x)
        if bsm and bsm_path.plain_linears(self.q_proj, self.k_proj, self.v_proj):
            q, k, v = bsm_path.linears(x, [self.q_proj, self.k_proj, self.v_proj])  # one bundle
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nKV, T, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nH, T, d)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nKV, T, d): the cache stores rotated keys
        q_pos = torch.arange(start, start + T, device=x.device)
        if cache is not None:
            k, v, k_pos = cache.update(k, v, start)  # (B, nKV, K, d), (K,)
        else:
            k_pos = q_pos
        mask: torch.Tensor | None = None
        causal = False
        plain = key_mask is None and self.window is None
        if plain and T > 1 and k_pos.numel() == T and not bsm:
            causal = True  # prefill from an empty cache: SDPA's (top-left) causal mask is exact here
        elif not (plain and T == 1):  # one query with no padding/window sees every key: no mask
            mask = attention_mask(q_pos, k_pos, self.window, key_mask)
        if bsm:  # GQA by broadcasting each KV head over its query group, no repeat_interleave
            out = bsm_path.gqa_attention(q, k, v, mask)  # (B, nH, T, d)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        out = grouped_attention(q, k, v, mask, causal)  # (B, nH, T, d): k, v not repeated (attention.py)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(
        self, cfg: QwenConfig, layer: int, device: torch.device | str | None = None, matmul: Matmul = "torch"
    ) -> None:
        super().__init__()
        self.matmul = matmul
        self.self_attn = Attention(cfg, layer, device, matmul)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, device, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: LayerCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache, key_mask)
        m = self.mlp
        if self.matmul == "bsm" and bsm_path.worth_it(h) and bsm_path.plain_linears(m.gate_proj, m.up_proj):
            return h + bsm_path.mlp(self.post_attention_layernorm(h), m.gate_proj, m.up_proj, m.down_proj)
        return h + self.mlp(self.post_attention_layernorm(h))
