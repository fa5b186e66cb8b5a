"""as_transformers(part): a whole-model part as a transformers causal LM (``generate``, streamers, pipelines).

transformers is an optional extra (``pip install llm_lazy_qwen[transformers]``), imported only here,
when the adapter is made; the adapter itself lives in ``hf_model.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .part import QwenPart

if TYPE_CHECKING:
    from .hf_model import PartForCausalLM


def as_transformers(part: QwenPart) -> PartForCausalLM:
    """Wrap a part holding the embedding, every layer and the head for transformers' ``generate()``.

    The result has what ``GenerationMixin`` needs (``config``, ``generation_config``, ``device``,
    outputs with ``.logits`` and a cache transformers accepts), so ``generate()`` with any of its
    processors and stopping criteria, beam search, assisted decoding, ``TextStreamer`` and
    ``pipeline("text-generation")`` work on it, lazy (streamed) parts included, and give the tokens
    the transformers model gives. The part is shared, not copied.

    Example::

        from transformers import AutoTokenizer, TextStreamer
        tok = AutoTokenizer.from_pretrained("qwen-sep")
        model = as_transformers(load_part("qwen-sep", "f", lazy=True))
        ids = tok("The capital of France is", return_tensors="pt")
        model.generate(**ids, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tok))
    """
    if not isinstance(part, QwenPart):
        raise TypeError(f"as_transformers takes a QwenPart (load_part(...)), got {type(part).__name__}")
    if not (part.spec.begin and part.spec.end and len(part.layer_ids) == part.config.num_hidden_layers):
        raise ValueError(
            f"as_transformers needs a whole-model part (spec 'f': embedding, every layer and the head); "
            f"got {str(part.spec)!r}. Load it with load_part(folder, 'f')"
        )
    _check_loaded(part)
    try:
        from .hf_model import PartForCausalLM, hf_config
    except ImportError as e:
        raise ImportError(
            f"as_transformers needs transformers ({e}); install it with: pip install 'llm_lazy_qwen[transformers]'"
        ) from e
    config, generation_config = hf_config(part)
    return PartForCausalLM(part, config, generation_config)


def _check_loaded(part: QwenPart) -> None:
    """Refuse a part whose weights are still the meta skeleton's (a lazy part streams its layers and head
    in per call: only those may be meta between calls)."""
    streamed = ("model.layers.", "lm_head.") if part.lazy else ()
    missing = [n for n, p in part.named_parameters() if p.is_meta and not n.startswith(streamed)]
    if missing:
        msg = (
            f"as_transformers: the part's weights were never loaded ({missing[0]} and {len(missing) - 1} more "
            "have no data); make the part with load_part(folder, 'f'), or call "
            "part.load_weights(llm_sepweight.SepWeights(folder)) before wrapping it"
        )
        raise ValueError(msg)
