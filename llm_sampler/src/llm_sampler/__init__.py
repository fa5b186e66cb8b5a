"""Sampling, scoring, KV reuse and speculative decoding for any `forward_func(input_ids) -> logits`.

Example:
    >>> from llm_sampler import sample
    >>> new_tokens = sample(lambda ids: model(ids).logits, prompt_ids, 32, temperature=0.7, top_p=0.9)
"""

from llm_sampler.cache import CachedForward, IncrementalModel
from llm_sampler.forward import ForwardFunc
from llm_sampler.hf import TransformersIncremental, transformers_forward
from llm_sampler.processors import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    select_tokens,
)
from llm_sampler.sampling import pad_left, sample, sample_stream
from llm_sampler.scoring import Choice, ContinuationScore, multiple_choice, score
from llm_sampler.speculative import (
    SpeculativeOutput,
    SpeculativeStats,
    speculative_sample,
)
from llm_sampler.streaming import Decoder, TextStream, stream_text
from llm_sampler.validation import StopTokens

__version__ = "0.5.0"  # 0.4.0 on PyPI is the old llm_microlibs sampler

__all__ = [
    "CachedForward",
    "Choice",
    "ContinuationScore",
    "Decoder",
    "ForwardFunc",
    "IncrementalModel",
    "SamplingParams",
    "SpeculativeOutput",
    "SpeculativeStats",
    "StopTokens",
    "TextStream",
    "TransformersIncremental",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "multiple_choice",
    "pad_left",
    "process_logits",
    "sample",
    "sample_stream",
    "score",
    "select_tokens",
    "speculative_sample",
    "stream_text",
    "transformers_forward",
]
