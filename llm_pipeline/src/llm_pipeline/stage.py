"""Stage: one rank's part of the model, its KV caches (one per micro-batch), and the loop that serves it.

Every rank calls :func:`load_stage`; rank 0 then drives a :class:`~llm_pipeline.Pipeline`, the
others call :meth:`Stage.serve` until rank 0 closes it. A stage only ever talks to its neighbours:
it receives hidden states from rank i - 1 and sends its output to rank i + 1 (the last stage sends
logits back to rank 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm_lazy_qwen import KVCache, QwenPart, load_part
from llm_sepweight import PartSpec, SepWeights

from .comm import (
    FAILED,
    FATAL,
    HAS_MASK,
    USE_CACHE,
    Header,
    Link,
    Op,
    PipelineError,
    _gloo_text,
    env_world,
    init_distributed,
)
from .spec import Balance, stage_specs


class Stage:
    """The part of rank ``rank`` (stage ``rank`` of ``len(specs)``) with a KV cache per micro-batch.

    Example::

        stage = load_stage("qwen-sep", "auto")     # on every rank, under torchrun
        if stage.rank != 0:
            stage.serve()                          # until rank 0's Pipeline closes
        stage.close()
    """

    def __init__(
        self,
        part: QwenPart,
        specs: list[PartSpec],
        rank: int,
        link: Link | None,
        *,
        owns_group: bool = False,
        extra_window_slots: int = 8,
    ) -> None:
        assert (link is None) == (len(specs) == 1), "a multi-stage pipeline needs a link"
        self.part, self.specs, self.rank, self.link = part, specs, rank, link
        self.owns_group = owns_group
        # rollback room of sliding-window rings (speculative decoding, scoring)
        self.extra_window_slots = extra_window_slots
        # micro-batch index -> this part's cache for those rows
        self.caches: dict[int, KVCache] = {}

    @property
    def num_stages(self) -> int:
        return len(self.specs)

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    @property
    def name(self) -> str:
        return f"stage {self.rank} of {self.num_stages}, {str(self.specs[self.rank])!r}"

    # ------------------------------------------------------------------------------- compute
    def run(
        self,
        x: torch.Tensor,
        micro_batch: int,
        past: int,
        new_mask: torch.Tensor | None,
        keep: int,
        use_cache: bool,
    ) -> torch.Tensor:
        """Run this part on one micro-batch of rows.

        ``x`` is token ids (B, T) or hidden states (B, T, H); the result hidden states (B, T, H) or
        logits (B, keep, V). ``new_mask`` (B, T) marks the new tokens (0 = left padding); the cache keeps the mask of the
        past ones. ``keep`` is logits_to_keep (0: all positions).
        """
        cache = None
        if use_cache:
            if past == 0:
                self.caches[micro_batch] = self.part.new_cache(self.extra_window_slots)
            cache = self.caches.get(micro_batch)
            if cache is None or cache.seq_len != past:
                have = "no cache" if cache is None else f"{cache.seq_len} cached"
                msg = f"micro-batch {micro_batch}: asked to go on after {past} positions; {have}"
                raise ValueError(msg)
        keep_arg = keep or None
        out: torch.Tensor = self.part(x, attention_mask=new_mask, cache=cache, logits_to_keep=keep_arg)
        return out

    def crop(self, length: int) -> bool:
        """Crop every micro-batch's cache to ``length`` positions (0: drop them); False when a ring cannot."""
        if length == 0:
            self.caches.clear()
            return True
        ok = True
        for cache in self.caches.values():
            try:
                cache.crop(length)
            except ValueError:
                ok = False  # a sliding-window ring already overwrote keys it would need
        return ok

    # ------------------------------------------------------------------------------- serving
    def serve(self, idle_timeout: float | None = None) -> None:
        """Answer rank 0's messages until it closes the pipeline (ranks > 0).

        Waits at most ``idle_timeout`` seconds (default: the stage's timeout) for each message, so a
        dead or hung upstream rank ends this one with a PipelineError instead of a hang; the error
        is passed down the chain first, so rank 0 learns which rank failed. Raises PipelineError
        too when rank 0 stopped after an error.
        """
        if self.rank == 0 or self.link is None:
            msg = "serve() runs on ranks > 0; rank 0 drives the pipeline with Pipeline(stage)"
            raise ValueError(msg)
        try:
            with torch.inference_mode():
                while self._serve_one(idle_timeout):
                    pass
        except PipelineError as e:
            self.warn_downstream(str(e))
            raise

    def _serve_one(self, idle_timeout: float | None) -> bool:
        """Receive and handle one message; False after STOP."""
        assert self.link is not None
        link, prev = self.link, self.rank - 1
        h = link.recv_header(prev, idle_timeout, "waiting for the next message from")
        if h.op is Op.FORWARD:
            self._forward(h)
        elif h.op is Op.ERROR:
            text = link.recv_text(prev, h)
            if h.flags & FATAL:  # an upstream rank is going down; serve() passes it on
                raise PipelineError(f"rank {self.rank}: the pipeline broke: {text}")
            self._pass_on(h, error=text)
        elif h.op is Op.CROP:
            h.flags |= 0 if self.crop(h.past) else FAILED
            self._pass_on(h)
        elif h.op is Op.STOP:
            reason = link.recv_text(prev, h)
            self._pass_on(h, error=reason or None)
            link.flush()
            if reason:
                msg = f"rank {self.rank}: rank 0 stopped the pipeline after an error: {reason}"
                raise PipelineError(msg)
            return False
        else:
            raise PipelineError(f"rank {self.rank}: unexpected message {h} from rank {prev}")
        return True

    def _forward(self, h: Header) -> None:
        """One micro-batch: receive its hidden states, run the part, send the result on."""
        assert self.link is not None
        link, prev = self.link, self.rank - 1
        shape = (h.batch, h.seq, self.part.config.hidden_size)
        # (B, T, H) hidden states, then the (B, T) mask of the new tokens if there is padding
        x = link.recv(prev, shape, self.part.dtype, "receiving hidden states from")
        mask = None
        if h.flags & HAS_MASK:
            mask = link.recv(prev, shape[:2], torch.int64, "receiving the mask from")
        try:
            use_cache = bool(h.flags & USE_CACHE)
            out = self.run(x, h.micro_batch, h.past, mask, h.keep, use_cache)
        except Exception as e:  # noqa: BLE001 - rank 0 raises it; this rank keeps serving
            self._pass_on(h, error=f"rank {self.rank} ({self.name}): {_describe(e)}")
            return
        if self.is_last:  # logits (B, keep, V) back to rank 0
            link.send(0, Header(Op.RESULT, h.micro_batch, h.batch, out.shape[1]), out)
        else:  # hidden states (B, T, H) on to the next stage, with the mask it needs too
            link.send(self.rank + 1, h, out, *([mask] if mask is not None else []))

    def _pass_on(self, h: Header, error: str | None = None) -> None:
        """Forward a control message (or an error in place of a micro-batch's output) down the chain."""
        assert self.link is not None
        if self.is_last:  # the chain ends: acknowledge to rank 0
            flags = h.flags | (FAILED if error is not None else 0)
            self.link.send(0, Header(Op.RESULT, h.micro_batch, flags=flags), text=error)
            return
        failed = error is not None and h.op in (Op.FORWARD, Op.ERROR)
        header = Header(Op.ERROR if failed else h.op, h.micro_batch, past=h.past, flags=h.flags)
        self.link.send(self.rank + 1, header, text=error)

    def warn_downstream(self, error: str) -> None:
        """Tell the next rank (rank 0 after the last) why this rank stops (best effort).

        So every rank's error names the rank that died or hung, not just the neighbour that
        closed its connection because of it.
        """
        assert self.link is not None
        if self.link.timed_out:
            return  # gloo closed every connection of this rank: nothing gets out
        op, dst = (Op.RESULT, 0) if self.is_last else (Op.ERROR, self.rank + 1)
        try:
            self.link.send(dst, Header(op, -3, flags=FAILED | FATAL), text=error)
            self.link.flush(timeout=2.0)
        except PipelineError:
            pass  # that rank is gone too; the error being raised says what happened here

    def close(self) -> None:
        """Stop prefetching and leave the process group (if load_stage joined it).

        Messages were delivered when the pipeline closed (rank 0) or serve() returned; after a
        failure nothing more is sent, so this never waits for a dead peer.
        """
        self.part.close()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


_INFO_BYTES = 4096  # room for one rank's handshake info (JSON)


def _version() -> str:
    from . import __version__  # the wire format may change between versions

    return __version__


def _describe(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def load_stage(
    model: str | Path,
    parts: str | list[str] = "auto",
    *,
    balance: Balance = "bytes",
    lazy: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    timeout: float = 120.0,
    join_timeout: float | None = None,
    pin_cpus: bool = False,
    backend: str | None = None,
    extra_window_slots: int = 8,
    **load_kwargs: Any,
) -> Stage:
    """Join the ranks started by torchrun, load this rank's part and check every rank agrees.

    Every rank calls this with the same arguments. Without torchrun (no WORLD_SIZE) it is a single
    stage holding the whole model.

    Args:
        model: a sepweight folder (each host needs at least the parts of its ranks).
        parts: ``"auto"`` or one spec per rank, ``"b 0-8,8-16,16-24 e"``.
        balance: how ``"auto"`` splits: ``"bytes"`` (what each rank holds) or ``"layers"``.
        lazy, dtype, load_kwargs: as in ``llm_lazy_qwen.load_part`` (prefetch, resident_mb, ...).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (nccl; each rank uses ``cuda:LOCAL_RANK``).
        timeout: seconds each message may take (a forward of the stages before, or rank 0's next
            request for a serving rank). A rank that dies or hangs ends the others with a
            PipelineError within about this time (a dead process at once: its connection closes).
        join_timeout: seconds for every rank to join and load its part (default ``timeout``).
        pin_cpus: restrict this process to its share of the host's CPUs (see :func:`pin_local_cpus`);
            for several ranks on one host.

    Example::

        stage = load_stage("qwen-sep", "b 0-12,12-24 e", lazy=True, timeout=60)
    """
    if pin_cpus:  # before any thread starts (gloo's, torch's), so they inherit it
        pin_local_cpus()
    rank, world = env_world()
    source = SepWeights(model)
    # bad specs fail on every rank before anyone waits for the others
    specs = stage_specs(parts, world, source, balance)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1:
        part = load_part(model, specs[0], device=dev, dtype=dtype, lazy=lazy, **load_kwargs)
        return Stage(part, specs, 0, None, extra_window_slots=extra_window_slots)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    join = timeout if join_timeout is None else join_timeout
    owns = init_distributed(backend, join)
    # control messages (headers, texts, the handshake) always go over gloo on the CPU
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timedelta(seconds=join))
    name = f"stage {rank} of {world}, {str(specs[rank])!r}"
    link = Link(rank, name, timeout, data=None, control=control, device=dev)
    try:
        part = load_part(model, specs[rank], device=dev, dtype=dtype, lazy=lazy, **load_kwargs)
        config = json.dumps(source.config, sort_keys=True).encode()
        info = {
            "host": socket.gethostname(),
            "stages": ",".join(str(s) for s in specs),
            "config": hashlib.sha256(config).hexdigest()[:16],
            "dtype": str(part.dtype),
            "version": _version(),
        }
        _handshake(rank, world, info, control, join)
    except BaseException:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
        raise
    return Stage(part, specs, rank, link, owns_group=owns, extra_window_slots=extra_window_slots)


def pin_local_cpus() -> list[int]:
    """Restrict this process to its share of the host's CPUs: local rank i of n gets the i-th block.

    With several ranks on one host, unpinned ranks were measured (benchmarks/bench_pipeline.py) to
    land on one core now and then and to lose 3-5 ms per message; pinned, a hop costs ~0.2 ms.
    On a host busy with other work, a pinned rank cannot move away from a loaded core, so it is
    opt-in. Call it before anything starts threads. Returns the CPUs kept.

    Example::

        pin_local_cpus()   # under torchrun --nproc-per-node 2 on 4 cores: rank 0 -> [0, 1], rank 1 -> [2, 3]
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = _cpu_share(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    os.sched_setaffinity(0, share)
    return share


def _cpu_share(cpus: list[int], local_rank: int, local_world: int) -> list[int]:
    """The local rank's contiguous block of ``cpus``; one CPU when there are more ranks than CPUs."""
    n = len(cpus)
    share = cpus[local_rank * n // local_world : (local_rank + 1) * n // local_world]
    return share or [cpus[local_rank % n]]


def _handshake(rank: int, world: int, info: dict[str, str], group: Any, timeout: float) -> None:
    """Wait (bounded) until every rank has loaded its part; check they all load the same model."""
    mine = json.dumps(info).encode()[: _INFO_BYTES - 1]
    buf = torch.zeros(_INFO_BYTES, dtype=torch.uint8)
    buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        dist.all_gather(bufs, buf, group=group)
    except RuntimeError as e:
        why = _gloo_text(e)
        msg = f"rank {rank}: not every rank loaded its part within {timeout:g} s ({why})"
        raise PipelineError(msg) from e
    infos = [json.loads(bytes(b.tolist()).rstrip(b"\0")) for b in bufs]
    what = {
        "version": "llm_pipeline version",
        "config": "model (config.json)",
        "stages": "stage specs",
        "dtype": "dtype",
    }
    first = infos[0]
    for r, other in enumerate(infos):
        for key, label in what.items():
            if other[key] != first[key]:
                msg = (
                    f"rank {r} on {other['host']} has {label} {other[key]!r} but rank 0 on "
                    f"{first['host']} has {first[key]!r}; start every rank with the same "
                    "converted model, --parts, --dtype and llm_pipeline version"
                )
                raise ValueError(msg)
