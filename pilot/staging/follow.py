"""Checksum an input while the copytool is still writing it.

Reading a large input once more after the copy costs as much as a good part of the
copy itself; reading the bytes as they land, from the page cache, hides that cost
behind the transfer.  The follower reads the file from the start, only up to the
first *hole* (``SEEK_HOLE``), because tools such as xrdcp write chunks out of order
and a region not yet written reads as zeros.  When the tool has finished,
``finish()`` lets it read to the end.

No thread is held while the follower waits.  A ``LoopingCall`` on the injected
clock ticks every ``poll`` seconds; a tick submits one *step* to the checksum
pool: read what is there (at most ``chunk`` bytes, up to the first hole), update
the running checksum, return.  While a step finds data, the next one follows at
once; when it finds none, the follower waits for the next tick.  A pool of two
threads therefore serves any number of followers, and a follower holding a
worker thread for the length of a transfer — which starved every other blocking
call of the pilot (issue 11, defect 1) — cannot happen.  ``abandon()`` stops it at
once: no new step starts, and the one in flight (at most one chunk) is left to end
by itself.

The result is an optimisation, never the verdict on its own: the engine uses it only
when it is complete and matches; any doubt (the file was replaced or truncated, it
shrank, the file system reports no holes and the tool wrote out of order) leads to
no result.  ``checksum_file`` reads a finished file the same way, in steps.
"""

from __future__ import annotations

import enum
import os
import threading
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.util.checksum import FileFacts, RunningChecksum
from pilot.util.threads import ThreadRunner

#: Most bytes one step reads: a few milliseconds of a worker thread (page cache + adler32).
CHUNK = 4 << 20

_buffers = threading.local()


def _buffer(size: int) -> memoryview:
    """A read buffer per worker thread: memory grows with the pool, not with the followers."""
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _buffers.buffer = buffer
    return memoryview(buffer)[:size]


class _Step(enum.Enum):
    MORE = "more"  # read something; there may be more at once
    WAIT = "wait"  # nothing new yet
    DONE = "done"  # the end: ``result`` is set if the bytes read are the file's
    FAIL = "fail"  # give up without a result


class ChecksumFollower:
    """Follows one file as it grows, from the reactor; see the module docstring.

    ``start``, ``finish`` and ``abandon`` are called in the reactor thread; only the
    steps run in the pool, one at a time, so the follower's state needs no lock.
    """

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        path: Path,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        *,
        md5: bool = False,
        poll: float = 0.05,
        chunk: int = CHUNK,
    ) -> None:
        self.path = path
        self.md5 = md5
        self.poll = poll
        self.chunk = chunk
        self.result: FileFacts | None = None
        self._clock = clock
        self._in_thread = in_thread
        self._running = RunningChecksum(md5=md5)
        self._fd: int | None = None
        self._loop: LoopingCall | None = None
        self._reading: Deferred[tuple[_Step, FileFacts | None]] | None = None
        self._finishing = False
        self._over = False
        self._waiters: list[Deferred[FileFacts | None]] = []

    @property
    def size(self) -> int:
        """Bytes checksummed so far."""
        return self._running.size

    @property
    def reading(self) -> bool:
        """Whether a step is submitted and not yet back (tests: no thread is held while waiting)."""
        return self._reading is not None

    def start(self) -> None:
        """Begin following: a step every ``poll`` seconds while the tool writes."""
        if self._loop is not None or self._over:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.poll, now=False).addErrback(self._broken)

    def finish(self) -> Deferred[FileFacts | None]:
        """The tool has exited: read what is left, settle, fire with the result (or None).

        Cancelling the returned Deferred abandons the follower.
        """
        waiter: Deferred[FileFacts | None] = Deferred(self._cancel_waiter)
        if self._over:
            waiter.callback(self.result)
            return waiter
        self._waiters.append(waiter)
        self._finishing = True
        self._stop_loop()
        if self._reading is None:
            self._read()
        return waiter

    def abandon(self) -> None:
        """The copy failed or was cancelled: stop at once, no result."""
        self.result = None
        self._end()

    def _cancel_waiter(self, waiter: Deferred[FileFacts | None]) -> None:
        # out of the list first, so that the waiter fails with CancelledError, never with None
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self.abandon()

    # -- reactor side ------------------------------------------------------------------

    def _tick(self) -> None:
        if self._reading is None and not self._over:
            self._read()

    def _read(self) -> None:
        reading = Deferred.fromCoroutine(self._steps())
        self._reading = reading  # before the callbacks: with a synchronous runner they run at once
        reading.addCallbacks(self._read_done, self._read_failed)

    async def _steps(self) -> tuple[_Step, FileFacts | None]:
        """Steps back to back while they find data (iterative even when ``in_thread`` is synchronous)."""
        while True:
            step, facts = await self._in_thread(self._step, self._finishing)
            if step is not _Step.MORE or self._over:
                return step, facts

    def _read_done(self, outcome: tuple[_Step, FileFacts | None]) -> None:
        self._reading = None
        step, facts = outcome
        if self._over:
            self._close()  # abandoned while the step ran: only now is the descriptor free
        elif step is _Step.WAIT and self._finishing:
            self._read()  # finish() came while a step that did not know it was running
        elif step in (_Step.DONE, _Step.FAIL):
            self.result = facts
            self._end()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = None
        if not failure.check(CancelledError):
            self.log.failure(
                "checksum follower of {path} failed", failure, path=str(self.path), event="follow.error"
            )
        self.result = None
        self._end()

    def _broken(self, failure: Failure) -> None:
        self.log.failure("checksum follower loop of {path} stopped", failure, path=str(self.path))

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _end(self) -> None:
        if not self._over:
            self._over = True
            self._stop_loop()
        if self._reading is None:
            self._close()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.result)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- worker side: one bounded step -----------------------------------------------------

    def _step(self, final: bool) -> tuple[_Step, FileFacts | None]:
        """Read at most one chunk of what is certainly written (everything, once ``final``).

        Runs in a worker thread; the facts it returns become ``result`` on the reactor side.
        """
        if self._over:
            return _Step.FAIL, None  # abandoned while this step waited for a thread
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # not created yet; after the tool's end: written elsewhere, renamed
                return (_Step.FAIL if final else _Step.WAIT), None
            except OSError:
                return _Step.FAIL, None
        fd = self._fd
        running = self._running
        limit = os.fstat(fd).st_size if final else _data_end(fd, running.size)
        if limit < running.size:
            return _Step.FAIL, None  # truncated under us: not the bytes we hashed
        if limit > running.size:
            view = _buffer(min(self.chunk, limit - running.size))
            got = os.preadv(fd, [view], running.size)
            if got <= 0:
                return _Step.FAIL, None
            running.update(view[:got])
            return _Step.MORE, None
        if not final:
            return _Step.WAIT, None
        return _Step.DONE, self._settled(fd)

    def _settled(self, fd: int) -> FileFacts | None:
        """Trust the result only if the name still points at the file we read, whole."""
        try:
            now = os.stat(self.path)
        except OSError:
            return None
        mine = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino) and now.st_size == self._running.size:
            return self._running.facts()
        return None


def checksum_file(
    path: Path, clock: IReactorTime, in_thread: ThreadRunner, *, md5: bool = False
) -> Deferred[FileFacts | None]:
    """Size and checksums of a finished file, read in bounded steps (None if it changed meanwhile)."""
    return ChecksumFollower(path, clock, in_thread, md5=md5).finish()


def _data_end(fd: int, offset: int) -> int:
    """Where the data that starts at ``offset`` ends: the next hole, or the end of file."""
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:  # ENXIO at EOF, or no SEEK_HOLE support: only what is certainly there
        return offset
