"""Range statuses to the server: in order, coalesced, each range once.

Failed ranges are queued as version-0 statuses, archives of finished ranges as
version-1 chunks; whatever is queued when the previous report returns goes out in the
next call (all failures in one call, all chunks in another), so a slow server makes
fewer, larger reports instead of a growing backlog.  One report is in flight at a
time, which keeps the order of the server's view the order of events.

A report that failed in transport is sent again after a delay, on the clock, until
``flush``'s deadline: the source guarantees that a failed report was not committed
(``IEventSource.update_event_ranges``), so resending cannot report a range twice.  A
report the server took only in part (``RangesNotRecorded``) counts its settled ranges
as for a reply, and only the others are sent again, after the same delay.  A range the
server refused (``False`` in its ``Returns``) is not sent again.  A command in the
reply (``tobekilled``, ``softkill``) goes to ``on_command``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.server.events import (
    ArchiveChunk,
    EventRangeUpdate,
    EventUpdateResult,
    RangesNotRecorded,
    RangeStatus,
)

log = Logger(observer=pilot_observer)

#: Sends one report (``IEventSource.update_event_ranges``).
Send = Callable[[EventRangeUpdate], Awaitable[EventUpdateResult]]

#: Seconds before a failed report is sent again (the last one repeats).
RESEND_DELAYS = (1.0, 3.0, 10.0, 30.0, 60.0)


class RangeReporter:
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        panda_id: int,
        *,
        on_command: Callable[[str], None] = lambda command: None,
        resend_delays: Sequence[float] = RESEND_DELAYS,
    ) -> None:
        self._clock = clock
        self._send = send
        self._panda_id = panda_id
        self._on_command = on_command
        self._delays = tuple(resend_delays) or (1.0,)
        self._statuses: list[RangeStatus] = []
        self._chunks: list[ArchiveChunk] = []
        self._busy = False
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._idle: list[Deferred[None]] = []
        self._queued_ids: set[str] = set()
        self._ever_queued: set[str] = set()
        self._stopped = False
        self.reported_finished = 0
        self.reported_failed = 0
        self.refused = 0
        self.calls = 0
        self.failed_calls = 0
        self.how: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """Ranges queued and not yet acknowledged."""
        return len(self._queued_ids)

    def failed(self, statuses: Sequence[RangeStatus]) -> None:
        self._statuses.extend(self._new(statuses))
        self._kick()

    def finished(self, chunk: ArchiveChunk) -> None:
        ranges = tuple(self._new(chunk.ranges))
        if ranges:
            self._chunks.append(chunk if len(ranges) == len(chunk.ranges) else _with_ranges(chunk, ranges))
        self._kick()

    def _new(self, statuses: Sequence[RangeStatus]) -> list[RangeStatus]:
        fresh = []
        for status in statuses:  # once ever, not only while queued: "each range once"
            if status.range_id not in self._ever_queued:
                self._ever_queued.add(status.range_id)
                fresh.append(status)
        if len(fresh) != len(statuses):
            log.error("event ranges: a range was queued for reporting twice (ignored)", event="es.twice")
        self._queued_ids.update(s.range_id for s in fresh)
        return fresh

    async def flush(self, deadline: float) -> None:
        """Wait until every queued report is acknowledged, or ``deadline`` (clock seconds) passes."""
        while self._queued_ids and self._clock.seconds() < deadline:
            if self._retry is not None and self._retry.active():
                # a resend waits on its delay: bring it forward if the deadline is sooner
                if self._retry.getTime() > deadline:
                    self._retry.reset(max(0.0, deadline - self._clock.seconds()))
            idle: Deferred[None] = Deferred()
            self._idle.append(idle)
            timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), _fire, idle)
            try:
                await idle
            finally:
                if timer.active():
                    timer.cancel()

    def stop(self) -> None:
        """Send nothing more (the job is over)."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._statuses.clear()
        self._chunks.clear()
        self._wake()

    # -- sending ---------------------------------------------------------------------

    def _kick(self) -> None:
        if self._stopped or self._busy or (self._retry is not None and self._retry.active()):
            return
        update = self._next_update()
        if update is None:
            self._wake()
            return
        self._busy = True
        self.calls += 1
        sent = Deferred.fromCoroutine(self._deliver(update))
        sent.addCallbacks(self._delivered, self._not_delivered, callbackArgs=(update,), errbackArgs=(update,))

    def _next_update(self) -> EventRangeUpdate | None:
        if self._statuses:
            statuses, self._statuses = tuple(self._statuses), []
            return EventRangeUpdate(self._panda_id, statuses=statuses)
        if self._chunks:
            chunks, self._chunks = tuple(self._chunks), []
            return EventRangeUpdate(self._panda_id, chunks=chunks)
        return None

    async def _deliver(self, update: EventRangeUpdate) -> EventUpdateResult:
        return await self._send(update)

    def _delivered(self, result: EventUpdateResult, update: EventRangeUpdate) -> None:
        self._busy = False
        self._failures = 0
        self._settle(result, update)
        self._kick()

    def _settle(self, result: EventUpdateResult, update: EventRangeUpdate) -> None:
        """Count ``update``'s ranges as acknowledged by ``result``, and pass its command on."""
        self.how[result.how] = self.how.get(result.how, 0) + 1
        refused = [i for i in update.range_ids if result.accepted.get(i) is False]
        if refused:
            self.refused += len(refused)
            log.warn(
                "event ranges: the server refused {n} range status(es), e.g. {example}",
                n=len(refused),
                example=refused[0],
                event="es.refused",
            )
        accepted = len(update.range_ids) - len(refused)
        if update.version == 1:
            self.reported_finished += accepted
        else:
            self.reported_failed += accepted
        self._queued_ids.difference_update(update.range_ids)
        if result.command:
            self._on_command(result.command)

    def _not_delivered(self, failure: object, update: EventRangeUpdate) -> None:
        self._busy = False
        error = getattr(failure, "value", failure)
        if isinstance(error, CancelledError):
            self._queued_ids.difference_update(update.range_ids)
            self._wake()
            return
        if isinstance(error, RangesNotRecorded):  # the settled ranges never go again
            settled = [i for i in update.range_ids if i in error.settled.accepted]
            if settled:
                self._settle(error.settled, update.only(settled))
            update = update.only([i for i in update.range_ids if i not in error.settled.accepted])
            if not update.range_ids:
                self._failures = 0
                self._kick()
                return
        self.failed_calls += 1
        self._failures += 1
        if self._stopped:  # the report in flight when the job ended: not sent again
            self._wake()
            return
        # put it back in front, so the order holds
        if update.version == 1:
            self._chunks[:0] = list(update.chunks)
        else:
            self._statuses[:0] = list(update.statuses)
        delay = self._delays[min(self._failures, len(self._delays)) - 1]
        log.warn(
            "event ranges: report of {n} range(s) failed ({error}); again in {delay} s",
            n=len(update.range_ids),
            error=str(error),
            delay=delay,
            event="es.report_failed",
        )
        self._retry = self._clock.callLater(delay, self._resend)
        self._wake()

    def _resend(self) -> None:
        self._retry = None
        self._kick()

    def _wake(self) -> None:
        idle, self._idle = self._idle, []
        for waiter in idle:
            if not waiter.called:
                waiter.callback(None)


def _fire(waiter: Deferred[None]) -> None:
    if not waiter.called:
        waiter.callback(None)


def _with_ranges(chunk: ArchiveChunk, ranges: tuple[RangeStatus, ...]) -> ArchiveChunk:
    return ArchiveChunk(
        lfn=chunk.lfn,
        fsize=chunk.fsize,
        adler32=chunk.adler32,
        num_events=chunk.num_events,
        ranges=ranges,
        objstore_id=chunk.objstore_id,
        path_convention=chunk.path_convention,
        url=chunk.url,
    )
