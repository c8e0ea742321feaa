"""One event-service job's ranges: fetched ahead, handed to workers, archived, stored, reported.

``EventService`` is the channel's ``RangeFeeder`` and the ledger of every range the
job received: each one is handed to one worker, then either finished (its output goes
to the ``Batcher``, which reports it only once its archive is stored) or failed
(reported at once by the ``RangeReporter``).  A range ends in exactly one report:
the ledger forgets a range when it is finished or failed, so a second message about
it (a confused payload) is counted and ignored, never reported.

``start`` fetches the first ranges before the payload starts: a job with no ranges
fails with ESNOEVENTS without running its payload, and a payload that asks at once
finds ranges waiting.  ``stop_handing_out`` (a softkill, the end of the pilot's
time) makes every worker's next request get "No more events"; ``finish`` (after the
payload ended, however it ended) fails what was handed out but not finished and
what was fetched but never handed out, stores the last batch and waits for the
reports, all by a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.eventservice.batches import Batcher, DoneRange, Store
from pilot.eventservice.channel import Ranges
from pilot.eventservice.messages import ChannelMessageError, RangeDone, RangeFailed
from pilot.eventservice.ranges import EventRange
from pilot.eventservice.reporting import RangeReporter
from pilot.eventservice.supply import RangeSupply
from pilot.interfaces import IEventSource
from pilot.logs import pilot_observer
from pilot.server.events import ArchiveChunk, EventRangeRequest, RangeStatus
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)

#: The longest error text sent for a range.
MAX_DIAG = 500


@record(frozen=True)
class EventServiceSettings:
    """How ranges are fetched, handed out and batched (queue and pilot options)."""

    ranges_per_request: int = 1
    min_fetch: int = 8
    max_fetch: int = 1000
    batch_ranges: int = 100
    #: The queue's ``zip_time_gap``: the longest a finished range waits for its archive.
    zip_time_gap: float = 600.0
    max_batches_in_flight: int = 2
    #: Range requests out at once: a second one goes when the first is found too small.
    fetches_in_flight: int = 2
    #: Fetch ahead of the workers' requests (not for HPO points: one at a time).
    prefetch: bool = True


@record(frozen=True)
class EventJob:
    """What the event calls need to know of the job."""

    panda_id: int
    jobset_id: int
    task_id: int | None
    core_count: int = 1


class EventService:
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        workdir: Path,
        source: IEventSource,
        store: Store,
        job: EventJob,
        settings: EventServiceSettings = EventServiceSettings(),  # noqa: B008 - frozen
        *,
        on_command: Callable[[str], None] = lambda command: None,
    ) -> None:
        self._clock = clock
        self._source = source
        self.job = job
        self.settings = settings
        self.supply = RangeSupply(
            clock,
            self._fetch,
            min_request=settings.min_fetch,
            max_request=settings.max_fetch,
            max_in_flight=settings.fetches_in_flight,
            ahead=settings.prefetch,
        )
        self.reporter = RangeReporter(clock, source.update_event_ranges, job.panda_id, on_command=on_command)
        self.batcher = Batcher(
            clock,
            in_thread,
            workdir,
            store,
            on_finished=self._stored,
            on_failed=self._fail_statuses,
            core_count=job.core_count,
            max_ranges=settings.batch_ranges,
            max_age=settings.zip_time_gap,
            max_in_flight=settings.max_batches_in_flight,
        )
        self._handed: dict[str, tuple[str, EventRange]] = {}
        #: When each worker last got ranges, and how many: its pace sizes the requests.
        self._last_answer: dict[str, tuple[float, int]] = {}
        self.handing_out = True
        self.finished_payload = 0
        self.failed_payload = 0
        self.failed_other = 0
        self.unexpected = 0
        self.bad_messages = 0
        self.events_stored = 0
        #: The workers connected now (their number divides the pace into a demand).
        self.workers: set[str] = set()
        self.workers_seen: set[str] = set()

    # -- the server side ----------------------------------------------------------------

    async def _fetch(self, n: int) -> Sequence[Any]:
        job = self.job
        request = EventRangeRequest(job.panda_id, job.jobset_id, job.task_id, n)
        return await self._source.acquire_event_ranges(request)

    async def start(self) -> None:
        """Fetch the first ranges; PilotError if there are none (ESNOEVENTS) or they failed."""
        await self.supply.prime()
        if self.supply.level == 0:
            if self.supply.error is not None:
                raise self.supply.error
            raise PilotError(ErrorCode.ESNOEVENTS, "the server had no event ranges for the job")

    def stop_handing_out(self, reason: str) -> None:
        """Answer every further request "No more events"; what is in the workers' hands goes on."""
        if self.handing_out:
            self.handing_out = False
            self._fail_ranges(self.supply.stop(reason), ErrorCode.ESRECOVERABLE, f"not processed: {reason}")

    async def finish(self, deadline: float, reason: str) -> None:
        """After the payload: fail what it did not finish, store and report the rest by ``deadline``."""
        self.stop_handing_out(reason)
        unfinished = [entry[1] for entry in self._handed.values()]
        self._handed.clear()
        self._fail_ranges(unfinished, ErrorCode.ESRECOVERABLE, f"not finished by the payload: {reason}")
        # the batcher is cancelled at the deadline (a cancelled flush alone would let the
        # batches waiting behind the cancelled ones start)
        late_store = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self.batcher.cancel)
        try:
            await self.batcher.flush()
        finally:
            if late_store.active():
                late_store.cancel()
        if self.batcher.cancelled:
            log.warn("event ranges: the last archives were not stored in time", event="es.flush_late")
        # a range request still out when the supply stopped: its ranges are the job's too
        settling = Deferred.fromCoroutine(self.supply.settled())
        settling.addTimeout(max(0.0, deadline - self._clock.seconds()), self._clock)
        try:
            await settling
        except TimeoutError:
            log.warn("event ranges: a range request was still unanswered at the end", event="es.fetch_late")
        self._fail_ranges(self.supply.late(), ErrorCode.ESRECOVERABLE, f"not processed: {reason}")
        await self.reporter.flush(deadline)
        if self.reporter.pending:
            log.error(
                "event ranges: {n} range status(es) not reported by the deadline",
                n=self.reporter.pending,
                event="es.unreported",
            )
        self.reporter.stop()

    # -- RangeFeeder ----------------------------------------------------------------------

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        self.workers.add(worker)
        self.workers_seen.add(worker)
        last = self._last_answer.pop(worker, None)
        if last is not None:
            self.supply.note_pace((self._clock.seconds() - last[0]) / last[1], len(self.workers))
        if not self.handing_out:
            return succeed(None)
        taking = self.supply.take(self.settings.ranges_per_request)
        return taking.addCallback(self._hand, worker)

    def _hand(self, ranges: list[EventRange] | None, worker: str) -> Ranges | None:
        if ranges is None:
            return None
        if not self.handing_out:  # stopped while this worker waited
            self._fail_ranges(ranges, ErrorCode.ESRECOVERABLE, "not processed: the job stopped")
            return None
        for item in ranges:
            self._handed[item.range_id] = (worker, item)
        self._last_answer[worker] = (self._clock.seconds(), len(ranges))
        return [item.raw for item in ranges]

    def range_done(self, worker: str, message: RangeDone) -> None:
        entry = self._take(worker, message.range_id, "finished")
        if entry is not None:
            self.finished_payload += 1
            self.batcher.add(DoneRange(entry[1], message.output, message.cpu_s, message.wall_s))

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        entry = self._take(worker, message.range_id, "failed")
        if entry is not None:
            self.failed_payload += 1
            diag = f"{message.code}: {message.text}" if message.text else message.code
            self._fail_ranges([entry[1]], ErrorCode.UNKNOWNPAYLOADFAILURE, diag, counted=True)

    def bad_message(self, worker: str, error: ChannelMessageError) -> None:
        self.bad_messages += 1
        log.warn(
            "event ranges: worker {worker} sent a bad message: {error}",
            worker=worker,
            error=str(error)[:MAX_DIAG],
            event="es.bad_message",
        )

    def worker_gone(self, worker: str) -> None:
        self.workers.discard(worker)
        self._last_answer.pop(worker, None)
        lost = [entry[1] for entry in self._handed.values() if entry[0] == worker]
        for item in lost:
            del self._handed[item.range_id]
        if lost:
            log.warn(
                "event ranges: worker {worker} went away with {n} range(s) in hand",
                worker=worker,
                n=len(lost),
                event="es.worker_lost",
            )
            self._fail_ranges(lost, ErrorCode.ESRECOVERABLE, "the payload worker ended before finishing it")

    def _take(self, worker: str, range_id: str, what: str) -> tuple[str, EventRange] | None:
        entry = self._handed.pop(range_id, None)
        if entry is None:
            self.unexpected += 1
            log.warn(
                "event ranges: worker {worker} says {range_id} {what}, but it is not in hand (ignored)",
                worker=worker,
                range_id=range_id[:200],
                what=what,
                event="es.unexpected",
            )
        return entry

    # -- outcomes ---------------------------------------------------------------------------

    def _stored(self, chunk: ArchiveChunk) -> None:
        self.events_stored += chunk.num_events
        self.reporter.finished(chunk)

    def _fail_statuses(self, statuses: Sequence[RangeStatus]) -> None:
        self.failed_other += len(statuses)
        self.reporter.failed(statuses)

    def _fail_ranges(
        self, ranges: Sequence[EventRange], code: ErrorCode, diag: str, *, counted: bool = False
    ) -> None:
        if not ranges:
            return
        if not counted:
            self.failed_other += len(ranges)
        self.reporter.failed(
            [
                RangeStatus(
                    item.range_id,
                    "failed",
                    error_code=int(code),
                    error_diag=diag[:MAX_DIAG],
                    core_count=self.job.core_count,
                )
                for item in ranges
            ]
        )

    def summary(self) -> dict[str, Any]:
        """The job summary's ``event_service`` section."""
        supply, reporter, batcher = self.supply, self.reporter, self.batcher
        return {
            "ranges_received": supply.received,
            "ranges_finished": reporter.reported_finished,
            "ranges_failed": reporter.reported_failed,
            "ranges_failed_by_payload": self.failed_payload,
            "ranges_refused_by_server": reporter.refused,
            "ranges_unreported": reporter.pending,
            "events_stored": self.events_stored,
            "workers": len(self.workers_seen),
            "batches": batcher.batches,
            "bytes_stored": batcher.bytes,
            "range_requests": supply.requests,
            "report_calls": reporter.calls,
            "report_calls_failed": reporter.failed_calls,
            "report_kinds": dict(reporter.how),
            "payload_wait_seconds": round(supply.wait_seconds, 3),
            "bad_messages": self.bad_messages,
            "unexpected_messages": self.unexpected,
        }
