"""Atomic file writes: write to a temp file in the same folder, fsync, rename over the target."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: Path, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it replaces `path` atomically, on error nothing changes.

    A reader (or a resumed run) sees either the old file or the complete new one, never half of it.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename (then fsync the folder).

    Example::

        atomic_write_bytes(Path("out/train_config.json"), json.dumps(config).encode())
    """
    with atomic_write(path, fsync=fsync) as f:
        f.write(data)


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so that files created or renamed in it survive a crash (POSIX).

    Example::

        os.replace(tmp, final)
        fsync_dir(final.parent)   # the rename itself is durable now
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
