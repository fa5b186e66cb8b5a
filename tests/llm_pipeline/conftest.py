"""Fixtures: tiny models converted once per session, and launch() of a multi-process pipeline on localhost."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("pipeline_worker.py")


@dataclass
class Rank:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> dict:
        """The JSON line a failed worker printed: {"error", "type", "at"}."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"rank {self.rank} printed no error (rc {self.returncode}):\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch(tmp_path_factory):
    """``launch(world, args, ranks=None, stuck=(), wait=60) -> [Rank]``: run ranks of pipeline_worker.py.

    ``args`` are the worker's arguments, the same for every rank or a dict by rank; ``ranks``
    (default all) are started; those in ``stuck`` (a SIGSTOPped victim) are killed once the others
    have ended; any rank still running after ``wait`` s fails the test. The ranks are forked by one
    zygote process that imported torch once for the session (see pipeline_worker.py).
    """
    logs = tmp_path_factory.mktemp("ranks")
    count = [0]

    def run(zygote, world: int, args, ranks=None, stuck=(), wait: float = 60.0) -> list[Rank]:
        count[0] += 1
        prefix = logs / f"launch{count[0]}"
        ranks = list(range(world) if ranks is None else ranks)
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world),
        }
        argv = {str(r): args[r] if isinstance(args, dict) else args for r in ranks}
        request = {
            "ranks": ranks,
            "args": argv,
            "env": env,
            "logs": str(prefix),
            "stuck": list(stuck),
            "wait": wait,
        }
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        reply = zygote.stdout.readline()
        assert reply, f"the zygote died:\n{(logs / 'zygote.err').read_text()[-3000:]}"
        reply = json.loads(reply)
        out = []
        for r in ranks:
            text = {s: Path(f"{prefix}.{r}.{s}").read_text() for s in ("out", "err")}
            out.append(Rank(r, reply["codes"][str(r)], text["out"], text["err"]))
        late = [r for r in reply["killed"] if r not in stuck]
        assert not late, f"ranks {late} did not finish in {wait} s:\n" + "\n".join(o.stderr[-2000:] for o in out)
        return out

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), "--zygote"]
    with (logs / "zygote.err").open("w") as log:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
        with subprocess.Popen(cmd, **pipes, text=True, env=env) as zygote:
            yield functools.partial(run, zygote)
            zygote.stdin.close()
            zygote.wait(timeout=30)
