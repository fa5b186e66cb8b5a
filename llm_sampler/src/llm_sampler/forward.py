"""The one seam to a model: `forward_func(input_ids) -> logits`.

Contract (everything in llm_sampler calls models only through it):

- `forward_func(input_ids)` takes `input_ids` `(B, T)` int64 and returns logits `(B, T, V)`, or only the last
  `k` positions `(B, k, V)` with `1 <= k <= T` (right-aligned: `logits[:, -1]` follows `input_ids[:, -1]`).
- If its signature names a parameter `attention_mask`, it is called with `attention_mask=` `(B, T)` of 0/1
  (0 = left padding, or None when nothing is padded). The function must then mask the padded keys and count
  positions from the first real token (`position_ids = cumsum(mask) - 1`), as transformers' generate does.
  A batch with padding is refused for a function without that parameter, because it would silently attend to
  the padding.
- If its signature names a parameter `logits_to_keep`, it is told how many trailing positions the caller reads
  (1 when sampling) and may return just those.

Only explicitly named parameters count, never `**kwargs`; for an `nn.Module` its `forward` is inspected.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor, nn

from llm_sampler.validation import check_finite, check_logits

ForwardFunc = Callable[..., Tensor]


def _named_parameters(func: ForwardFunc) -> set[str]:
    # Module.__call__ is (*args, **kwargs): read the module's forward instead.
    target = func.forward if isinstance(func, nn.Module) else func
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return set()  # builtins have no signature: pass input_ids only
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in plain}


class Forward:
    """Calls a user's forward_func with the keywords it accepts and checks what comes back."""

    def __init__(self, forward_func: ForwardFunc, name: str = "forward_func") -> None:
        if not callable(forward_func):
            msg = f"{name} must be callable as {name}(input_ids) -> logits, got {type(forward_func).__name__}"
            raise TypeError(msg)
        names = _named_parameters(forward_func)
        self.func = forward_func
        self.name = name
        self.takes_mask = "attention_mask" in names
        self.takes_keep = "logits_to_keep" in names

    def check_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """Return the mask to pass on (None when nothing is padded); refuse padding the function cannot see."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        if not self.takes_mask:
            msg = (
                f"input_ids is left-padded but {self.name} has no attention_mask parameter, so the model would attend "
                f"to the padding; give it an attention_mask= parameter (see llm_sampler.transformers_forward) or "
                f"run the rows one at a time"
            )
            raise ValueError(msg)
        return attention_mask

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None, logits_to_keep: int) -> Tensor:
        """Return fp32 logits for the last `logits_to_keep` positions, `(B, logits_to_keep, V)`."""
        kwargs: dict[str, object] = {}
        if self.takes_mask:
            kwargs["attention_mask"] = attention_mask
        if self.takes_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        batch, length = input_ids.shape
        logits = self.func(input_ids, **kwargs)
        logits = check_logits(logits, batch, length, logits_to_keep, self.name)
        # The processors and log-softmax run in fp32, whatever the model's dtype.
        logits = logits[:, -logits_to_keep:].float()  # (B, logits_to_keep, V)
        check_finite(logits, self.name)
        return logits
