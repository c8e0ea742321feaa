"""The prefetch buffer: event ranges fetched ahead so a payload worker never waits on the server.

Requests are never repeated blindly (``acquire_event_ranges`` is not idempotent: a
reply that was lost still gave its ranges to the job); at most ``max_in_flight`` are
out at once.  How many ranges a request asks for follows the demand: the workers'
pace (the time a worker takes between receiving ranges and asking again, which the
feeder reports with ``note_pace``) and the consumption measured, over a few server
round trips, between ``min_request`` and ``max_request``.  Pace, not consumption
alone, sizes the requests: a starved worker consumes only what arrives, so the
consumption of a starved payload says nothing of what it could take.  A small
buffer matters: every range held by the pilot is lost work if the pilot dies, so it
holds about what the next round trips will use, not the whole task.

The server saying "no more" (an empty list) ends the supply.  A failed request is
retried on the clock with growing delays; after ``max_failures`` in a row the supply
ends with the error, which the job reports.  ``stop`` ends it at once: waiting workers
get None ("No more events") and the buffered ranges, never handed out, are returned
so the job can report them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.eventservice.ranges import EventRange, EventRangeError, parse_event_ranges
from pilot.logs import pilot_observer

log = Logger(observer=pilot_observer)

#: Asks the server for up to ``n`` ranges; the range objects as sent.
Fetch = Callable[[int], Awaitable[Sequence[Mapping[str, Any]]]]

#: Seconds between attempts after a failed request (the last one repeats).
RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0)

#: The shortest time per range a pace sample may claim (seconds).
MIN_PACE = 1e-3

#: Round trips of consumption the buffer aims to hold.
ROUND_TRIPS_AHEAD = 3.0


class EventRangeRepeated(Exception):
    """A reply holding only ranges already received: counted as a failed request."""


class RangeSupply:
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Fetch,
        *,
        min_request: int = 8,
        max_request: int = 1000,
        max_in_flight: int = 1,
        ahead: bool = True,
        max_failures: int = 5,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self._clock = clock
        self._fetch = fetch
        self.min_request = max(1, min_request)
        self.max_request = max(self.min_request, max_request)
        self._max_failures = max_failures
        self._retry_delays = tuple(retry_delays) or (0.0,)
        self._buffer: deque[EventRange] = deque()
        self._waiters: deque[tuple[Deferred[list[EventRange] | None], int, float]] = deque()
        self.max_in_flight = max(1, max_in_flight)
        #: Fetch ahead of demand; without, a request goes only for a worker that waits
        #: (HPO: a point fetched ahead would be handed back unevaluated).
        self.ahead = ahead
        self._in_flight = 0
        self._asked = 0  # ranges asked for by the requests in flight
        self._pace = 0.0  # seconds a worker spends per range, smoothed
        self._pace_workers = 0
        self._settled: list[Deferred[None]] = []
        self._late: list[EventRange] = []
        self.stopped = False
        self._no_more = False
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._rate = 0.0  # ranges taken per second, smoothed
        self._round_trip = 0.0  # seconds, smoothed
        self._taken_since = 0
        self._since = clock.seconds()
        self.ended = False
        #: Why the supply ended early (a server failure, a bad range), if it did.
        self.error: PilotError | None = None
        self.requests = 0
        self.received = 0
        self.taken = 0
        #: Seconds workers spent waiting for a range, summed over workers.
        self.wait_seconds = 0.0
        self._seen: set[str] = set()
        self._primed: list[Deferred[None]] = []
        self._priming = False

    @property
    def level(self) -> int:
        return len(self._buffer)

    # -- the workers' side -------------------------------------------------------------

    def take(self, count: int = 1) -> Deferred[list[EventRange] | None]:
        """Up to ``count`` ranges (at least one), or None once the supply has ended."""
        if self._buffer and not self._waiters:
            ranges = self._pop(count)
            self._refill()
            return succeed(ranges)
        if self.ended:
            return succeed(None)
        waiter: Deferred[list[EventRange] | None] = Deferred(self._cancel_waiter)
        self._waiters.append((waiter, count, self._clock.seconds()))
        self._refill()
        return waiter

    def note_pace(self, seconds_per_range: float, workers: int) -> None:
        """A worker took ``seconds_per_range`` per range; ``workers`` are asking for ranges."""
        # a worker asking again at once (its range failed at once) says little about its pace
        seconds_per_range = max(seconds_per_range, MIN_PACE)
        self._pace = seconds_per_range if self._pace == 0 else 0.7 * self._pace + 0.3 * seconds_per_range
        self._pace_workers = workers
        self._refill()

    def stop(self, reason: str) -> list[EventRange]:
        """End the supply now; the ranges fetched but never handed out.

        A reply still in flight may bring more: ``settled`` waits for it and ``late``
        returns what it brought, so those ranges can be reported too.
        """
        if not self.stopped:
            log.info("event ranges: supply stopped: {reason}", reason=reason, event="es.supply_stop")
        self.stopped = True
        self._end()
        left = list(self._buffer)
        self._buffer.clear()
        return left

    def late(self) -> list[EventRange]:
        """Ranges that arrived after ``stop`` (never handed out), once."""
        late, self._late = self._late, []
        return late

    async def settled(self) -> None:
        """Wait until no request is in flight."""
        while self._in_flight:
            done: Deferred[None] = Deferred()
            self._settled.append(done)
            await done

    async def prime(self) -> None:
        """Fetch the first ranges (before the payload starts) and wait for the answer."""
        self._priming = True
        try:
            self._refill()
            while self._in_flight or self._retry is not None:
                done: Deferred[None] = Deferred()
                self._primed.append(done)
                await done
        finally:
            self._priming = False

    # -- fetching ---------------------------------------------------------------------

    def _pop(self, count: int) -> list[EventRange]:
        ranges = [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))]
        self.taken += len(ranges)
        self._taken_since += len(ranges)
        return ranges

    def _wanted(self) -> int:
        demand = self._rate
        if self._pace > 0 and self._pace_workers:
            demand = max(demand, self._pace_workers / self._pace)
        appetite = demand * max(self._round_trip, 0.001) * ROUND_TRIPS_AHEAD
        waiting = sum(count for _, count, _ in self._waiters)
        return max(self.min_request, math.ceil(appetite), waiting)

    def _refill(self) -> None:
        if self.ended or self._no_more or self._retry is not None or self._in_flight >= self.max_in_flight:
            return
        if not self.ahead and not (self._waiters or self._priming):
            return
        wanted = self._wanted()
        have = self.level + self._asked
        # prime asks even when a request of one range would be "enough" of an empty buffer
        starving = (bool(self._waiters) or (self._priming and not self._buffer)) and self._in_flight == 0
        if not starving and have >= wanted // 2:
            return
        n = min(self.max_request, max(self.min_request, wanted - have))
        self._in_flight += 1
        self._asked += n
        self.requests += 1
        started = self._clock.seconds()
        fetched = Deferred.fromCoroutine(self._fetch_parsed(n))
        fetched.addCallbacks(self._arrived, self._failed, callbackArgs=(started, n), errbackArgs=(n,))

    async def _fetch_parsed(self, n: int) -> tuple[EventRange, ...]:
        return parse_event_ranges(await self._fetch(n))

    def _arrived(self, ranges: tuple[EventRange, ...], started: float, asked: int) -> None:
        self._request_ended(asked)
        try:
            self._reply(ranges, started)
        finally:
            self._release_settled()  # after the reply is taken in: ``late`` holds its ranges

    def _reply(self, ranges: tuple[EventRange, ...], started: float) -> None:
        self._failures = 0
        now = self._clock.seconds()
        self._learn(now, now - started)
        fresh = [r for r in ranges if r.range_id not in self._seen]
        if len(fresh) != len(ranges):
            log.warn(
                "event ranges: the server sent {n} range(s) it had sent before; ignored",
                n=len(ranges) - len(fresh),
                event="es.duplicate_ranges",
            )
        self._seen.update(r.range_id for r in fresh)
        self.received += len(fresh)
        if self.stopped:
            self._late.extend(fresh)
            return
        if not ranges:
            log.info("event ranges: the server has no more", event="es.no_more")
            self._no_more = True
        if self._no_more and not self._in_flight:
            self._buffer.extend(fresh)
            self._end()  # waiters get the buffer first, then None
            return
        if not ranges:
            return
        if not fresh:
            self._failure(Failure(EventRangeRepeated("the server sent only ranges it had sent before")))
            return
        self._buffer.extend(fresh)
        self._serve()
        self._release_primed()
        self._refill()

    def _request_ended(self, asked: int) -> None:
        self._in_flight -= 1
        self._asked -= asked

    def _release_settled(self) -> None:
        if not self._in_flight:
            settled, self._settled = self._settled, []
            for done in settled:
                done.callback(None)

    def _failed(self, failure: Any, asked: int) -> None:
        self._request_ended(asked)
        self._failure(failure)
        self._release_settled()

    def _failure(self, failure: Any) -> None:
        if self.stopped:
            return
        if failure.check(CancelledError):
            self._end()
            return
        error = failure.value
        if isinstance(error, EventRangeError):
            self.error = PilotError(ErrorCode.ESFATAL, f"bad event ranges from the server: {error}")
            self._end()
            return
        self._failures += 1
        if self._failures >= self._max_failures:
            self.error = PilotError(
                ErrorCode.ESRECOVERABLE,
                f"no event ranges after {self._failures} failed requests: {error}",
            )
            log.error("event ranges: giving up: {error}", error=str(error), event="es.supply_failed")
            self._end()
            return
        if self._no_more:
            if not self._in_flight:
                self._end()  # the server said it has no more: nothing to retry
            return
        if self._retry is not None:
            return  # another request failed too: one retry is enough
        delay = self._retry_delays[min(self._failures, len(self._retry_delays)) - 1]
        log.warn(
            "event ranges: request failed ({error}); again in {delay} s",
            error=str(error),
            delay=delay,
            event="es.request_failed",
        )
        self._retry = self._clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._refill()

    def _learn(self, now: float, round_trip: float) -> None:
        """Smooth the round trip and the consumption rate, which size the next request."""
        self._round_trip = round_trip if self.requests <= 1 else 0.7 * self._round_trip + 0.3 * round_trip
        elapsed = now - self._since
        if elapsed > 0:
            rate = self._taken_since / elapsed
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
        self._taken_since = 0
        self._since = now

    def _serve(self) -> None:
        now = self._clock.seconds()
        while self._waiters and self._buffer:
            waiter, count, since = self._waiters.popleft()
            self.wait_seconds += now - since
            waiter.callback(self._pop(count))

    def _end(self) -> None:
        self.ended = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        now = self._clock.seconds()
        while self._waiters and self._buffer:
            self._serve()
        waiters, self._waiters = self._waiters, deque()
        for waiter, _, since in waiters:
            self.wait_seconds += now - since
            waiter.callback(None)
        self._release_primed()

    def _release_primed(self) -> None:
        primed, self._primed = self._primed, []
        for done in primed:
            done.callback(None)

    def _cancel_waiter(self, waiter: Deferred[list[EventRange] | None]) -> None:
        self._waiters = deque(w for w in self._waiters if w[0] is not waiter)
