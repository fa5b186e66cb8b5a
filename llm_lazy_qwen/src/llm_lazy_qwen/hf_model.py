"""A whole-model QwenPart behind the interface of transformers' GenerationMixin (needs transformers).

``generate()`` with its processors, stopping criteria, streamers, beam search and assisted /
prompt-lookup decoding, and ``pipeline("text-generation")``, drive :class:`PartForCausalLM` as they
drive ``Qwen2ForCausalLM``: the same tokens (tests/llm_lazy_qwen/test_as_transformers.py). The keys
and values stay in the part's own :class:`KVCache` (sliding-window rings included), wrapped in
:class:`PartCache`, a ``transformers.Cache`` that ``generate`` can measure, crop and reorder.
Import through :func:`llm_lazy_qwen.as_transformers`, which checks that transformers is installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, Cache, GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.generation.utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .head import LogitsToKeep
from .kv_cache import KVCache
from .part import QwenPart

# transformers 5.x names the cache `cache` in forward() and in the outputs; 4.x `past_key_values`
_OUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# forward() keywords of transformers' causal LMs that would change the result: refused, not ignored
_UNSUPPORTED = ("labels", "inputs_embeds", "output_attentions", "output_hidden_states", "token_type_ids")
# pipeline("text-generation") logs an error for a model whose class name is not in this table; a key
# without a config class is invisible to the Auto* lookups, so the entry changes nothing else
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("llm_lazy_qwen", "PartForCausalLM")


class PartCache(Cache):
    """A ``transformers.Cache`` holding a part's :class:`KVCache` (``.kv``): what ``generate`` measures,
    crops (assisted decoding) and reorders (beam search). Make one with ``model.new_cache()``."""

    def __init__(self, part: QwenPart, extra_window_slots: int = 0) -> None:
        super().__init__(layers=[])  # no transformers layers: every update goes through the part
        self.part_id = id(part)
        self.kv: KVCache = part.new_cache(extra_window_slots)
        self._new = lambda: part.new_cache(extra_window_slots)

    def __repr__(self) -> str:
        return f"PartCache(seq_len={self.kv.seq_len}, layers={len(self.kv.layers)})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows as needed

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv.seq_len + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-n`` positions for n <= 0 (transformers 5); keep the first n for n > 0 (4.x)."""
        length = self.kv.seq_len + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        if length < 0:
            raise ValueError(f"cannot crop {-tokens_to_remove} positions from a cache of {self.kv.seq_len}")
        if length < self.kv.seq_len:
            self.kv.crop(length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.kv.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch_size > 0:
            self.kv.reorder(torch.arange(self.batch_size).repeat_interleave(repeats))

    def reset(self) -> None:
        self.kv = self._new()

    @property
    def batch_size(self) -> int:
        for layer in self.kv.layers.values():
            if layer.k is not None:
                return layer.k.shape[0]
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.kv.seq_len > 0


class PartForCausalLM(nn.Module, GenerationMixin):
    """A part holding ``b``, every layer and ``e``, called like transformers' ``*ForCausalLM``.

    Example::

        model = as_transformers(load_part("qwen-sep", "f", lazy=True))
        out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    """

    main_input_name = "input_ids"
    base_model_prefix = "part"
    _auto_class = None
    _is_stateful = False  # transformers 4.x: a KV cache that can be cropped
    hf_quantizer = None

    def __init__(self, part: QwenPart, config: PretrainedConfig, generation_config: GenerationConfig) -> None:
        super().__init__()
        self.part = part
        self.config = config
        self.generation_config = generation_config

    @property
    def device(self) -> torch.device:
        return self.part.device

    @property
    def dtype(self) -> torch.dtype:
        return self.part.dtype

    def to(self, *args: Any, **kwargs: Any) -> PartForCausalLM:
        """A no-op for the part's own device and dtype (pipelines call it); anything else is refused:
        a part, lazy ones included, is placed when loaded."""
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        moved = device is not None and not _same_device(torch.device(device), self.device)
        if moved or (dtype is not None and dtype != self.dtype):
            raise ValueError(
                f"this model is a part on {self.device} in {self.dtype}; load it where you want it instead: "
                f"load_part(folder, 'f', device=..., dtype=...), then as_transformers(part)"
            )
        return self

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.part.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.part.lm_head

    def get_experts_implementation(self) -> dict[str, str | None]:
        return {"": None}  # a dense model: generate's MoE switch never applies

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        pass

    def new_cache(self, extra_window_slots: int = 0) -> PartCache:
        """An empty cache to pass as ``cache=`` (``past_key_values=`` on transformers 4.x)."""
        return PartCache(self.part, extra_window_slots)

    def close(self) -> None:
        """Stop the part's prefetch thread (lazy parts)."""
        self.part.close()

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        generation_mode: GenerationMode,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """generate()'s hook: our :class:`PartCache` instead of a ``DynamicCache``."""
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if given is not None:
            self._check_cache(given)
            given._is_user_defined = True
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: a part keeps "
                "its keys and values in its own cache; leave cache_implementation unset"
            )
        if generation_config.use_cache is False:
            return
        # assisted decoding crops rejected candidates: sliding-window rings keep every key of this call
        extra = max_cache_length if generation_mode == GenerationMode.ASSISTED_GENERATION else 0
        model_kwargs[_OUT_CACHE] = self.new_cache(extra)

    def _check_cache(self, cache: Any) -> PartCache:
        if not isinstance(cache, PartCache) or cache.part_id != id(self.part):
            raise TypeError(
                f"the cache must come from this model's new_cache(), got {type(cache).__name__}; "
                "a part keeps its keys and values in its own KVCache"
            )
        return cache

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: PartCache | None = None,
        past_key_values: PartCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: LogitsToKeep = 0,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,  # transformers 4.x passes it; our cache knows its offset
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T_keep, V) as ``.logits`` and the cache as ``.cache`` (transformers 4.x: ``.past_key_values``).

        Without a cache and unless ``use_cache=False``, a new one is made and returned, as transformers does.
        """
        # what generate() forwards but a part does not use (tokenizer, ...) is ignored, as transformers does
        unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None and kwargs.get(k) is not False]
        if unsupported:
            raise TypeError(
                f"{type(self).__name__}.forward does not support {unsupported}: it takes token ids and returns "
                "logits and the cache (no loss, attentions, hidden states or inputs_embeds)"
            )
        if return_dict is False:
            raise ValueError("return_dict=False is not supported: the output is a CausalLMOutputWithPast")
        if cache is not None and past_key_values is not None:
            raise TypeError("give the cache once: as cache= or as past_key_values=, not both")
        given = cache if cache is not None else past_key_values
        if given is None and use_cache is not False:
            given = self.new_cache()
        kv = self._check_cache(given).kv if given is not None else None
        logits = self.part(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=kv, logits_to_keep=logits_to_keep
        )
        return CausalLMOutputWithPast(logits=logits, **{_OUT_CACHE: given})


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b are one device: "cuda" and "cuda:0" are, unless both name different indices."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def hf_config(part: QwenPart) -> tuple[PretrainedConfig, GenerationConfig]:
    """The transformers config of the part's model (its folder's config.json when it has one) and its
    generation config (the folder's generation_config.json, else derived from the config)."""
    source = part._source
    raw = dict(source.config) if source is not None else dataclasses.asdict(part.config)
    raw.pop("quantization_config", None)  # our storage, not a transformers quantizer
    model_type = raw.pop("model_type", part.config.model_type)
    config = AutoConfig.for_model(model_type, **raw)
    gen_file = Path(source.root) / "generation_config.json" if source is not None else None
    if gen_file is not None and gen_file.is_file():
        generation = GenerationConfig.from_pretrained(gen_file.parent)
    else:
        generation = GenerationConfig.from_model_config(config)
    return config, generation
