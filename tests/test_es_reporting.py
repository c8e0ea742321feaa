"""``pilot.eventservice.reporting``: range statuses to a hand-fired event source, on a Clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.eventservice.reporting import RangeReporter
from pilot.server.errors import ServerError
from pilot.server.events import ArchiveChunk, EventUpdateResult, RangesNotRecorded, RangeStatus
from tests.test_es_engine import MemorySource


def failed(*ids: str) -> list[RangeStatus]:
    return [RangeStatus(i, "failed", error_code=1224) for i in ids]


def chunk(lfn: str, *ids: str) -> ArchiveChunk:
    return ArchiveChunk(
        lfn=lfn,
        fsize=10240,
        adler32="0badcafe",
        num_events=len(ids),
        ranges=tuple(RangeStatus(i, "finished", objstore_id=42) for i in ids),
        objstore_id=42,
    )


class ReporterCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = MemorySource()
        self.commands: list[str] = []
        self.reporter = RangeReporter(
            self.clock,
            self.source.update_event_ranges,
            4242,
            on_command=self.commands.append,
            resend_delays=(2.0, 5.0),
        )

    def sent(self) -> list[tuple[str, ...]]:
        return [update.range_ids for update in self.source.updates]


class CoalesceTests(ReporterCase):
    def test_failures_queued_during_a_report_go_in_the_next_call(self) -> None:
        self.reporter.failed(failed("a"))
        self.reporter.failed(failed("b"))
        self.reporter.failed(failed("c", "d"))
        self.assertEqual(self.sent(), [("a",)])
        self.source.answer()
        self.assertEqual(self.sent(), [("a",), ("b", "c", "d")])
        self.assertEqual(self.source.updates[1].panda_id, 4242)
        self.assertEqual(self.source.updates[1].version, 0)
        self.source.answer()
        self.assertEqual(len(self.sent()), 2)
        self.assertEqual((self.reporter.reported_failed, self.reporter.pending), (4, 0))

    def test_chunks_go_as_version_1_after_the_failures_queued_with_them(self) -> None:
        self.reporter.failed(failed("a"))
        self.reporter.finished(chunk("EventService_premerge_b.tar", "b", "c"))
        self.reporter.finished(chunk("EventService_premerge_d.tar", "d"))
        self.reporter.failed(failed("e"))
        self.source.answer()
        self.source.answer()
        self.source.answer()
        self.assertEqual(self.sent(), [("a",), ("e",), ("b", "c", "d")])
        update = self.source.updates[2]
        self.assertEqual(update.version, 1)
        self.assertEqual(
            [c.lfn for c in update.chunks], ["EventService_premerge_b.tar", "EventService_premerge_d.tar"]
        )
        self.assertEqual((self.reporter.reported_finished, self.reporter.reported_failed), (3, 2))
        self.assertEqual(self.reporter.calls, 3)

    def test_a_range_queued_twice_is_reported_once(self) -> None:
        self.reporter.failed(failed("a"))
        self.reporter.failed(failed("b", "a"))
        self.reporter.finished(chunk("EventService_premerge_a.tar", "a", "c"))
        self.source.answer_all()
        self.source.answer_all()
        self.source.answer_all()
        self.assertEqual(self.sent(), [("a",), ("b",), ("c",)])
        self.assertEqual(self.source.updates[2].chunks[0].lfn, "EventService_premerge_a.tar")

    def test_a_range_queued_again_after_its_report_is_not_reported_again(self) -> None:
        self.reporter.failed(failed("a"))
        self.source.answer()
        self.reporter.failed(failed("a"))
        self.reporter.finished(chunk("EventService_premerge_a.tar", "a"))
        self.assertEqual(self.sent(), [("a",)])
        self.assertEqual(self.reporter.pending, 0)


class ResendTests(ReporterCase):
    def test_a_failed_report_is_resent_in_front_after_the_delay(self) -> None:
        self.reporter.failed(failed("a", "b"))
        self.reporter.failed(failed("c"))
        self.source.fail_update(ServerError("503"))
        self.reporter.failed(failed("d"))
        self.assertEqual(self.sent(), [("a", "b")])
        self.clock.advance(1.9)
        self.assertEqual(len(self.sent()), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.sent(), [("a", "b"), ("a", "b", "c", "d")])
        self.source.fail_update(ServerError("503"))
        self.clock.advance(4.9)  # the second delay
        self.assertEqual(len(self.sent()), 2)
        self.clock.advance(0.1)
        self.source.answer()
        self.assertEqual(self.sent()[-1], ("a", "b", "c", "d"))
        self.assertEqual([rid for rid, _, _ in self.source.committed], ["a", "b", "c", "d"])
        self.assertEqual((self.reporter.calls, self.reporter.failed_calls), (3, 2))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failed_chunk_report_keeps_its_place_too(self) -> None:
        self.reporter.finished(chunk("one.tar", "a"))
        self.reporter.finished(chunk("two.tar", "b"))
        self.source.fail_update(ServerError("timeout"))
        self.clock.advance(2)
        self.assertEqual([c.lfn for c in self.source.updates[-1].chunks], ["one.tar", "two.tar"])

    def test_a_refused_range_is_counted_and_not_resent(self) -> None:
        self.reporter.failed(failed("a", "b"))
        self.source.answer(refuse=["a"])
        self.clock.advance(100)
        self.assertEqual(self.sent(), [("a", "b")])
        self.assertEqual(
            (self.reporter.refused, self.reporter.reported_failed, self.reporter.pending), (1, 1, 0)
        )

    def test_a_command_in_the_reply_reaches_on_command(self) -> None:
        self.reporter.failed(failed("a"))
        self.source.answer(command="tobekilled", how="single")
        self.assertEqual(self.commands, ["tobekilled"])
        self.assertEqual(self.reporter.how, {"single": 1})


class PartlyRecordedTests(ReporterCase):
    """``RangesNotRecorded``: the settled ranges count once, only the others go again."""

    def not_recorded(self, accepted: dict[str, bool | None], command: str | None = None) -> RangesNotRecorded:
        return RangesNotRecorded(
            "not all recorded", EventUpdateResult(accepted, command, "confirmed-after-500")
        )

    def test_only_the_unsettled_ranges_are_resent(self) -> None:
        self.reporter.finished(chunk("one.tar", "a", "b", "c"))
        self.reporter.finished(chunk("two.tar", "d"))  # queued behind the report in flight
        self.source.fail_update(self.not_recorded({"b": True, "c": False}, command="softkill"))
        self.assertEqual(
            (self.reporter.reported_finished, self.reporter.refused, self.reporter.pending), (1, 1, 2)
        )
        self.assertEqual((self.commands, self.reporter.how), (["softkill"], {"confirmed-after-500": 1}))
        self.clock.advance(1.9)
        self.assertEqual(len(self.sent()), 1)
        self.clock.advance(0.1)  # the resend waits the delay, as after any failure
        self.assertEqual(self.sent()[-1], ("a", "d"))
        self.assertEqual([c.lfn for c in self.source.updates[-1].chunks], ["one.tar", "two.tar"])
        self.source.answer()
        self.assertEqual((self.reporter.reported_finished, self.reporter.pending), (3, 0))
        self.assertEqual((self.reporter.calls, self.reporter.failed_calls), (2, 1))
        self.assertEqual([rid for rid, _, _ in self.source.committed], ["a", "d"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_chunk_loses_only_its_settled_ranges(self) -> None:
        self.reporter.finished(chunk("one.tar", "a", "b"))
        self.reporter.failed(failed("x"))
        self.source.fail_update(self.not_recorded({"a": True}))
        self.clock.advance(2)
        self.assertEqual(self.sent()[-1], ("x",))  # failures first, as always
        self.source.answer()
        resent = self.source.updates[-1]
        self.assertEqual((resent.range_ids, resent.chunks[0].lfn, resent.version), (("b",), "one.tar", 1))
        self.source.answer()
        self.assertEqual([rid for rid, _, _ in self.source.committed], ["x", "b"])
        self.assertEqual((self.reporter.reported_finished, self.reporter.reported_failed), (2, 1))

    def test_nothing_recorded_resends_all(self) -> None:
        self.reporter.failed(failed("a", "b"))
        self.source.fail_update(self.not_recorded({}))
        self.clock.advance(2)
        self.assertEqual(self.sent(), [("a", "b"), ("a", "b")])
        self.assertEqual(self.reporter.how, {})

    def test_after_stop_the_settled_count_and_the_rest_is_dropped(self) -> None:
        self.reporter.failed(failed("a", "b"))
        self.reporter.stop()
        self.source.fail_update(self.not_recorded({"a": True}))
        self.clock.advance(100)
        self.assertEqual((self.sent(), self.reporter.reported_failed), ([("a", "b")], 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FlushTests(ReporterCase):
    def test_flush_returns_once_everything_is_acknowledged(self) -> None:
        self.reporter.failed(failed("a"))
        self.reporter.finished(chunk("one.tar", "b"))
        flushed = Deferred.fromCoroutine(self.reporter.flush(self.clock.seconds() + 60))
        self.source.answer()
        self.assertNoResult(flushed)
        self.source.answer()
        self.successResultOf(flushed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_returns_at_the_deadline_when_the_server_never_answers(self) -> None:
        self.reporter.failed(failed("a"))
        flushed = Deferred.fromCoroutine(self.reporter.flush(self.clock.seconds() + 30))
        self.clock.advance(29.9)
        self.assertNoResult(flushed)
        self.clock.advance(0.1)
        self.successResultOf(flushed)
        self.assertEqual(self.reporter.pending, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_brings_a_resend_forward_to_the_deadline(self) -> None:
        reporter = RangeReporter(self.clock, self.source.update_event_ranges, 1, resend_delays=(100.0,))
        reporter.failed(failed("a"))
        self.source.fail_update(ServerError("503"))
        flushed = Deferred.fromCoroutine(reporter.flush(self.clock.seconds() + 10))
        self.clock.advance(10)
        self.assertEqual(len(self.source.updates), 2)  # resent at the deadline, not after 100 s
        self.successResultOf(flushed)

    def test_flush_waits_through_a_resend_before_the_deadline(self) -> None:
        self.reporter.failed(failed("a"))
        flushed = Deferred.fromCoroutine(self.reporter.flush(self.clock.seconds() + 30))
        self.source.fail_update(ServerError("503"))
        self.assertNoResult(flushed)
        self.clock.advance(2)
        self.source.answer()
        self.successResultOf(flushed)
        self.assertEqual(self.reporter.reported_failed, 1)

    def test_nothing_is_sent_after_stop(self) -> None:
        self.reporter.failed(failed("a"))
        self.reporter.failed(failed("b"))
        self.reporter.stop()
        self.source.fail_update(ServerError("503"))  # the report in flight when the job ended
        self.reporter.failed(failed("c"))
        self.clock.advance(100)
        self.assertEqual(self.sent(), [("a",)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
