"""ReadChoice: a budgeted part times O_DIRECT and readahead reads in turn and keeps the faster."""

import threading
import time

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import load_part
from llm_lazy_qwen.read_choice import ReadChoice


def _timed(choice, nbytes, seconds_of):
    with choice.read(nbytes) as direct:
        time.sleep(seconds_of[direct])
    return direct


def test_alternates_then_keeps_the_faster_way():
    choice = ReadChoice(trials=2, min_bytes=1)
    ways = [_timed(choice, 10**6, {True: 0.02, False: 0.005}) for _ in range(4)]
    assert ways == [True, False, True, False] and choice.direct is False
    assert [_timed(choice, 10**6, {True: 0.0, False: 0.0}) for _ in range(3)] == [False] * 3
    assert len(choice.rates[True]) == len(choice.rates[False]) == 2  # nothing timed after the choice
    choice = ReadChoice(trials=2, min_bytes=1)
    for _ in range(4):
        _timed(choice, 10**6, {True: 0.005, False: 0.02})
    assert choice.direct is True


def test_small_and_overlapping_reads_are_not_timed():
    choice = ReadChoice(trials=1, min_bytes=1000)
    _timed(choice, 10, {True: 0.0, False: 0.0})  # too small to tell
    assert choice.rates == {True: [], False: []}
    inside = threading.Event()
    release = threading.Event()

    def long_read():
        with choice.read(10**6):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=long_read)
    t.start()
    inside.wait(5)
    _timed(choice, 10**6, {True: 0.0, False: 0.0})  # ran while another read was in progress
    release.set()
    t.join()
    assert choice.rates == {True: [], False: []} and choice.direct is None


def test_a_given_way_is_kept():
    choice = ReadChoice(direct=False)
    assert [_timed(choice, 10**9, {True: 0.0, False: 0.0}) for _ in range(3)] == [False] * 3


@pytest.mark.parametrize("direct", [True, False, None])
def test_budgeted_decode_equals_ram_either_way(sep, direct):
    path, _ = sep("qwen2")
    small = {"max_context": 64, "head_chunk_size": 128}
    everything = load_part(path, memory_budget=10**12, **small).memory_plan
    part = load_part(path, memory_budget=(everything.minimum + everything.peak) // 2, **small)
    part._streamer.read_choice = ReadChoice(trials=1, min_bytes=1, direct=direct)
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
    if direct is None:  # both ways were tried on this part's reads, and one was kept
        assert part._streamer.read_choice.direct is not None
