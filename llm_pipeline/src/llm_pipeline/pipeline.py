"""Pipeline: rank 0's handle on the whole model, GPipe-style micro-batched over the stages.

A batch of B rows is cut into M micro-batches of rows. Rank 0 runs its part on micro-batch 0,
hands the hidden states to rank 1 (asynchronously) and goes on with micro-batch 1 while rank 1
works on micro-batch 0, and so on down the chain: with M >= number of stages every rank is busy
except during the fill and drain of each forward (a bubble of (N - 1) / (M + N - 1) of the time).
The last stage sends each micro-batch's logits back to rank 0. Every stage keeps one KV cache per
micro-batch, so prefill and each decode step are one such pipelined forward.

``Pipeline`` implements llm_sampler's ``IncrementalModel`` (``forward_incremental`` + ``crop``),
so ``CachedForward(pipeline)`` and ``sample`` drive generation unchanged.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import torch

from .comm import (
    FAILED,
    FATAL,
    HAS_MASK,
    USE_CACHE,
    Header,
    Op,
    PipelineError,
    StageError,
)
from .stage import Stage, _describe

if TYPE_CHECKING:
    from typing import Self

# micro_batch field of STOP / CROP, to tell their acks from results
_STOP_ACK, _CROP_ACK = -1, -2
# micro-batches sent but whose result is not read yet: at most 3 messages each stay queued per link,
# well under comm.MAX_PENDING (64), so no send ever waits on a peer that is itself waiting to send
IN_FLIGHT = 16


class Pipeline:
    """The model split over all ranks, driven from rank 0; logits equal the single-process model's.

    Example::

        stage = load_stage("qwen-sep", "auto")            # every rank
        if stage.rank == 0:
            with Pipeline(stage, micro_batches=4) as pipe:
                logits = pipe(ids)                         # (B, T, V), no cache
                new = generate(pipe, ids, 32, temperature=0)
        else:
            stage.serve()
        stage.close()
    """

    def __init__(self, stage: Stage, micro_batches: int | None = None) -> None:
        if stage.rank != 0:
            msg = f"Pipeline runs on rank 0; rank {stage.rank} must call stage.serve()"
            raise ValueError(msg)
        if micro_batches is not None and micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.stage = stage
        # M >= N keeps every stage busy; may be changed between calls
        self.micro_batches = micro_batches or stage.num_stages
        self.vocab_size = stage.part.config.vocab_size
        # (B, L) ids the stage caches cover and their padding mask, kept for replays
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._length = 0
        # rebuild the caches from the first n ids before the next call
        self._replay: int | None = None
        # row ranges of the micro-batches the caches were built with (kept until crop(0))
        self._cache_split: list[tuple[int, int]] | None = None
        self._broken: PipelineError | None = None
        self._closed = False

    # ------------------------------------------------------------------------------- public
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits of a batch without any cache: (B, T, V), or the last ``logits_to_keep`` positions.

        Example::

            logits = pipe(torch.tensor([[1, 2, 3]]))   # (1, 3, V), == load_part(dir)(ids)
        """
        T = input_ids.shape[-1]
        full = _check_mask(attention_mask, input_ids)
        mask = None if full is None else full[:, -T:]  # (B, T)
        keep = logits_to_keep or 0
        return self._run(input_ids, 0, mask, keep, use_cache=False).clone()

    __call__ = forward

    def forward_incremental(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """Run new tokens (B, T) after ``past_length`` cached ones; return logits (B, logits_to_keep, V).

        ``attention_mask`` is None or (B, past_length + T) 0/1 with zeros on the left (llm_sampler's
        ``IncrementalModel`` protocol).
        """
        attention_mask = _check_mask(attention_mask, input_ids)
        if self._replay is not None:
            # a ring cache could not roll back: rebuild every stage's cache
            assert self._ids is not None
            n, self._replay = self._replay, None
            self._crop_stages(0)
            replay_mask = None if self._mask is None else self._mask[:, :n].long()
            self._run(self._ids[:, :n], 0, replay_mask, 1, use_cache=True)
        if past_length != self._length:
            msg = f"past_length={past_length} but the caches hold {self._length} positions"
            raise ValueError(msg)
        T = input_ids.shape[1]
        new_mask = None if attention_mask is None else attention_mask[:, -T:]
        try:
            logits = self._run(input_ids, past_length, new_mask, logits_to_keep, True)
        except Exception:
            # some stages may have appended these positions: rebuild from the kept ids next time
            self._replay = self._length or None
            raise
        ids = input_ids if self._ids is None else torch.cat([self._ids, input_ids], 1)
        self._ids = ids  # (B, L + T)
        if attention_mask is not None:
            self._mask = attention_mask.bool()
        elif self._mask is not None:
            ones = torch.ones_like(input_ids, dtype=torch.bool)
            self._mask = torch.cat([self._mask, ones], dim=1)
        self._length += T
        return logits

    def crop(self, length: int) -> None:
        """Drop cached positions >= ``length`` on every stage (0: drop the caches; the batch may change).

        A no-op once the pipeline is broken: nothing is cached any more and the next call raises.
        """
        if self._broken is not None or length >= self._length:
            return
        ok = self._crop_stages(length)
        if length == 0:
            self._ids, self._mask, self._length, self._replay = None, None, 0, None
            self._cache_split = None
            return
        assert self._ids is not None
        self._ids = self._ids[:, :length]
        self._mask = None if self._mask is None else self._mask[:, :length]
        self._length = length
        if not ok or self._replay is not None:
            self._replay = length

    def close(self, error: BaseException | None = None) -> None:
        """Tell the other ranks to leave ``serve()`` (with ``error``'s text they raise it) and wait for them."""
        if self._closed:
            return
        self._closed = True
        link = self.stage.link
        if link is None or self._broken is not None:
            return
        reason = None if error is None else f"{type(error).__name__}: {error}"
        try:
            link.send(1, Header(Op.STOP, _STOP_ACK), text=reason)
            what = "waiting for the other ranks to stop:"
            while self._recv_result(what)[0].micro_batch != _STOP_ACK:
                pass  # results of an interrupted forward, still on their way
            link.flush()
        except PipelineError as e:
            self._break(e)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close(error=exc)
        except PipelineError as e:
            # the original error matters more; keep this one as a note
            if hasattr(exc, "add_note"):
                exc.add_note(f"while stopping the other ranks: {e}")

    # ------------------------------------------------------------------------------- internals
    def _break(self, e: PipelineError) -> None:
        """A rank died or hung: nothing more is sent, and rank 1 learns why (best effort)."""
        if self._broken is None:
            self._broken = e
            self.stage.warn_downstream(str(e))

    def _check_usable(self) -> None:
        if self._broken is not None:
            msg = f"the pipeline is broken by an earlier error: {self._broken}"
            raise PipelineError(msg) from self._broken
        if self._closed:
            raise PipelineError("the pipeline is closed")

    def _split(self, batch: int, past: int, use_cache: bool) -> list[tuple[int, int]]:
        """Row ranges of the micro-batches: min(M, B) of them, sizes differing by at most one.

        Calls that continue cached positions keep the ranges the caches were built with.
        """
        if use_cache and past > 0 and self._cache_split is not None:
            if self._cache_split[-1][1] != batch:
                have = self._cache_split[-1][1]
                msg = f"the caches hold {have} rows, got {batch}; crop(0) to start a new batch"
                raise ValueError(msg)
            return self._cache_split
        n = min(self.micro_batches, batch)
        base, extra = divmod(batch, n)
        bounds, start = [], 0
        for j in range(n):
            stop = start + base + (1 if j < extra else 0)
            bounds.append((start, stop))
            start = stop
        if use_cache:
            self._cache_split = bounds
        return bounds

    def _run(
        self,
        ids: torch.Tensor,
        past: int,
        new_mask: torch.Tensor | None,
        keep: int,
        use_cache: bool,
    ) -> torch.Tensor:
        """One pipelined forward of all micro-batches: logits (B, keep or T, V)."""
        self._check_usable()
        if ids.dim() != 2:
            msg = f"input_ids must be (batch, seq) token ids; got shape {tuple(ids.shape)}"
            raise ValueError(msg)
        try:
            with torch.inference_mode():
                if self.stage.link is None:  # one stage: just the micro-batches in turn
                    outputs = []
                    bounds = self._split(ids.shape[0], past, use_cache)
                    for j, (r0, r1) in enumerate(bounds):
                        m = _rows(new_mask, r0, r1)
                        outputs.append(self.stage.run(ids[r0:r1], j, past, m, keep, use_cache))
                    return torch.cat(outputs, dim=0)  # (B, keep or T, V)
                outputs: list[torch.Tensor] = []  # gathered in order, even after an error
                errors: list[str] = []
                sent, own_error = self._feed(ids, past, new_mask, keep, use_cache, outputs, errors)
                while len(outputs) + len(errors) < sent:
                    self._collect(outputs, errors)
                if own_error is not None:
                    raise own_error
                if errors:
                    raise StageError("; ".join(errors))
                # (B, keep or T, V), where the sampler's ids are (the last stage may be a GPU)
                return torch.cat(outputs, dim=0).to(ids.device)
        except PipelineError as e:
            if not isinstance(e, StageError):
                self._break(e)
            raise

    def _feed(
        self,
        ids: torch.Tensor,
        past: int,
        new_mask: torch.Tensor | None,
        keep: int,
        use_cache: bool,
        outputs: list[torch.Tensor],
        errors: list[str],
    ) -> tuple[int, Exception | None]:
        """Run rank 0's part on each micro-batch and send it on to rank 1, reading results (into
        ``outputs`` / ``errors``) whenever ``IN_FLIGHT`` micro-batches are on their way.

        Returns how many micro-batches were sent and the error of rank 0's own part, if any: the
        failed micro-batch is sent as an ERROR (so every rank stays in step) and the rest are not.
        """
        link = self.stage.link
        assert link is not None
        bounds = self._split(ids.shape[0], past, use_cache)
        for j, (r0, r1) in enumerate(bounds):
            # Sending every micro-batch before reading any result deadlocks once the send queues
            # fill (rank 0 waits on rank 1, which waits on rank 0 to take its results).
            while j - len(outputs) - len(errors) >= IN_FLIGHT:
                self._collect(outputs, errors)
            x, m = ids[r0:r1], _rows(new_mask, r0, r1)  # (b, T), (b, T)
            try:
                out = self.stage.run(x, j, past, m, keep, use_cache)  # (b, T, H)
            except Exception as e:  # noqa: BLE001 - raised by _run once the chain is drained
                link.send(1, Header(Op.ERROR, j), text=f"rank 0: {_describe(e)}")
                return j + 1, e
            flags = (HAS_MASK if m is not None else 0) | (USE_CACHE if use_cache else 0)
            header = Header(Op.FORWARD, j, x.shape[0], x.shape[1], past, flags, keep)
            # returns at once: rank 1 computes this micro-batch while we do the next
            link.send(1, header, out, *([m] if m is not None else []))
        return len(bounds), None

    def _collect(self, outputs: list[torch.Tensor], errors: list[str]) -> None:
        """Receive the next micro-batch's logits (b, keep or T, V) or its error text."""
        j = len(outputs) + len(errors)
        result = self._recv_result(f"waiting for the logits of micro-batch {j} from")[1]
        if isinstance(result, str):
            errors.append(result)
        elif result is None:  # an acknowledgement where logits belong: count it, never wait forever
            errors.append(f"rank {self.stage.num_stages - 1} sent no logits for micro-batch {j}")
        else:
            outputs.append(result)

    def _recv_result(self, what: str) -> tuple[Header, torch.Tensor | str | None]:
        """The next message from the last stage with its payload: logits (b, keep, V), an error text
        (a stage failed on that micro-batch), or None (the ack of CROP / STOP)."""
        link, last = self.stage.link, self.stage.num_stages - 1
        assert link is not None
        h = link.recv_header(last, what=what)
        if h.op is not Op.RESULT:
            raise PipelineError(f"rank 0: expected a result from rank {last}, got {h}")
        text = link.recv_text(last, h) if h.nbytes else None
        if h.flags & FATAL:  # a rank lost its neighbour: its message names the culprit
            raise PipelineError(f"rank 0: the pipeline broke: {text}")
        if h.micro_batch < 0:
            return h, None
        if h.flags & FAILED:
            return h, text or f"rank {last} failed on micro-batch {h.micro_batch}"
        shape = (h.batch, h.seq, self.vocab_size)
        return h, link.recv(last, shape, self.stage.part.dtype, "receiving logits from")

    def _crop_stages(self, length: int) -> bool:
        """Crop every stage's caches; False when some sliding-window ring could not roll back."""
        ok = self.stage.crop(length)
        link = self.stage.link
        if link is None:
            return ok
        self._check_usable()
        try:
            flags = 0 if ok else FAILED
            link.send(1, Header(Op.CROP, _CROP_ACK, past=length, flags=flags))
            h, _ = self._recv_result("waiting for the crop acknowledgement from")
        except PipelineError as e:
            self._break(e)
            raise
        assert h.micro_batch == _CROP_ACK, h
        return not h.flags & FAILED


def _check_mask(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """The mask as int64 (B, L >= T), whatever dtype it came in: every stage receives int64, so a bool or
    int32 mask sent as is would be read as other bytes. A (L,) mask is one row."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask[None]  # (1, L)
    if ids.dim() != 2 or mask.dim() != 2 or mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
        msg = (
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; give (B, T), or "
            "(B, past + T) for cached calls, of 0 (padding) and 1 (token)"
        )
        raise ValueError(msg)
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token), e.g. pad_left's mask")
    return mask.to(torch.int64)  # (B, L)


def _rows(mask: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | None:
    """Rows r0..r1 of the new tokens' mask; None when they hold no padding (one message less
    per decode step: the stage caches remember the padding of the past positions)."""
    if mask is None or bool(mask[r0:r1].all()):
        return None
    return mask[r0:r1]
