"""Stop matching: a row stops once its generated tokens end with one of the stops (a token or a sequence).

Only generated tokens count: a stop sequence that would begin inside the prompt does not match. Stops are
the tuples `check_stop_tokens` returns; a single-token stop is a 1-tuple.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llm_sampler.validation import Stops


def stop_hits(generated: Tensor, stops: Stops) -> Tensor:
    """Rows of `generated` `(B, n)` whose tokens end with a stop: `(B,)` bool."""
    batch, n = generated.shape
    hit = torch.zeros(batch, dtype=torch.bool, device=generated.device)
    singles = [stop[0] for stop in stops if len(stop) == 1]
    if singles and n:
        hit |= torch.isin(generated[:, -1], generated.new_tensor(singles))
    for stop in stops:
        if 1 < len(stop) <= n:
            hit |= (generated[:, n - len(stop) :] == generated.new_tensor(stop)).all(dim=1)
    return hit


def matched_stop(generated: Sequence[int], stops: Stops) -> int:
    """Length of the stop that `generated` ends with (the longest if several), 0 if none."""
    n = len(generated)
    return max((len(s) for s in stops if len(s) <= n and tuple(generated[n - len(s) :]) == s), default=0)


def partial_stop(generated: Sequence[int], stops: Stops, limit: int) -> int:
    """The longest suffix of `generated` (at most `limit` ids) that a stop begins with: ids to hold back,
    because the next tokens may complete the stop."""
    n = len(generated)
    for length in range(min(limit, n), 0, -1):
        tail = tuple(generated[n - length :])
        if any(s[:length] == tail for s in stops if len(s) >= length):
            return length
    return 0
