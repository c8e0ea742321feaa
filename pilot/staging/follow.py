"""Checksum an input while the copytool is still writing it.

Reading a large input once more after the copy costs as much as a good part of the
copy itself; reading the bytes as they land, from the page cache, hides that cost
behind the transfer.  A ``ChecksumFollower`` runs in a worker thread (never on the
reactor): it reads the file from the start, only up to the first *hole* (``SEEK_HOLE``),
because tools such as xrdcp write chunks out of order and a region not yet written
reads as zeros.  When the tool has finished, ``finish()`` lets it read to the end.

The result is an optimisation, never the verdict on its own: the engine uses it only
when it is complete and matches; any doubt (the file was replaced or truncated, it
shrank, the file system reports no holes and the tool wrote out of order) leads to the
ordinary full read after the copy.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pilot.util.checksum import FileFacts, RunningChecksum

BLOCK = 8 << 20


class ChecksumFollower:
    """Follows one file as it grows; ``run`` in a thread, ``finish``/``abandon`` from anywhere."""

    def __init__(self, path: Path, *, md5: bool = False, poll: float = 0.05) -> None:
        self.path = path
        self.md5 = md5
        self.poll = poll
        self._finished = threading.Event()
        self._abandoned = False
        self.result: FileFacts | None = None

    def finish(self) -> None:
        """The tool has exited: read what is left and stop."""
        self._finished.set()

    def abandon(self) -> None:
        """The copy failed or was cancelled: stop as soon as possible, no result."""
        self._abandoned = True
        self._finished.set()

    def run(self) -> None:
        """Thread body: follow the file; leaves ``result`` set only if it is trustworthy."""
        fd = self._open()
        if fd is None:
            return
        try:
            running = RunningChecksum(md5=self.md5)
            buffer = bytearray(BLOCK)
            view = memoryview(buffer)
            while not self._abandoned:
                finished = self._finished.is_set()  # read before looking at the file
                limit = os.fstat(fd).st_size if finished else _data_end(fd, running.size)
                if limit < running.size:
                    return  # truncated under us: not the bytes we hashed
                if limit > running.size:
                    wanted = min(BLOCK, limit - running.size)
                    got = os.preadv(fd, [view[:wanted]], running.size)
                    if got <= 0:
                        return
                    running.update(view[:got])
                    continue
                if finished:
                    self._settle(fd, running)
                    return
                self._finished.wait(self.poll)
        finally:
            os.close(fd)

    def _open(self) -> int | None:
        while not self._abandoned:
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if self._finished.is_set():
                    return None  # never appeared under this name (written elsewhere, renamed)
                self._finished.wait(self.poll)
            except OSError:
                return None
        return None

    def _settle(self, fd: int, running: RunningChecksum) -> None:
        """Trust the result only if the name still points at the file we read, whole."""
        try:
            now = os.stat(self.path)
        except OSError:
            return
        mine = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino) and now.st_size == running.size:
            self.result = running.facts()


def _data_end(fd: int, offset: int) -> int:
    """Where the data that starts at ``offset`` ends: the next hole, or the end of file."""
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:  # ENXIO at EOF, or no SEEK_HOLE support: only what is certainly there
        return offset
