"""Running blocking functions off the reactor thread.

``ThreadRunner`` is the one shape every blocking helper takes: a callable that runs
``f(*args, **kwargs)`` in a worker thread and returns a Deferred of its result
(``deferToThreadPool`` bound to a pool).  Code below the service layer never
chooses a pool itself; the service owns the pools and hands runners down.

``WorkerPool`` is such a pool of the pilot's own, bounded.  The reactor's default
pool (``reactor.getThreadPool()``, 10 threads) is shared with everything in the
process that calls ``deferToThread`` and cannot be sized per use: a few long
jobs in it (a checksum that follows a transfer for minutes) leave every short call
(a ``stat``, a tail read) queued behind them.  A pool per kind of work — short
blocking calls in one, checksum reading in another — keeps each bounded and keeps
one from starving the other.  Everything submitted to a pool must be *short*: a
step of bounded length, never a wait for something else to happen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class ThreadRunner(Protocol):
    """Runs a blocking function in a worker thread (``deferToThreadPool`` bound to a pool)."""

    def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]: ...


class PoolStopped(RuntimeError):
    """Work was submitted to a ``WorkerPool`` that is stopping or stopped."""


class WorkerPool:
    """A bounded thread pool owned by the pilot; ``runner`` is its ``ThreadRunner``.

    Work submitted before ``start()`` waits and runs once the pool starts.
    ``stop()`` lets work already submitted finish (Twisted's pool runs its backlog
    before its threads quit), refuses new work with ``PoolStopped`` at once, and
    joins the threads in a helper thread so that the reactor never blocks on a join;
    its Deferred fires when every thread has ended.
    """

    def __init__(self, reactor: IReactorFromThreads, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one thread, not {size}")
        self.size = size
        self.name = name
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._stopping: Deferred[None] | None = None
        self._stopped = False
        self._pending = 0

    @property
    def runner(self) -> ThreadRunner:
        """The ``ThreadRunner`` that submits to this pool."""
        return self.run

    @property
    def started(self) -> bool:
        return bool(self._pool.started)

    @property
    def pending(self) -> int:
        """Calls submitted whose result has not reached the reactor yet (queued or running)."""
        return self._pending

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f(*args, **kwargs)`` in one of the pool's threads."""
        if self._stopping is not None:
            return fail(PoolStopped(f"worker pool {self.name} is stopped"))
        self._pending += 1
        d = deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
        d.addBoth(self._settled)
        return d

    def _settled(self, result: T) -> T:
        self._pending -= 1
        return result

    def start(self) -> None:
        """Start the threads (created on demand, up to ``size``)."""
        if self._stopping is not None:
            raise PoolStopped(f"worker pool {self.name} cannot be restarted")
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> Deferred[None]:
        """Refuse new work; fires once the submitted work is done and the threads have ended.

        A pool that was never started is started first, so that work submitted to it
        runs (and its Deferreds fire) instead of waiting forever.
        """
        waiter: Deferred[None] = Deferred()
        if self._stopping is None:
            self._stopping = Deferred()
            if not self._pool.started:
                self._pool.start()
            joiner = threading.Thread(target=self._join, name=f"{self.name}-stop", daemon=True)
            joiner.start()
        if self._stopped:
            waiter.callback(None)
        else:
            self._stopping.addCallback(self._notify, waiter)
        return waiter

    @staticmethod
    def _notify(_: None, waiter: Deferred[None]) -> None:
        waiter.callback(None)

    def _join(self) -> None:
        """Thread body: ``ThreadPool.stop`` blocks until its threads have run out of work."""
        self._pool.stop()
        self._reactor.callFromThread(self._joined)

    def _joined(self) -> None:
        self._stopped = True
        assert self._stopping is not None
        self._stopping.callback(None)
