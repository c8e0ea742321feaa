"""How late the reactor runs its timers: a probe for blocking calls on the reactor thread.

Anything that blocks the reactor thread (a ``/proc`` walk, a large file write, a
quadratic parse) delays every timer, every heartbeat, every signal handler and every
byte of network I/O.  ``ReactorLagProbe`` is a ``LoopingCall`` that measures its own
lateness: each tick compares the time it runs with the time it was scheduled for.
Lateness of a tick is the longest the reactor was busy elsewhere around then, to
within one ``interval``.

The probe keeps the maximum, the mean, the count and a small histogram;
``snapshot()`` gives them for the job summary (``reactor_lag_ms_max`` ...), and
``reset()`` starts a new period (one per job).  Cost: one timer per ``interval``
(20 per second at the default), a few microseconds each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.logs import pilot_observer

#: Upper bounds (ms) of the histogram's buckets; the last bucket is everything above.
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@implementer(IReactorTime)
class _NotingClock:
    """The probe's clock as its LoopingCall sees it: notes when the next tick is due."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.due: float | None = None

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        call = self._clock.callLater(delay, callable, *args, **kw)
        self.due = call.getTime()
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return list(self._clock.getDelayedCalls())


class ReactorLagProbe:
    """Measures how late the reactor runs a timer every ``interval`` seconds."""

    log = Logger(observer=pilot_observer)

    def __init__(self, clock: IReactorTime, interval: float = 0.05, *, warn_after: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"the probe interval must be positive, not {interval}")
        self.interval = interval
        self.warn_after = warn_after
        self._clock = _NotingClock(clock)
        self._loop: LoopingCall | None = None
        self.reset()

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        """Tick every ``interval`` from now on (again after ``stop``)."""
        if self.running:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(self._broken)

    def stop(self) -> None:
        """Stop ticking; the figures stay until ``reset``."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def reset(self) -> None:
        """Forget the figures: a new period (a new job) starts."""
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.max_at: float | None = None
        self.histogram = [0] * (len(BUCKETS_MS) + 1)

    def _tick(self) -> None:
        due = self._clock.due
        if due is None:
            return
        now = self._clock.seconds()
        self.record(max(0.0, now - due), now)

    def record(self, lag: float, at: float) -> None:
        """Account one measured lateness of ``lag`` seconds observed at ``at``."""
        self.count += 1
        self.total += lag
        if lag > self.max:
            self.max = lag
            self.max_at = at
        lag_ms = lag * 1000
        bucket = next((i for i, bound in enumerate(BUCKETS_MS) if lag_ms <= bound), len(BUCKETS_MS))
        self.histogram[bucket] += 1
        if lag >= self.warn_after:
            self.log.warn(
                "the reactor was blocked for {lag:.2f} s",
                lag=lag,
                event="reactor.lag",
            )

    def snapshot(self) -> dict[str, Any]:
        """The figures of the current period, for the job summary."""
        labels = [f"<={bound}" for bound in BUCKETS_MS] + [f">{BUCKETS_MS[-1]}"]
        return {
            "reactor_lag_ms_max": round(self.max * 1000, 1),
            "reactor_lag_ms_mean": round(self.total / self.count * 1000, 2) if self.count else 0.0,
            "reactor_lag_samples": self.count,
            "reactor_lag_max_at": self.max_at,
            "reactor_lag_ms_histogram": dict(zip(labels, self.histogram, strict=True)),
        }

    def _broken(self, failure: Failure) -> None:
        self.log.failure("the reactor lag probe stopped", failure, event="reactor.lag_probe_error")
