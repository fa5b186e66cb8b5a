"""One writer per sepweight folder: the writer lock, waiting for it, and claiming a folder for a conversion.

The lock is an exclusive ``flock`` on ``.sepweight.lock``. The kernel drops it when its holder exits,
however it dies (SIGKILL included), so a killed writer never blocks the next one; the holder's pid is
written into the file only to name it in messages. A second writer in the same thread would wait for
itself forever, so it is refused instead. On systems without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

try:
    import fcntl
except ImportError:  # Windows: no advisory locking, single writer assumed
    fcntl = None  # type: ignore[assignment]

from .errors import SepweightError
from .manifest import Manifest, read_if_complete

log = logging.getLogger(__name__)

LOCK = ".sepweight.lock"
NOTE_EVERY = 60.0  # seconds between "still waiting" notes
W = TypeVar("W")


class FolderBusy(SepweightError):
    """Another process (or thread) holds the folder's writer lock (:func:`wait_for_writer` waits for it)."""


# The locks this process holds, by the lock file's (st_dev, st_ino): a second writer on a folder in the
# thread that holds it is refused instead of waiting for itself (flock would refuse it as another writer).
_HELD: weakref.WeakValueDictionary[tuple[int, int], FolderLock] = weakref.WeakValueDictionary()


class FolderLock:
    """The exclusive writer lock on `root`, held until :meth:`release` or process exit.

    Raises :class:`FolderBusy` when another process or thread holds it, and :class:`SepweightError`
    when the calling thread already does (an unfinished writer on the same folder).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pid = os.getpid()
        self.thread = threading.get_ident()
        self._fd = -1
        self._fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: the holder's pid is in it
        if fcntl is None:
            return
        st = os.fstat(self._fd)
        key = (st.st_dev, st.st_ino)
        mine = _HELD.get(key)
        if mine is not None and mine.held and (mine.pid, mine.thread) == (self.pid, self.thread):
            self.release()
            raise SepweightError(
                f"{root}: this thread already has an unfinished SepweightWriter on this folder; call its "
                "finish() (or close()) before writing into the folder again (waiting for it here would never end)"
            )
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise FolderBusy(f"{root}: {holder(root)} is writing into this folder; wait for it to finish") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{self.pid}\n".encode(), 0)
        _HELD[key] = self

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock); a second call does nothing."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.release()


def holder(root: Path) -> str:
    """Who holds `root`'s writer lock, in words, from the pid its holder wrote into the lock file."""
    try:
        pid = int((root / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "another process"
    if pid == os.getpid():
        return "another thread of this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # the lock outlived it: a process it forked, or one on another host, holds it
        return f"another process (the lock file names process {pid}, which is not running here)"
    except PermissionError:
        pass  # alive, another user's
    return f"another process (pid {pid})"


def wait_for_writer(root: Path, *, timeout: float | None = None, say: Callable[[str], None] = log.info) -> None:
    """Block until no process holds ``root``'s writer lock (at once when none does).

    A killed writer's lock is dropped by the kernel, so this ends when the writer finishes or dies.
    Every :data:`NOTE_EVERY` seconds `say` is told who is still holding it. With `timeout` (seconds),
    :class:`FolderBusy` is raised when the lock is still held by then.

    Example::

        wait_for_writer(Path("qwen-sep"), timeout=600)
    """
    path = root / LOCK
    if fcntl is None or not path.is_file():
        return
    start = time.monotonic()
    note, pause = start + NOTE_EVERY, 0.01
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:  # granted once the writer's exclusive lock is released
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                raise FolderBusy(f"{root}: {holder(root)} still holds the writer lock after {timeout:g} s")
            if now >= note:
                say(
                    f"{root}: still waiting for {holder(root)} to finish writing into this folder ({now - start:.0f} s)"
                )
                note += NOTE_EVERY
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
    finally:
        os.close(fd)


def finished_conversion(root: Path, key: str) -> Manifest | None:
    """The manifest of a complete conversion with this resume key in `root` (stat only), else None."""
    manifest = read_if_complete(root)
    return manifest if manifest is not None and manifest.source.get("resume_key") == key else None


def claim_folder(
    root: Path, key: str, make_writer: Callable[[], W], *, progress: bool, timeout: float | None = None
) -> W | Manifest:
    """A new writer on `root` from `make_writer`, or the manifest once the conversion `key` is complete there.

    While another process writes into `root` this waits for it (a note on stderr with `progress`, else
    logged); when that process completed this same conversion its manifest is returned and nothing is
    written. convert() and convert_gguf() claim their output folder through this.

    Example::

        got = claim_folder(dst, key, lambda: SepweightWriter(dst, config, resume_key=key), progress=True)
        if isinstance(got, Manifest):
            return got  # done, by us earlier or by the process we waited for
    """

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr)
        else:
            log.info("%s", message)

    while True:
        done = finished_conversion(root, key)
        if done is not None:
            return done
        try:
            writer = make_writer()
        except FolderBusy:
            say(f"{root}: {holder(root)} is converting into this folder; waiting for it")
            wait_for_writer(root, timeout=timeout, say=say)
            continue
        done = finished_conversion(root, key)  # finished by the holder between our check and our lock
        if done is None:
            return writer
        close = getattr(writer, "close", None)
        if close is not None:
            close()
        return done
