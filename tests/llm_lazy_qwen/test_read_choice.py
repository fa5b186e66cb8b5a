"""ReadChoice: a budgeted part times each way of reading in turn (O_DIRECT or the page cache, and how
many readers) and keeps the cheapest: wall time plus the readers' CPU time per byte."""

import threading
import time

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import load_part
from llm_lazy_qwen.read_choice import WAYS, ReadChoice

A, B, C = (True, 4), (False, 1), (False, 4)


def _timed(choice, nbytes, seconds_of):
    with choice.read(nbytes) as way:
        time.sleep(seconds_of.get(way, 0.0))
    return way


def test_tries_each_way_in_turn_then_keeps_the_fastest():
    choice = ReadChoice(trials=2, min_bytes=1, ways=(A, B, C))
    slow = {A: 0.02, B: 0.005, C: 0.01}
    ways = [_timed(choice, 10**6, slow) for _ in range(6)]
    assert ways == [A, B, C, A, B, C] and choice.way == B
    assert [_timed(choice, 10**6, {}) for _ in range(3)] == [B] * 3
    assert all(len(r) == 2 for r in choice.rates.values())  # nothing timed after the choice
    choice = ReadChoice(trials=1, min_bytes=1, ways=(A, B))
    for _ in range(2):
        _timed(choice, 10**6, {A: 0.005, B: 0.02})
    assert choice.way == A


def test_a_way_that_reads_faster_but_burns_reader_cpu_loses(monkeypatch):
    """The page cache may read faster alone yet cost the matmuls their cores (its copies): the choice
    counts the readers' CPU seconds (llm_sepweight.read_cpu_seconds) with the wall time."""
    import llm_lazy_qwen.read_choice as rc

    spent = [0.0]
    monkeypatch.setattr(rc, "read_cpu_seconds", lambda: spent[0])
    choice = ReadChoice(trials=1, min_bytes=1, ways=(A, B))
    for way, wall, cpu in ((A, 0.02, 0.001), (B, 0.01, 0.03)):  # B: twice as fast, 30x the CPU
        with choice.read(10**6) as got:
            assert got == way
            time.sleep(wall)
            spent[0] += cpu
    assert choice.rates[B][0] > choice.rates[A][0] and choice.way == A
    assert choice.costs[A][0] < choice.costs[B][0]


def test_small_and_overlapping_reads_are_not_timed():
    choice = ReadChoice(trials=1, min_bytes=1000, ways=(A, B))
    _timed(choice, 10, {})  # too small to tell
    assert choice.rates == {A: [], B: []}
    inside, release = threading.Event(), threading.Event()

    def long_read():
        with choice.read(10**6):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=long_read)
    t.start()
    inside.wait(5)
    _timed(choice, 10**6, {})  # ran while another read was in progress
    release.set()
    t.join()
    assert choice.rates == {A: [], B: []} and choice.way is None


def test_a_given_way_is_kept_and_no_ways_is_refused():
    choice = ReadChoice(way=C)
    assert [_timed(choice, 10**9, {}) for _ in range(3)] == [C] * 3
    with pytest.raises(ValueError, match="at least one way"):
        ReadChoice(ways=())


@pytest.mark.parametrize("way", [*WAYS, None])
def test_budgeted_decode_equals_ram_every_way(sep, way):
    path, _ = sep("qwen2")
    small = {"max_context": 64, "head_chunk_size": 128}
    everything = load_part(path, memory_budget=10**12, **small).memory_plan
    part = load_part(path, memory_budget=(everything.minimum + everything.peak) // 2, **small)
    part._streamer.read_choice = ReadChoice(trials=1, min_bytes=1, way=way)
    assert part.memory_plan.streamed
    ids = token_ids(batch=2, seq=7, seed=1)
    ram = load_part(path, **small)
    with torch.no_grad():
        cache, want_cache = part.new_cache(), ram.new_cache()
        got, want = [part(ids, cache=cache)], [ram(ids, cache=want_cache)]
        for _ in range(3):
            nxt = want[-1][:, -1:].argmax(-1)
            got.append(part(nxt, cache=cache))
            want.append(ram(nxt, cache=want_cache))
    part.close()
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), **FP32)
    if way is None:  # every way was tried on this part's reads, and one was kept
        assert part._streamer.read_choice.way in WAYS
