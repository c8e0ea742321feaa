"""Waiting for file descriptors to become readable: on the reactor, bounded by the clock.

Two kernel facts reach the pilot as readability, so it waits for them as events and
never polls: a pidfd (``os.pidfd_open``, Linux >= 5.3) becomes readable when its
process has terminated, and an epoll set holding a cgroup's ``cgroup.events`` with
``EPOLLPRI`` becomes readable when that file changes (``pilot.process.cgroup``).

``all_readable(fdset, clock, fds, timeout)`` fires True once every one of ``fds`` has
been readable, False when ``timeout`` runs out first (on ``clock``).  Without an
``IReactorFDSet`` (a reactor that watches no file descriptors, e.g. a test's ``Clock``)
only the timeout can end the wait: the caller then looks again, having waited the
whole bound.  The Deferred can be cancelled; the descriptors are never closed here.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReadDescriptor)
class _Readable:
    """One descriptor in the reactor until its first readability."""

    def __init__(self, wait: _Wait, fd: int) -> None:
        self._wait = wait
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        self._wait.became_readable(self)

    def connectionLost(self, reason: Failure) -> None:
        self._wait.became_readable(self)

    def logPrefix(self) -> str:
        return "fd-wait"


class _Wait:
    def __init__(self, fdset: IReactorFDSet | None, clock: IReactorTime, fds: Iterable[int]) -> None:
        self._fdset = fdset
        self.done: Deferred[bool] = Deferred(lambda _: self._stop())
        self._pending: set[_Readable] = set()
        self._timer: IDelayedCall | None = None
        self._clock = clock
        if fdset is not None:
            for fd in fds:
                reader = _Readable(self, fd)
                self._pending.add(reader)
                fdset.addReader(reader)
        elif any(True for _ in fds):
            self._pending.add(_Readable(self, -1))  # only the timeout can end it

    def start(self, timeout: float) -> Deferred[bool]:
        if not self._pending:
            self.done.callback(True)
        else:
            self._timer = self._clock.callLater(max(0.0, timeout), self._timed_out)
        return self.done

    def became_readable(self, reader: _Readable) -> None:
        if reader not in self._pending:
            return
        self._pending.discard(reader)
        if self._fdset is not None:
            self._fdset.removeReader(reader)
        if not self._pending:
            self._stop()
            if not self.done.called:
                self.done.callback(True)

    def _timed_out(self) -> None:
        self._timer = None
        self._stop()
        if not self.done.called:
            self.done.callback(False)

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._fdset is not None:
            for reader in self._pending:
                self._fdset.removeReader(reader)
        self._pending.clear()


def all_readable(
    fdset: IReactorFDSet | None, clock: IReactorTime, fds: Iterable[int], timeout: float
) -> Deferred[bool]:
    """True once every one of ``fds`` has been readable; False when ``timeout`` ran out first."""
    return _Wait(fdset, clock, list(fds)).start(timeout)
