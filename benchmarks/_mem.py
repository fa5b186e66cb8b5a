"""Memory measurement shared by the benchmarks: peak RSS split into anonymous and file-backed.

``/proc/self/status`` gives the current RssAnon / RssFile and the peak VmHWM; the split peaks are
sampled by a background thread (every 2 ms), which is what "peak anonymous" means in BENCHMARKS.md.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


def status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Peak:
    anon_mb: float = 0.0
    file_mb: float = 0.0
    total_mb: float = 0.0
    base_anon_mb: float = 0.0
    base_file_mb: float = 0.0

    @property
    def anon_above_mb(self) -> float:
        return self.anon_mb - self.base_anon_mb

    @property
    def file_above_mb(self) -> float:
        return self.file_mb - self.base_file_mb


class PeakMemory:
    """Context manager sampling peak RssAnon / RssFile; baseline = values at entry."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = Peak()
        self._stop = threading.Event()

    def _sample(self) -> None:
        s = status_kb()
        self.peak.anon_mb = max(self.peak.anon_mb, s["RssAnon"] / 1024)
        self.peak.file_mb = max(self.peak.file_mb, s["RssFile"] / 1024)
        self.peak.total_mb = max(self.peak.total_mb, s["VmRSS"] / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> Peak:
        s = status_kb()
        self.peak = Peak(base_anon_mb=s["RssAnon"] / 1024, base_file_mb=s["RssFile"] / 1024)
        reset_peak()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self.peak

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak.total_mb = max(self.peak.total_mb, status_kb()["VmHWM"] / 1024)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
