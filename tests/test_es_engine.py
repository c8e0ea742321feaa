"""``pilot.eventservice.engine``: the ledger of an event-service job's ranges, on a Clock.

The event source is in memory (``MemorySource``): every call returns a Deferred the
test fires by hand, so round trips, failures and silences are the test's to choose.
The thread runner is synchronous; archives are real tar files in a temporary work
directory.  ``MemorySource`` and ``make_range`` serve the other ``test_es_*`` modules
too.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.eventservice.batches import StoredArchive
from pilot.eventservice.engine import EventJob, EventService, EventServiceSettings
from pilot.eventservice.messages import RangeDone, RangeFailed
from pilot.interfaces import IEventSource
from pilot.server.errors import ServerError
from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult

T = TypeVar("T")


def make_range(number: int, *, events: int = 1) -> dict[str, object]:
    """A range as the server sends it."""
    return {
        "eventRangeID": f"12164365-3616045203-10980024041-{number}-8",
        "startEvent": number * 10,
        "lastEvent": number * 10 + events - 1,
        "LFN": "EVNT.12458444._000048.pool.root.1",
        "GUID": "63A015D3-789D-E74D-BAA9-9F95DB068EE9",
        "scope": "mc15_13TeV",
    }


def in_thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """The thread runner, run at once on the calling thread."""
    return maybeDeferred(f, *args, **kwargs)


@implementer(IEventSource)
class MemorySource:
    """An event source whose answers the test gives by hand, oldest call first."""

    def __init__(self, *, events: int = 1) -> None:
        self.events = events
        self.requests: list[EventRangeRequest] = []
        self.in_flight_acquires: list[Deferred[list[dict[str, object]]]] = []
        self.updates: list[EventRangeUpdate] = []
        self.in_flight_updates: list[tuple[EventRangeUpdate, Deferred[EventUpdateResult]]] = []
        #: Statuses the source acknowledged, in order: (range id, status, error code).
        self.committed: list[tuple[str, str, int | None]] = []
        self._next = 1000

    # -- acquire_event_ranges --

    def acquire_event_ranges(self, request: EventRangeRequest) -> Deferred[list[dict[str, object]]]:
        self.requests.append(request)
        d: Deferred[list[dict[str, object]]] = Deferred()
        self.in_flight_acquires.append(d)
        return d

    def reply(self, items: list[dict[str, object]]) -> None:
        self.in_flight_acquires.pop(0).callback(items)

    def give(self, n: int) -> list[str]:
        """Answer the oldest request with ``n`` new ranges; their ids."""
        items = [make_range(self._next + i, events=self.events) for i in range(n)]
        self._next += n
        self.reply(items)
        return [str(item["eventRangeID"]) for item in items]

    def fail_acquire(self, error: Exception) -> None:
        self.in_flight_acquires.pop(0).errback(error)

    # -- update_event_ranges --

    def update_event_ranges(self, update: EventRangeUpdate) -> Deferred[EventUpdateResult]:
        self.updates.append(update)
        d: Deferred[EventUpdateResult] = Deferred()
        self.in_flight_updates.append((update, d))
        return d

    def answer(
        self, *, refuse: Iterable[str] = (), command: str | None = None, how: str = "bulk"
    ) -> EventRangeUpdate:
        """Acknowledge the oldest report (refusing the ids in ``refuse``); the report."""
        update, d = self.in_flight_updates.pop(0)
        refused = set(refuse)
        for status in update.statuses or [r for chunk in update.chunks for r in chunk.ranges]:
            if status.range_id not in refused:
                self.committed.append((status.range_id, status.status, status.error_code))
        d.callback(EventUpdateResult({i: i not in refused for i in update.range_ids}, command, how))
        return update

    def answer_all(self) -> None:
        while self.in_flight_updates:
            self.answer()

    def fail_update(self, error: Exception) -> EventRangeUpdate:
        update, d = self.in_flight_updates.pop(0)
        d.errback(error)
        return update


class Store:
    """The object store: keeps a copy of each archive; holds its answer when ``hold`` is set."""

    def __init__(self, remote: Path) -> None:
        self.remote = remote
        self.hold = False
        self.fail: Exception | None = None
        self.calls: list[tuple[Path, str, int, str]] = []
        self.held: list[Deferred[StoredArchive]] = []

    def __call__(self, path: Path, lfn: str, size: int, adler32: str) -> Deferred[StoredArchive]:
        self.calls.append((path, lfn, size, adler32))
        if self.fail is not None:
            return fail(self.fail)
        (self.remote / lfn).write_bytes(path.read_bytes())
        if self.hold:
            d: Deferred[StoredArchive] = Deferred()
            self.held.append(d)
            return d
        return succeed(StoredArchive(f"s3://bucket/{lfn}", 42))


class EngineCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = MemorySource()
        base = Path(self.mktemp()).absolute()
        self.workdir = base / "work"
        self.workdir.mkdir(parents=True)
        (base / "remote").mkdir()
        self.store = Store(base / "remote")
        self.commands: list[str] = []

    def service(self, **settings: Any) -> EventService:
        return EventService(
            self.clock,
            in_thread,
            self.workdir,
            self.source,
            self.store,
            EventJob(panda_id=4242, jobset_id=17, task_id=12164365, core_count=8),
            EventServiceSettings(**{"min_fetch": 4, "batch_ranges": 2, "zip_time_gap": 60.0, **settings}),
            on_command=self.commands.append,
        )

    def started(self, n: int = 4, **settings: Any) -> tuple[EventService, list[str]]:
        service = self.service(**settings)
        starting = Deferred.fromCoroutine(service.start())
        ids = self.source.give(n)
        self.successResultOf(starting)
        return service, ids

    def hand(self, service: EventService, worker: str) -> str:
        """One range for ``worker``: its id."""
        ranges = self.successResultOf(service.next_ranges(worker))
        assert ranges is not None and len(ranges) == 1
        return str(ranges[0]["eventRangeID"])

    def done(self, service: EventService, worker: str, rid: str, *, data: bytes = b"hits") -> Path:
        output = self.workdir / f"out.{rid}.root"
        output.write_bytes(data)
        service.range_done(worker, RangeDone(rid, str(output), cpu_s=1.25, wall_s=2.0))
        return output

    def statuses(self) -> list[tuple[str, str]]:
        """Every range status sent to the source, in order (resends included)."""
        return [
            (status.range_id, status.status)
            for update in self.source.updates
            for status in (update.statuses or [r for chunk in update.chunks for r in chunk.ranges])
        ]


class StartTests(EngineCase):
    def test_the_fake_source_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IEventSource, self.source))

    def test_start_asks_for_the_job_ranges(self) -> None:
        service = self.service()
        starting = Deferred.fromCoroutine(service.start())
        self.assertNoResult(starting)
        self.assertEqual(self.source.requests, [EventRangeRequest(4242, 17, 12164365, 4)])
        self.source.give(4)
        self.successResultOf(starting)

    def test_start_raises_esnoevents_when_the_first_reply_is_empty(self) -> None:
        service = self.service()
        starting = Deferred.fromCoroutine(service.start())
        self.source.give(0)
        failure = self.failureResultOf(starting, PilotError)
        self.assertEqual(failure.value.code, ErrorCode.ESNOEVENTS)

    def test_start_raises_the_supply_error(self) -> None:
        service = self.service()
        starting = Deferred.fromCoroutine(service.start())
        self.source.reply([{"eventRangeID": "no event numbers"}])
        failure = self.failureResultOf(starting, PilotError)
        self.assertEqual(failure.value.code, ErrorCode.ESFATAL)


class LedgerTests(EngineCase):
    def test_a_range_finished_twice_or_failed_after_finished_is_reported_once(self) -> None:
        service, ids = self.started(batch_ranges=1)
        rid = self.hand(service, "worker-1")
        self.assertEqual(rid, ids[0])
        self.done(service, "worker-1", rid)
        # batch of one: archived, stored and reported at once
        self.assertEqual(self.statuses(), [(rid, "finished")])
        self.done(service, "worker-1", rid)
        service.range_failed("worker-1", RangeFailed(rid, "ERR_ATHENAMP_PROCESS", "late"))
        self.assertEqual(service.unexpected, 2)
        self.assertEqual(service.finished_payload, 1)
        self.assertEqual(service.failed_payload, 0)
        self.source.answer_all()
        self.assertEqual(self.statuses(), [(rid, "finished")])
        self.assertEqual(len(self.store.calls), 1)

    def test_a_range_never_handed_out_is_unexpected(self) -> None:
        service, ids = self.started()
        service.range_failed("worker-1", RangeFailed(ids[0], "ERR_X", "not mine"))
        self.assertEqual(service.unexpected, 1)
        self.assertEqual(self.source.updates, [])

    def test_a_failed_range_is_reported_with_the_payload_code(self) -> None:
        service, _ = self.started()
        rid = self.hand(service, "worker-1")
        service.range_failed("worker-1", RangeFailed(rid, "ERR_ATHENAMP_PROCESS", "segfault"))
        (update,) = self.source.updates
        (status,) = update.statuses
        self.assertEqual(status.range_id, rid)
        self.assertEqual(status.status, "failed")
        self.assertEqual(status.error_code, int(ErrorCode.UNKNOWNPAYLOADFAILURE))
        self.assertEqual(status.error_diag, "ERR_ATHENAMP_PROCESS: segfault")
        self.assertEqual(status.core_count, 8)

    def test_worker_gone_fails_the_ranges_that_worker_held_only(self) -> None:
        service, _ = self.started(batch_ranges=10)
        mine = [self.hand(service, "worker-1"), self.hand(service, "worker-1")]
        theirs = self.hand(service, "worker-2")
        service.worker_gone("worker-1")
        (update,) = self.source.updates
        self.assertEqual([s.range_id for s in update.statuses], mine)
        self.assertEqual({s.error_code for s in update.statuses}, {int(ErrorCode.ESRECOVERABLE)})
        # the other worker's range goes on; the gone worker's later messages are unexpected
        self.done(service, "worker-2", theirs)
        self.done(service, "worker-1", mine[0])
        self.assertEqual(service.unexpected, 1)
        self.assertEqual(service.finished_payload, 1)
        service.worker_gone("worker-3")  # held nothing: nothing reported
        self.assertEqual(len(self.source.updates), 1)

    def test_stop_handing_out_answers_none_and_fails_the_buffered_ranges(self) -> None:
        service, ids = self.started()
        held = self.hand(service, "worker-1")
        service.stop_handing_out("the server sent softkill")
        self.assertIsNone(self.successResultOf(service.next_ranges("worker-2")))
        (update,) = self.source.updates
        self.assertEqual([s.range_id for s in update.statuses], ids[1:])
        self.assertTrue(all(s.error_diag and "softkill" in s.error_diag for s in update.statuses))
        # the range in the worker's hand goes on
        self.done(service, "worker-1", held)
        self.assertEqual(service.unexpected, 0)
        service.stop_handing_out("twice")
        self.assertEqual(len(self.source.updates), 1)

    def test_stop_handing_out_answers_a_waiting_worker_none(self) -> None:
        service, ids = self.started(n=1, min_fetch=1)
        self.assertEqual(self.hand(service, "worker-1"), ids[0])
        waiting = service.next_ranges("worker-2")
        self.assertNoResult(waiting)
        service.stop_handing_out("the pilot's time is up")
        self.assertIsNone(self.successResultOf(waiting))

    def test_ranges_arriving_after_the_stop_are_reported_failed(self) -> None:
        """A request in flight when handing out stops: its ranges belong to the job all the same."""
        service, ids = self.started(n=4)
        for _ in range(3):
            self.hand(service, "worker-1")
        self.assertEqual(len(self.source.in_flight_acquires), 1)  # refilling below half
        service.stop_handing_out("softkill")
        late = self.source.give(4)
        self.source.answer_all()
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 100, "the payload ended"))
        self.source.answer_all()
        self.successResultOf(finishing)
        reported = {rid for rid, _, _ in self.source.committed}
        self.assertEqual(reported, set(ids) | set(late))
        summary = service.summary()
        self.assertEqual(summary["ranges_received"], 8)
        self.assertEqual(summary["ranges_failed"], 8)
        self.assertEqual(summary["ranges_unreported"], 0)


class FinishTests(EngineCase):
    def test_finish_fails_ranges_in_hand_and_flushes_the_last_batch(self) -> None:
        service, ids = self.started(batch_ranges=10)
        finished = [self.hand(service, "worker-1"), self.hand(service, "worker-2")]
        outputs = [self.done(service, "worker-1", finished[0], data=b"A" * 100)]
        outputs.append(self.done(service, "worker-2", finished[1], data=b"B" * 200))
        in_hand = self.hand(service, "worker-1")
        self.assertEqual(self.store.calls, [])  # the batch waits for more or for its age
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "the payload ended"))
        self.assertNoResult(finishing)
        (stored,) = self.store.calls
        self.assertFalse(any(o.exists() for o in outputs))
        self.assertFalse(stored[0].exists())  # removed once stored
        with tarfile.open(self.store.remote / stored[1]) as tar:
            self.assertEqual(
                {m.name: tar.extractfile(m).read() for m in tar.getmembers()},  # type: ignore[union-attr]
                {outputs[0].name: b"A" * 100, outputs[1].name: b"B" * 200},
            )
        remote = (self.store.remote / stored[1]).read_bytes()
        self.assertEqual((stored[2], stored[3]), (len(remote), f"{zlib.adler32(remote):08x}"))
        self.assertNoResult(finishing)
        self.source.give(0)  # the refill that was out when the payload ended
        self.source.answer_all()
        self.successResultOf(finishing)
        committed = {rid: (status, code) for rid, status, code in self.source.committed}
        self.assertEqual(committed[finished[0]], ("finished", None))
        self.assertEqual(committed[finished[1]], ("finished", None))
        self.assertEqual(committed[in_hand], ("failed", int(ErrorCode.ESRECOVERABLE)))
        self.assertEqual(committed[ids[3]], ("failed", int(ErrorCode.ESRECOVERABLE)))
        self.assertEqual(len(committed), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.successResultOf(service.next_ranges("worker-1")))

    def test_finish_waits_for_reports_until_the_deadline(self) -> None:
        service, _ = self.started(batch_ranges=10)
        rid = self.hand(service, "worker-1")
        self.done(service, "worker-1", rid)
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "aborted"))
        self.assertEqual(len(self.source.in_flight_updates), 1)  # the failures; the chunk waits its turn
        self.clock.advance(29.9)
        self.assertNoResult(finishing)
        self.clock.advance(0.1)
        self.successResultOf(finishing)
        self.assertEqual(service.summary()["ranges_unreported"], 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finish_gives_up_on_a_store_that_never_answers(self) -> None:
        service, _ = self.started(batch_ranges=10)
        self.store.hold = True
        rid = self.hand(service, "worker-1")
        self.done(service, "worker-1", rid)
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "the payload ended"))
        self.source.answer_all()
        self.assertNoResult(finishing)
        self.clock.advance(30)
        self.successResultOf(finishing)
        self.assertEqual(service.reporter.reported_finished, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_range_request_unanswered_at_the_end_does_not_hold_the_last_batch(self) -> None:
        """The last archive is stored and reported while a range request hangs; finish ends at the deadline."""
        service, ids = self.started(batch_ranges=10)
        rids = [self.hand(service, "worker-1") for _ in range(3)]
        self.assertEqual(len(self.source.in_flight_acquires), 1)  # refilling, never answered
        for rid in rids:
            self.done(service, "worker-1", rid)
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "the payload ended"))
        self.assertEqual(len(self.store.calls), 1)
        self.source.answer_all()
        self.source.answer_all()
        self.assertEqual(service.reporter.reported_finished, 3)
        self.assertEqual(service.reporter.reported_failed, 1)  # the buffered one
        self.clock.advance(30)
        self.successResultOf(finishing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_late_ranges_are_reported_when_the_request_answers_before_the_deadline(self) -> None:
        service, ids = self.started(batch_ranges=10)
        for _ in range(3):
            self.hand(service, "worker-1")
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "the payload ended"))
        self.clock.advance(5)
        late = self.source.give(4)
        for _ in range(3):
            self.source.answer_all()
        self.successResultOf(finishing)
        committed = {rid: status for rid, status, _ in self.source.committed}
        self.assertEqual(set(committed), set(ids) | set(late))
        self.assertEqual(set(committed.values()), {"failed"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finish_is_bounded_when_batches_wait_behind_a_store_that_never_answers(self) -> None:
        service, _ = self.started(batch_ranges=1, max_batches_in_flight=1)
        self.store.hold = True
        first, second = self.hand(service, "worker-1"), self.hand(service, "worker-2")
        self.done(service, "worker-1", first)
        self.done(service, "worker-2", second)  # waits: one batch in flight at most
        self.assertEqual(len(self.store.calls), 1)
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 30, "the payload ended"))
        self.source.answer_all()
        self.clock.advance(30)
        self.successResultOf(finishing)
        self.assertEqual(len(self.store.calls), 1)  # nothing more stored after the deadline
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_command_in_a_report_reply_reaches_on_command(self) -> None:
        service, _ = self.started()
        rid = self.hand(service, "worker-1")
        service.range_failed("worker-1", RangeFailed(rid, "ERR_X", ""))
        self.source.answer(command="softkill")
        self.assertEqual(self.commands, ["softkill"])


class SummaryTests(EngineCase):
    def test_summary_numbers(self) -> None:
        self.maxDiff = None
        self.source = MemorySource(events=5)
        service, ids = self.started(n=6, batch_ranges=2)
        self.clock.advance(3)
        a, b, c, d = (self.hand(service, w) for w in ("w1", "w2", "w1", "w3"))
        self.done(service, "w1", a, data=b"x" * 10)
        self.done(service, "w2", b, data=b"y" * 20)  # a batch of two: stored, reported
        self.assertEqual(self.source.answer().version, 1)
        service.range_failed("w1", RangeFailed(c, "ERR_ATHENAMP_PROCESS", "crash"))
        service.range_failed("w1", RangeFailed(c, "ERR_ATHENAMP_PROCESS", "crash again"))
        self.source.answer(refuse=[c])
        (stored,) = self.store.calls
        finishing = Deferred.fromCoroutine(service.finish(self.clock.seconds() + 10, "the payload ended"))
        self.source.give(0)  # the request the workers' pace sent
        self.source.answer_all()
        self.successResultOf(finishing)
        self.assertEqual(
            service.summary(),
            {
                "ranges_received": 6,
                "ranges_finished": 2,
                "ranges_failed": 3,  # d in hand, two buffered (c was refused)
                "ranges_failed_by_payload": 1,
                "ranges_refused_by_server": 1,
                "ranges_unreported": 0,
                "events_stored": 10,
                "workers": 3,
                "batches": 1,
                "bytes_stored": stored[2],
                "range_requests": 2,  # the second sent by the workers' pace, answered "no more"
                "report_calls": 4,  # the chunk, c, the buffered two, d
                "report_calls_failed": 0,
                "report_kinds": {"bulk": 4},
                "payload_wait_seconds": 0.0,
                "bad_messages": 0,
                "unexpected_messages": 1,
            },
        )
        self.assertEqual(stored[2], (self.store.remote / stored[1]).stat().st_size)
        self.assertEqual(
            stored[3], f"{zlib.adler32((self.store.remote / stored[1]).read_bytes()) & 0xFFFFFFFF:08x}"
        )

    def test_a_failed_report_is_counted(self) -> None:
        service, _ = self.started()
        rid = self.hand(service, "worker-1")
        service.range_failed("worker-1", RangeFailed(rid, "ERR_X", ""))
        self.source.fail_update(ServerError("503"))
        self.clock.advance(1)
        self.source.answer()
        summary = service.summary()
        self.assertEqual((summary["report_calls"], summary["report_calls_failed"]), (2, 1))
        self.assertEqual(summary["ranges_failed"], 1)
        self.assertEqual([s for s, _, _ in self.source.committed], [rid])
