"""llm_lazy_qwen: Qwen2/2.5/3 part-models as plain nn.Modules, optionally streamed layer by layer.

from llm_lazy_qwen import load_part
first = load_part("qwen-sep", "b 0-12")            # embedding + layers 0..11, in RAM (mmapped)
last = load_part("qwen-sep", "12-24 e", lazy=True)  # layers 12..23 + head, one layer resident
cache_a, cache_b = first.new_cache(), last.new_cache()
logits = last(first(ids, cache=cache_a), cache=cache_b, logits_to_keep=1)
q4 = load_part("qwen-sep-int4", "f", lazy=True)    # a quantized folder: QuantLinear modules, same API
"""

from .budget import ItemSize, MemoryPlan, Runtime, layer_activation_bytes, parse_size, plan_memory, size_argument
from .chat_template import read_chat_template, read_special_tokens, render_chat
from .config import ConfigError, QwenConfig
from .eos import eos_token_ids
from .hf_compat import as_transformers
from .incremental import IncrementalPart
from .kv_cache import KVCache
from .loading import cache_folder, from_pretrained, load_part
from .part import QwenPart, Step
from .quant import QuantLinear

__version__ = "0.4.1"


def __getattr__(name: str) -> object:
    """``ChatSession``: imported on first use (it needs the ``[chat]`` extra's llm_sampler)."""
    if name == "ChatSession":
        from .chat import ChatSession

        return ChatSession
    raise AttributeError(f"module 'llm_lazy_qwen' has no attribute {name!r}")


__all__ = [
    "ChatSession",
    "ConfigError",
    "IncrementalPart",
    "ItemSize",
    "KVCache",
    "MemoryPlan",
    "QuantLinear",
    "QwenConfig",
    "QwenPart",
    "Runtime",
    "layer_activation_bytes",
    "Step",
    "as_transformers",
    "eos_token_ids",
    "cache_folder",
    "from_pretrained",
    "load_part",
    "parse_size",
    "plan_memory",
    "read_chat_template",
    "read_special_tokens",
    "render_chat",
    "size_argument",
]
