"""Rss of the mappings that hold given addresses, read from /proc/self/smaps (Linux): for memory tests."""

from __future__ import annotations

from collections.abc import Iterable


def rss_kb(addresses: Iterable[int], require: bool = True) -> int:
    """Sum of the Rss (kB) of the mappings holding any of `addresses` (e.g. ``t.data_ptr()``); with
    `require`, an AssertionError when no mapping holds one of them."""
    addresses = list(addresses)
    total, inside, found = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, _, hi = fields[0].partition("-")
                try:
                    inside = any(int(lo, 16) <= a < int(hi, 16) for a in addresses)
                except ValueError:
                    inside = False
                found |= inside
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    if require and not found:
        raise AssertionError(f"no mapping holds {[hex(a) for a in addresses]}")
    return total
