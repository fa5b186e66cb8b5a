"""KV caches for one part: a growing cache for full-attention layers and a ring for sliding layers.

Positions here are *cache indices*: the index of a token in the (left-padded) sequence the cache
has seen, shared by all rows. RoPE positions (``position_ids``) are separate and may differ per row.

The sliding-window ring keeps ``W + extra_slots`` slots and records the cache index held by each
slot. A chunk of T new tokens (T = 1 for decode, T > 1 for chunked prefill or speculative
verification) attends to ``ring ∪ new`` under the mask ``k <= q and k > q - W`` computed from those
recorded indices, and only then are the last slots written. That is correct for every T, unlike a
rolling buffer that assumes one token per step.
"""

from __future__ import annotations

import operator

import torch


class FullLayerCache:
    """Keys/values of every cache index so far; capacity grows geometrically (amortised O(1) appends).

    ``capacity`` (tokens): allocate that much at once while it suffices (a part under a memory budget
    makes room for ``max_context`` tokens once, not for a doubled copy); past it, growth as usual.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.k: torch.Tensor | None = None  # (B, nKV, capacity, d)
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k/v (B, nKV, T, d) at cache index `start`; return all keys, values and their indices."""
        assert start == self.length, (start, self.length)
        B, H, T, D = k.shape
        end = start + T
        if self.k is None or end > self.k.shape[2]:
            cap = max(end, 2 * (self.k.shape[2] if self.k is not None else 0), 16)
            cap = self.capacity if end <= self.capacity else cap
            k_new = k.new_empty(B, H, cap, D)
            v_new = v.new_empty(B, H, cap, D)
            if self.k is not None and self.v is not None:
                k_new[:, :, :start] = self.k[:, :, :start]
                v_new[:, :, :start] = self.v[:, :, :start]
            self.k, self.v = k_new, v_new
        assert self.v is not None
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        positions = torch.arange(end, device=k.device)
        return self.k[:, :, :end], self.v[:, :, :end], positions

    def slots_to_crop(self, length: int) -> int:
        """0: every length can be cropped back to (the keys are all kept)."""
        return 0

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
        if self.length == 0:
            self.k = self.v = None  # as new: the next call may have another batch size

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[index], self.v[index]


class RingLayerCache:
    """The last ``window + extra_slots`` keys/values of a sliding-window layer, with their cache indices."""

    def __init__(self, window: int, extra_slots: int = 0) -> None:
        self.window = window
        self.slots = window + extra_slots
        self.k: torch.Tensor | None = None  # (B, nKV, slots, d)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (slots,) cache index per slot, -1 = empty
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert start == self.length, (start, self.length)
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.slots, D)
            self.v = v.new_zeros(B, H, self.slots, D)
            self.pos = torch.full((self.slots,), -1, dtype=torch.long, device=k.device)
        assert self.v is not None and self.pos is not None
        new_pos = torch.arange(start, start + T, device=k.device)
        # attend over everything the ring still holds plus the whole chunk ...
        keys = torch.cat([self.k, k], dim=2)  # (B, nKV, slots + T, d)
        values = torch.cat([self.v, v], dim=2)
        positions = torch.cat([self.pos, new_pos])  # (slots + T,), -1 for empty slots
        # ... then keep the newest `slots` of the chunk
        keep = min(T, self.slots)
        idx = new_pos[T - keep :] % self.slots
        self.k[:, :, idx] = k[:, :, T - keep :]
        self.v[:, :, idx] = v[:, :, T - keep :]
        self.pos[idx] = new_pos[T - keep :]
        self.length = start + T
        return keys, values, positions

    def slots_to_crop(self, length: int) -> int:
        """0 if the ring can go back to `length` tokens, else the extra slots that would have allowed it."""
        if length >= self.length or length == 0 or self.pos is None:
            return 0
        # the next query (index `length`) needs indices length-W+1 .. length-1; they must still be here
        needed = set(range(max(0, length - self.window + 1), length))
        return 0 if needed <= set(self.pos.tolist()) else self.length - length

    def crop(self, length: int) -> None:
        assert self.slots_to_crop(length) == 0, (length, self.length)
        if length == 0:
            self.k = self.v = self.pos = None  # as new: the next call may have another batch size
        elif length < self.length and self.pos is not None:
            self.pos[self.pos >= length] = -1
        self.length = min(self.length, length)

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[index], self.v[index]


LayerCache = FullLayerCache | RingLayerCache


class KVCache:
    """The cache of one part: one layer cache per layer it holds, plus per-row bookkeeping.

    Create it with ``part.new_cache()``; pass it to every forward call of that part.
    ``seq_len`` is the number of cache indices seen; ``crop(n)`` forgets everything from index n
    (speculative decoding, prefix reuse); ``crop(0)`` makes it as new.

    A call counts only once it has finished (:meth:`commit`): a call refused for its input changes
    nothing, and keys stored by a call that failed midway are rolled back by the next call.
    """

    def __init__(self, windows: dict[int, int | None], extra_window_slots: int = 0, capacity: int = 0) -> None:
        self.layers: dict[int, LayerCache] = {
            i: FullLayerCache(capacity) if w is None else RingLayerCache(w, extra_window_slots)
            for i, w in windows.items()
        }
        self.seq_len = 0
        self.key_mask: torch.Tensor | None = None  # (B, seq_len) bool: False for padding
        self.next_position: torch.Tensor | None = None  # (B,) RoPE position of the next real token
        self.rope_length: int | None = None  # dynamic RoPE: this sequence's history (rope.dynamic_length)

    def crop(self, length: int) -> None:
        """Forget every cache index from `length` on; all layers or none (a refused crop changes nothing).

        Example::

            cache.crop(cache.seq_len - 3)   # drop the last 3 tokens (rejected drafts)
        """
        length = operator.index(length)  # an int (numpy and 0-d integer tensors too); a TypeError otherwise
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        keep = min(length, self.seq_len)  # layers may also hold keys of a call that failed midway
        short = max(c.slots_to_crop(keep) for c in self.layers.values()) if self.layers else 0
        if short:
            raise ValueError(
                f"cannot crop the sliding-window cache back to {length} tokens: the keys it needs were "
                f"overwritten; nothing was cropped (the cache still holds {self.seq_len} tokens). To allow this rollback "
                f"create the cache with extra_slots >= {short}: part.new_cache(extra_window_slots={short})"
            )
        for c in self.layers.values():
            c.crop(keep)
        if keep == 0:
            self.key_mask = self.next_position = self.rope_length = None  # as new
        elif keep < self.seq_len:
            # each real token moved a row's next position on by one: step back by the real tokens dropped
            # (not to the count of those kept: positions given explicitly may start elsewhere)
            if self.key_mask is not None:
                dropped = self.key_mask[:, keep:].long().sum(-1)  # (B,)
                self.key_mask = self.key_mask[:, :keep]
            else:
                dropped = self.seq_len - keep
            if self.next_position is not None:
                self.next_position = self.next_position - dropped
        self.seq_len = keep

    def start_call(self, layer_ids: list[int], batch: int) -> int:
        """The cache index a call of `batch` rows on the part holding `layer_ids` starts at.

        Checks that the cache fits the call (a ValueError, nothing changed, if not) and rolls back
        keys that a call which failed midway left in some layers.
        """
        if sorted(self.layers) != sorted(layer_ids):
            raise ValueError(
                f"this cache was made for layers {sorted(self.layers)}, but the part holds layers "
                f"{sorted(layer_ids)}: make each part's cache with its own new_cache()"
            )
        rows = self.next_position.shape[0] if self.next_position is not None else None
        if self.seq_len and rows is not None and rows != batch:
            raise ValueError(
                f"this cache holds {rows} rows; the input has {batch}: select rows with cache.reorder(index), "
                "or start over with cache.crop(0) or a new cache"
            )
        if any(c.length != self.seq_len for c in self.layers.values()):
            self._roll_back()
        return self.seq_len

    def _roll_back(self) -> None:
        """Drop keys past ``seq_len`` (stored by a call that never finished)."""
        short = max(c.slots_to_crop(self.seq_len) for c in self.layers.values())
        if short:
            raise ValueError(
                f"a call on this cache failed midway, after its sliding-window layers had overwritten keys the "
                f"cache needs: start over with cache.crop(0) or a new cache (one made with "
                f"new_cache(extra_window_slots={short}) survives such a call)"
            )
        for c in self.layers.values():
            c.crop(self.seq_len)

    def commit(
        self,
        start: int,
        length: int,
        key_mask: torch.Tensor | None,
        next_position: torch.Tensor,
        rope_length: int | None = None,
    ) -> None:
        """Close a call of `length` tokens from `start`: it counts from now on."""
        short = sorted(i for i, c in self.layers.items() if c.length != start + length)
        if start != self.seq_len or short:
            raise ValueError(
                f"cannot close a call of {length} tokens from cache index {start} on a cache of {self.seq_len} "
                f"with layers {short} not run: run_layer every layer of the part between prepare and finish"
            )
        self.seq_len, self.key_mask, self.next_position = start + length, key_mask, next_position
        self.rope_length = rope_length

    def reorder(self, index: torch.Tensor) -> None:
        """Select / reorder batch rows (beam search, dropping finished rows)."""
        for c in self.layers.values():
            c.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]
        if self.next_position is not None:
            self.next_position = self.next_position[index]


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Boolean (B or 1, 1, T, K) mask, True = may attend.

    q_pos (T,), k_pos (K,) cache indices (-1 = empty slot); key_mask (B, >= max(k_pos)+1) padding.
    A key is visible when ``0 <= k <= q`` and, with a window, ``k > q - W`` (W keys including the
    query itself, as transformers). Rows with no visible key (a padding query) see only themselves,
    so they stay finite; their outputs are never used.
    """
    q = q_pos[:, None]  # (T, 1)
    k = k_pos[None, :]  # (1, K)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= k > q - window
    visible = visible[None, None]  # (1, 1, T, K)
    if key_mask is not None:
        valid = key_mask[:, k_pos.clamp(min=0)]  # (B, K)
        visible = visible & valid[:, None, None, :]
        empty = ~visible.any(-1, keepdim=True)
        visible = visible | (empty & (k == q)[None, None])
    return visible
