"""The wire between stages: small headers and tensors over torch.distributed point-to-point, every wait bounded.

Each message is an int64 header, then its payload. Hidden states only ever travel forward (rank i to
i + 1); results travel from the last rank back to rank 0::

    FORWARD  i -> i+1   hidden states (B, T, H) in the compute dtype [+ mask of the new tokens (B, T)]
    ERROR    i -> i+1   a stage failed on this micro-batch: its utf-8 message, passed on to rank 0;
                        with FATAL: a rank lost its upstream neighbour and is going down
    CROP     i -> i+1   crop every KV cache to `past` tokens (0: drop them); FAILED collects "could not"
    STOP     i -> i+1   leave the serve loop; with a message when rank 0 stops after an error
    RESULT   last -> 0  logits (B, keep, V); the ack of CROP / STOP; with FAILED an error message instead

Messages between two ranks arrive in the order they were sent (one gloo pair, one tag), so a header
always says exactly what to receive next. A dead peer surfaces at once as a closed connection; a
hung one as a timeout of the wait; both become a PipelineError naming the rank.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import astuple, dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

# queued sends per rank before a send waits for the oldest to be delivered (Pipeline keeps below it)
MAX_PENDING = 64


class PipelineError(RuntimeError):
    """A rank of the pipeline died, hung or never joined; the message names it. The pipeline is unusable."""


class StageError(PipelineError):
    """A stage raised on its part (bad input, a cache that cannot roll back); the pipeline stays usable."""


class Op(IntEnum):
    FORWARD = 1
    ERROR = 2
    CROP = 3
    STOP = 4
    RESULT = 5


# Header.flags bits; FATAL: the sender is going down (with FAILED: its error message)
HAS_MASK, USE_CACHE, FAILED, FATAL = 1, 2, 4, 8


@dataclass
class Header:
    op: Op
    micro_batch: int = 0
    batch: int = 0  # rows of the payload
    seq: int = 0  # positions of the payload (new tokens; kept logits for RESULT)
    past: int = 0  # cached positions before these (the crop length for CROP)
    flags: int = 0
    keep: int = 0  # logits_to_keep (0: all positions)
    nbytes: int = 0  # length of a text payload (ERROR, STOP, failed RESULT)

    SIZE = 8

    def tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.int64)  # (8,)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Header:
        op, *rest = (int(v) for v in t.tolist())
        return cls(Op(op), *rest)


def env_world() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed if joined, else torchrun's env vars."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str, timeout: float) -> bool:
    """Join the process group described by torchrun's env vars; True when this call created it.

    Every rank must join within ``timeout`` seconds, else each one that did gets a PipelineError.

    Example::

        init_distributed("gloo", timeout=60)   # under torchrun --nproc-per-node 2 ...
    """
    if dist.is_initialized():
        return False
    rank, world = env_world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        msg = (
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the ranks with "
            "`torchrun --nproc-per-node N ...` (or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)"
        )
        raise ValueError(msg)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except RuntimeError as e:  # DistStoreError / DistNetworkError: someone never came
        msg = (
            f"rank {rank}: the {world} ranks did not all join at {where} within {timeout:g} s "
            f"({_gloo_text(e)}); start every rank (torchrun --nproc-per-node / --nnodes with the same "
            "--master-addr and --master-port) or raise the timeout"
        )
        raise PipelineError(msg) from e
    return True


class Link:
    """Point-to-point messages of one rank with its neighbours; sends are asynchronous, waits bounded.

    Headers and texts go over ``control`` (gloo, CPU), tensors over ``data`` (gloo, or nccl on CUDA).
    """

    def __init__(
        self,
        rank: int,
        name: str,
        timeout: float,
        data: Any = None,
        control: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.rank, self.name, self.timeout = rank, name, timeout
        self.data, self.control = data, control
        self.device = device or torch.device("cpu")
        # after a timeout gloo closes all connections of this process ("Application timeout
        # caused pair closure"): the neighbours see a closed connection, nothing more is sent
        self.timed_out = False
        # (work, buffer kept alive until sent, dst)
        self._pending: list[tuple[Any, torch.Tensor, int]] = []

    # ------------------------------------------------------------------------------- send
    def send(self, dst: int, header: Header, *tensors: torch.Tensor, text: str | None = None) -> None:
        """Queue a header and its payload to ``dst``; returns before they are delivered."""
        payload = b"" if text is None else text.encode()
        header.nbytes = len(payload)
        self._post(dst, header.tensor(), self.control)
        if payload:
            self._post(
                dst,
                torch.frombuffer(bytearray(payload), dtype=torch.uint8),
                self.control,
            )
        for t in tensors:
            self._post(dst, t.to(self.device).contiguous(), self.data)

    def _post(self, dst: int, t: torch.Tensor, group: Any) -> None:
        self._reap()
        try:
            work = dist.isend(t, dst, group=group)
        except RuntimeError as e:
            raise PipelineError(self._explain(e, dst, "sending to", self.timeout)) from e
        self._pending.append((work, t, dst))

    def _reap(self) -> None:
        """Forget finished sends (raising their errors); wait for the oldest when too many are in flight."""
        keep = []
        for work, t, dst in self._pending:
            if work.is_completed():
                self._wait(work, dst, "sending to", self.timeout)
            else:
                keep.append((work, t, dst))
        self._pending = keep
        while len(self._pending) > MAX_PENDING:
            work, _, dst = self._pending.pop(0)
            self._wait(work, dst, "sending to", self.timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message was delivered, at most ``timeout`` s in all."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        while self._pending:
            work, _, dst = self._pending.pop(0)
            left = max(deadline - time.monotonic(), 0.001)
            self._wait(work, dst, "sending to", left, limit)

    # ------------------------------------------------------------------------------- receive
    def recv_header(
        self,
        src: int,
        timeout: float | None = None,
        what: str = "waiting for a message from",
    ) -> Header:
        buf = torch.empty(Header.SIZE, dtype=torch.int64)
        self._recv(buf, src, self.control, timeout or self.timeout, what)
        return Header.from_tensor(buf)

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._recv(buf, src, self.data, self.timeout, what)
        return buf

    def recv_text(self, src: int, header: Header) -> str:
        if header.nbytes == 0:
            return ""
        buf = torch.empty(header.nbytes, dtype=torch.uint8)
        self._recv(buf, src, self.control, self.timeout, "receiving an error message from")
        return bytes(buf.tolist()).decode(errors="replace")

    def _recv(self, buf: torch.Tensor, src: int, group: Any, timeout: float, what: str) -> None:
        try:
            work = dist.irecv(buf, src, group=group)
        except RuntimeError as e:
            raise PipelineError(self._explain(e, src, what, timeout)) from e
        self._wait(work, src, what, timeout)

    def _wait(
        self,
        work: Any,
        peer: int,
        what: str,
        timeout: float,
        limit: float | None = None,
    ) -> None:
        """Wait for ``work`` at most ``timeout`` s (``limit``: the timeout to report)."""
        limit = limit or timeout
        try:
            done = work.wait(timedelta(seconds=timeout))
        except RuntimeError as e:
            # gloo: "Timed out waiting ...", "Connection closed by peer ..."
            raise PipelineError(self._explain(e, peer, what, limit)) from e
        if done is False:
            timed_out = RuntimeError("Timed out")
            raise PipelineError(self._explain(timed_out, peer, what, limit))

    def _explain(self, e: BaseException, peer: int, what: str, timeout: float) -> str:
        text = _gloo_text(e)
        low = text.lower()
        if "pair closure" in low:  # an earlier timeout of this rank closed its connections
            cause = "this rank's connections were closed after an earlier timeout"
        elif "timed out" in low and what.startswith("sending"):
            self.timed_out = True
            cause = (
                f"rank {peer} took none of this rank's {len(self._pending) + 1} queued messages within "
                f"{timeout:g} s: it hangs, was never started, or is itself blocked sending to a rank "
                "that does not read"
            )
        elif "timed out" in low:
            self.timed_out = True
            cause = (
                f"nothing within {timeout:g} s: rank {peer} (or one before it) hangs, was "
                "never started, or a step takes longer than the timeout allows"
            )
        elif any(s in low for s in _CLOSED):
            cause = (
                f"rank {peer} closed the connection: its process exited, was killed or gave "
                "up after a timeout (see its log)"
            )
        else:
            cause = "communication failed"
        return f"rank {self.rank} ({self.name}): {what} rank {peer}: {cause} [{text}]"


_CLOSED = ("connection closed", "connection reset", "broken pipe", "connection refused")


def _gloo_text(e: BaseException) -> str:
    """The first line of a c10d / gloo error without its source location."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)[:300]
