"""Waiting for real processes, files and pilot events by events, never by polling.

A test that loops "check, sleep 50 ms, check again" costs time on a busy machine,
hides how long the wait really was, and fails by timing rather than by cause.  The
reactor can tell us instead:

* ``file_ready``: inotify on the file's directory (a file-descriptor event) fires when
  the file is closed after writing, created, or renamed into place;
* ``processes_gone``: a pidfd per process (Linux >= 5.3) becomes readable when the
  process terminates, zombie or not, child of ours or not;
* ``log_event``: a log observer fires on the pilot's own structured event.

Each wait is bounded by a timeout on the reactor: a limit, not a polling period.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet import inotify
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

reactor: Any = _reactor

_FILE_EVENTS = inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_CREATE | inotify.IN_ATTRIB


def has_text(path: Path) -> bool:
    """The file exists and holds more than white space."""
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


def exists(path: Path) -> bool:
    return path.exists()


class ProcessEndedFirst(Exception):
    """The process that should have written the file ended before it did."""


async def file_ready(
    path: Path,
    *,
    ready: Callable[[Path], bool] = has_text,
    timeout: float = 30.0,
    unless: Deferred[Any] | None = None,
) -> None:
    """Return once ``ready(path)``, checked whenever inotify reports a change in its directory.

    ``unless``: a Deferred that fires when the writer has ended (``ManagedProcess.wait()``,
    a ``processEnded``); the wait then fails at once with ``ProcessEndedFirst`` instead of
    running into its timeout.  Its result is passed through untouched.
    """
    done: Deferred[None] = Deferred()

    def check(*_: object) -> None:
        if not done.called and ready(path):
            done.callback(None)

    notifier = inotify.INotify(reactor)
    notifier.startReading()
    try:
        notifier.watch(FilePath(str(path.parent)), mask=_FILE_EVENTS, callbacks=[check])
        check()  # after the watch is set, so no change can fall between the two
        if unless is not None:

            def ended(result: object) -> object:
                if not done.called:
                    done.errback(ProcessEndedFirst(f"the writer of {path} ended before writing it"))
                return result

            unless.addBoth(ended)
        done.addTimeout(timeout, reactor)
        await done
    finally:
        notifier.loseConnection()


@implementer(IReadDescriptor)
class _PidfdReader:
    """A pidfd in the reactor: readable once the process has terminated."""

    def __init__(self, pid: int) -> None:
        self.done: Deferred[None] = Deferred()
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None
            self.done.callback(None)
            return
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def doRead(self) -> None:
        self.close()
        if not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "pidfd"

    def close(self) -> None:
        if self._fd is not None:
            reactor.removeReader(self)
            os.close(self._fd)
            self._fd = None


async def processes_gone(pids: Iterable[int], *, timeout: float = 10.0) -> None:
    """Return once every process of ``pids`` has terminated (a zombie counts as gone)."""
    readers = [_PidfdReader(pid) for pid in pids]
    everyone: Deferred[None] = Deferred()
    left = [len(readers)]

    def one_gone(_: object) -> None:
        left[0] -= 1
        if left[0] == 0 and not everyone.called:
            everyone.callback(None)

    for reader in readers:
        reader.done.addCallback(one_gone)
    if not readers:
        return
    everyone.addTimeout(timeout, reactor)
    try:
        await everyone
    finally:
        for reader in readers:
            reader.close()


def log_event(match: Callable[[LogEvent], bool], *, timeout: float = 30.0) -> Deferred[LogEvent]:
    """A Deferred for the next log event that ``match``es (set it up before causing the event)."""
    found: Deferred[LogEvent] = Deferred()

    matched: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        # Fired on the next reactor turn: the test must not run inside the pilot's log call.
        if not matched and not found.called and match(event):
            matched.append(event)
            reactor.callLater(0, lambda: None if found.called else found.callback(event))

    def stop(result: object) -> object:
        globalLogPublisher.removeObserver(observe)
        return result

    globalLogPublisher.addObserver(observe)
    found.addBoth(stop)
    found.addTimeout(timeout, reactor)
    return found
