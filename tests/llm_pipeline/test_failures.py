"""A rank that dies, hangs, never joins or disagrees ends every other rank with a clear error, fast."""

import time

import pytest


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_killed_rank_ends_the_others_at_once(sep, launch, tmp_path, victim):
    """SIGKILL during decoding: the neighbours see the closed connection, far inside the 20 s timeout."""
    path, _ = sep("qwen2")
    out = tmp_path / "out"
    args = ["kill", str(path), "auto", str(out), "--timeout", "20"]
    ranks = launch(3, [*args, "--victim", str(victim)])
    died = float((tmp_path / "out.victim").read_text())
    assert ranks[victim].returncode == -9
    for r in ranks:
        if r.rank == victim:
            continue
        assert r.returncode == 3, r.stderr[-2000:]
        err = r.error
        assert err["type"] == "PipelineError"
        assert err["error"].startswith(f"rank {r.rank}")
        # each rank names the victim, also when it only lost a neighbour that stopped because of it
        want = f"rank {victim} closed the connection: its process exited, was killed"
        assert want in err["error"]
        assert err["at"] - died < 10.0, err


def test_hung_rank_times_out(sep, launch, tmp_path):
    """A frozen rank (SIGSTOP) keeps its sockets open: the others give up after the 3 s timeout."""
    path, _ = sep("qwen2")
    out = tmp_path / "out"
    args = ["hang", str(path), "auto", str(out), "--timeout", "3"]
    ranks = launch(3, args, stuck={1})
    froze = float((tmp_path / "out.victim").read_text())
    errors = [ranks[0].error, ranks[2].error]
    assert all(r.returncode == 3 for r in (ranks[0], ranks[2]))
    want = "nothing within 3 s: rank 1 (or one before it) hangs"
    assert any(want in e["error"] for e in errors), errors
    for e in errors:
        assert e["type"] == "PipelineError"
        assert 2.5 < e["at"] - froze < 3 + 8.0, e


def test_rank_that_never_joins(sep, launch, tmp_path):
    path, _ = sep("qwen2")
    start = time.time()
    args = ["kill", str(path), "auto", str(tmp_path / "out"), "--join-timeout", "3"]
    ranks = launch(3, args, ranks=[0, 1])  # rank 2 never starts
    for r in ranks:
        assert r.returncode == 3
        err = r.error
        assert err["type"] == "PipelineError"
        want = f"rank {r.rank}: the 3 ranks did not all join at 127.0.0.1:"
        assert want in err["error"]
        assert "within 3 s" in err["error"] and "start every rank" in err["error"]
        # the store client retries a little past the timeout
        assert err["at"] - start < 3 * 3 + 5.0


def test_rank_that_never_loads_its_part_is_named(sep, launch, tmp_path):
    path, _ = sep("qwen2")
    args = ["slowload", str(path), "auto", str(tmp_path / "out"), "--join-timeout", "3"]
    start = time.time()
    rank0 = launch(2, args, stuck={1})[0]
    assert rank0.returncode == 3
    err = rank0.error
    assert err["type"] == "PipelineError" and err["at"] - start < 3 + 8.0
    want = "rank 0: not every rank loaded its part within 3 s ([Rank 0]: Ranks 1 failed"
    assert want in err["error"] and "monitoredBarrier" in err["error"]


def test_ranks_started_with_different_specs(sep, launch, tmp_path):
    path, _ = sep("qwen2")
    out = str(tmp_path / "out")
    args = {
        0: ["kill", str(path), "b 0-2,2-3 e", out],
        1: ["kill", str(path), "b 0-1,1-3 e", out],
    }
    for r in launch(2, args):
        assert r.returncode == 3
        assert r.error["type"] == "ValueError"
        want = "has stage specs 'b 0,1-3 e' but rank 0 on"
        assert r.error["error"].startswith("rank 1 on") and want in r.error["error"]
