"""``pilot.eventservice.supply``: the prefetch buffer, on a Clock and a hand-fired event source."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.eventservice.ranges import EventRange
from pilot.eventservice.supply import RangeSupply
from pilot.server.errors import ServerError
from pilot.server.events import EventRangeRequest
from tests.test_es_engine import MemorySource, make_range


class SupplyCase(SynchronousTestCase):
    def supply(self, **kwargs: object) -> tuple[Clock, MemorySource, RangeSupply]:
        clock = Clock()
        source = MemorySource()

        def fetch(n: int) -> Deferred[list[dict[str, object]]]:
            return source.acquire_event_ranges(EventRangeRequest(7, 8, 9, n))

        supply = RangeSupply(clock, fetch, **kwargs)  # type: ignore[arg-type]
        return clock, source, supply

    def ids(self, ranges: list[EventRange] | None) -> list[str]:
        assert ranges is not None
        return [r.range_id for r in ranges]


class PrimeTests(SupplyCase):
    def test_prime_fetches_before_any_worker_asks(self) -> None:
        clock, source, supply = self.supply(min_request=4)
        primed = Deferred.fromCoroutine(supply.prime())
        self.assertEqual([r.n_ranges for r in source.requests], [4])
        self.assertNoResult(primed)
        clock.advance(3)
        ids = source.give(4)
        self.successResultOf(primed)
        self.assertEqual(supply.level, 4)
        # the first worker finds its range waiting: no wait counted
        self.assertEqual(self.ids(self.successResultOf(supply.take())), ids[:1])
        self.assertEqual(supply.wait_seconds, 0.0)

    def test_prime_returns_on_an_empty_reply(self) -> None:
        _, source, supply = self.supply()
        primed = Deferred.fromCoroutine(supply.prime())
        source.give(0)
        self.successResultOf(primed)
        self.assertTrue(supply.ended)
        self.assertIsNone(supply.error)

    def test_prime_returns_once_some_ranges_are_in(self) -> None:
        """A first reply smaller than asked starts a second request; prime does not wait for it."""
        clock, source, supply = self.supply(min_request=8)
        primed = Deferred.fromCoroutine(supply.prime())
        source.give(2)
        self.assertEqual(len(source.requests), 2)  # the buffer is below half of what it wants
        self.successResultOf(primed)
        self.assertEqual(supply.level, 2)
        # even when that second request fails and is retried on the clock
        source.fail_acquire(ServerError("503"))
        self.assertEqual(len(clock.getDelayedCalls()), 1)


class WaiterTests(SupplyCase):
    def test_a_waiter_is_served_when_ranges_arrive_and_its_wait_is_counted(self) -> None:
        clock, source, supply = self.supply(min_request=2)
        first = supply.take()
        clock.advance(1.5)
        second = supply.take()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(source.requests), 1)
        clock.advance(2.5)
        ids = source.give(2)
        self.assertEqual(self.ids(self.successResultOf(first)), ids[:1])
        self.assertEqual(self.ids(self.successResultOf(second)), ids[1:])
        self.assertEqual(supply.wait_seconds, 4.0 + 2.5)
        self.assertEqual(supply.taken, 2)

    def test_a_waiter_asking_for_several_gets_them_together(self) -> None:
        _, source, supply = self.supply(min_request=2)
        waiting = supply.take(3)
        self.assertEqual(source.requests[0].n_ranges, 3)  # what the waiter wants, above the minimum
        ids = source.give(3)
        self.assertEqual(self.ids(self.successResultOf(waiting)), ids)

    def test_cancelling_a_waiter_removes_it(self) -> None:
        _, source, supply = self.supply(min_request=1)
        gone = supply.take()
        staying = supply.take()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        ids = source.give(1)
        self.assertEqual(self.ids(self.successResultOf(staying)), ids)
        self.assertEqual(supply.level, 0)
        self.assertEqual(supply.taken, 1)

    def test_only_one_request_in_flight(self) -> None:
        clock, source, supply = self.supply(min_request=2)
        waiters = [supply.take() for _ in range(5)]
        clock.advance(10)
        self.assertEqual([r.n_ranges for r in source.requests], [2])
        source.give(2)  # two served; the three others still starve: asked for them, once
        self.assertEqual([r.n_ranges for r in source.requests], [2, 3])
        self.assertEqual(len(source.in_flight_acquires), 1)
        source.give(3)
        for waiter in waiters:
            self.assertEqual(len(self.ids(self.successResultOf(waiter))), 1)

    def test_a_second_request_goes_when_the_first_is_too_small(self) -> None:
        """With ``max_in_flight=2``, a demand above what is asked for sends a second request, no third."""
        clock, source, supply = self.supply(min_request=2, max_request=50, max_in_flight=2)
        Deferred.fromCoroutine(supply.prime())
        clock.advance(1.0)
        source.give(2)
        self.assertEqual(len(source.in_flight_acquires), 0)
        supply.take()
        supply.take()
        supply.take()  # starving: asks
        self.assertEqual(len(source.in_flight_acquires), 1)
        supply.note_pace(0.1, workers=4)  # 40 ranges a second: the first request is too small
        self.assertEqual(len(source.in_flight_acquires), 2)
        self.assertLessEqual(source.requests[-1].n_ranges, 50)
        supply.note_pace(0.01, workers=40)
        supply.take()
        self.assertEqual(len(source.in_flight_acquires), 2)


class SizingTests(SupplyCase):
    def drain(
        self, clock: Clock, source: MemorySource, supply: RangeSupply, *, per_second: int, rtt: float
    ) -> None:
        """Take ``per_second`` ranges a second for a minute; the server answers after ``rtt`` seconds."""
        answer_at: float | None = None
        for tick in range(600):
            if tick % 10 == 0:
                for _ in range(per_second):
                    supply.take()
            if source.in_flight_acquires and answer_at is None:
                answer_at = clock.seconds() + rtt
            if answer_at is not None and clock.seconds() >= answer_at:
                source.give(source.requests[-1].n_ranges)
                answer_at = None
            clock.advance(0.1)

    def test_slow_consumption_asks_for_the_minimum(self) -> None:
        clock, source, supply = self.supply(min_request=4, max_request=40)
        # one range every ten seconds, the server answering in half a second
        for _ in range(30):
            supply.take()
            if source.in_flight_acquires:
                clock.advance(0.5)
                source.give(source.requests[-1].n_ranges)
            clock.advance(10)
        self.assertEqual({r.n_ranges for r in source.requests}, {4})

    def test_requests_grow_with_consumption_and_round_trip_within_the_bounds(self) -> None:
        clock, source, supply = self.supply(min_request=4, max_request=40)
        self.drain(clock, source, supply, per_second=2, rtt=1.0)
        modest = [r.n_ranges for r in source.requests]
        self.assertTrue(all(4 <= n <= 40 for n in modest), modest)
        self.assertGreater(max(modest), 4)

        clock, source, supply = self.supply(min_request=4, max_request=40)
        self.drain(clock, source, supply, per_second=2, rtt=4.0)
        slower_server = [r.n_ranges for r in source.requests]
        self.assertTrue(all(4 <= n <= 40 for n in slower_server), slower_server)
        self.assertGreater(max(slower_server), max(modest))

        clock, source, supply = self.supply(min_request=4, max_request=40)
        self.drain(clock, source, supply, per_second=20, rtt=4.0)
        hungry = [r.n_ranges for r in source.requests]
        self.assertTrue(all(4 <= n <= 40 for n in hungry), hungry)
        self.assertEqual(max(hungry), 40)
        self.assertEqual(hungry[0], 4)

    def test_the_workers_pace_sizes_the_requests_up_to_the_maximum(self) -> None:
        clock, source, supply = self.supply(min_request=4, max_request=40)
        Deferred.fromCoroutine(supply.prime())
        clock.advance(2.0)  # a round trip of two seconds
        source.give(4)
        supply.note_pace(0.5, workers=2)  # four ranges a second, over three round trips: 24
        self.assertEqual(source.requests[-1].n_ranges, 20)  # 24, less the 4 in the buffer
        clock.advance(2.0)
        source.give(20)
        supply.note_pace(0.01, workers=100)  # far beyond the maximum
        supply.take(24)
        self.assertEqual(source.requests[-1].n_ranges, 40)
        self.assertTrue(all(4 <= r.n_ranges <= 40 for r in source.requests))


class EndTests(SupplyCase):
    def test_an_empty_reply_ends_the_supply_and_waiters_get_none(self) -> None:
        _, source, supply = self.supply(min_request=2)
        waiters = [supply.take(), supply.take()]
        source.give(0)
        for waiter in waiters:
            self.assertIsNone(self.successResultOf(waiter))
        self.assertTrue(supply.ended)
        self.assertIsNone(supply.error)
        self.assertIsNone(self.successResultOf(supply.take()))
        self.assertEqual(len(source.requests), 1)

    def test_the_buffer_is_handed_out_after_the_server_said_no_more(self) -> None:
        _, source, supply = self.supply(min_request=8)
        supply.take()
        ids = source.give(3)  # one served; the buffer (2) is below half of 8: asks again
        source.give(0)
        self.assertTrue(supply.ended)
        self.assertEqual(self.ids(self.successResultOf(supply.take(5))), ids[1:])
        self.assertIsNone(self.successResultOf(supply.take()))

    def test_a_failed_request_is_retried_on_the_clock_then_the_supply_ends(self) -> None:
        clock, source, supply = self.supply(max_failures=3, retry_delays=(2.0, 5.0))
        waiting = supply.take()
        source.fail_acquire(ServerError("503"))
        self.assertEqual(len(source.requests), 1)
        clock.advance(1.9)
        self.assertEqual(len(source.requests), 1)
        clock.advance(0.1)
        self.assertEqual(len(source.requests), 2)
        source.fail_acquire(ServerError("503"))
        clock.advance(4.9)
        self.assertEqual(len(source.requests), 2)
        clock.advance(0.1)
        self.assertEqual(len(source.requests), 3)
        self.assertNoResult(waiting)
        source.fail_acquire(ServerError("still 503"))
        self.assertIsNone(self.successResultOf(waiting))
        self.assertTrue(supply.ended)
        assert supply.error is not None
        self.assertEqual(supply.error.code, ErrorCode.ESRECOVERABLE)
        self.assertIn("still 503", supply.error.detail)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(supply.wait_seconds, 7.0)

    def test_a_success_resets_the_failure_count(self) -> None:
        clock, source, supply = self.supply(min_request=1, max_failures=2, retry_delays=(1.0,))
        supply.take()
        source.fail_acquire(ServerError("503"))
        clock.advance(1)
        source.give(1)
        supply.take()
        source.fail_acquire(ServerError("503"))
        self.assertFalse(supply.ended)
        clock.advance(1)
        self.assertEqual(len(source.requests), 4)  # the second failure in a row was the first again

    def test_a_malformed_reply_ends_the_supply_with_esfatal(self) -> None:
        clock, source, supply = self.supply()
        waiting = supply.take()
        source.reply([dict(make_range(1), LFN="../../etc/passwd")])
        self.assertIsNone(self.successResultOf(waiting))
        assert supply.error is not None
        self.assertEqual(supply.error.code, ErrorCode.ESFATAL)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(source.requests), 1)  # never asked again

    def test_duplicate_ranges_are_ignored(self) -> None:
        clock, source, supply = self.supply(min_request=2, retry_delays=(3.0,))
        first = supply.take(2)
        source.reply([make_range(1), make_range(2)])
        self.assertEqual(len(self.ids(self.successResultOf(first))), 2)
        again = supply.take(2)
        source.reply([make_range(2), make_range(3)])  # one sent before, one new
        self.assertEqual(self.ids(self.successResultOf(again)), [make_range(3)["eventRangeID"]])
        self.assertEqual(supply.received, 3)
        # a reply of nothing but repeats counts as a failed request: retried after the delay
        last = supply.take()
        source.reply([make_range(1)])
        self.assertNoResult(last)
        self.assertFalse(supply.ended)
        n = len(source.requests)
        clock.advance(3)
        self.assertEqual(len(source.requests), n + 1)
        source.reply([make_range(4)])
        self.assertEqual(self.ids(self.successResultOf(last)), [make_range(4)["eventRangeID"]])
        self.assertEqual(supply.received, 4)

    def test_stop_returns_the_buffer_and_answers_waiters_none(self) -> None:
        clock, source, supply = self.supply(min_request=4)
        Deferred.fromCoroutine(supply.prime())
        ids = source.give(4)
        self.assertEqual(self.ids(self.successResultOf(supply.take())), ids[:1])
        # below half of what it wants: a request is in flight
        self.assertEqual(self.ids(self.successResultOf(supply.take(2))), ids[1:3])
        self.assertEqual(len(source.in_flight_acquires), 1)
        left = supply.stop("softkill")
        self.assertEqual([r.range_id for r in left], ids[3:])
        self.assertEqual(supply.level, 0)
        self.assertIsNone(self.successResultOf(supply.take()))
        self.assertEqual(supply.stop("again"), [])

    def test_stop_answers_waiters_none_and_cancels_the_retry(self) -> None:
        clock, source, supply = self.supply()
        waiting = supply.take()
        source.fail_acquire(ServerError("503"))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(supply.stop("the job ended"), [])
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(supply.error)

    def test_ranges_arriving_after_stop_are_late_and_settled_waits_for_them(self) -> None:
        clock, source, supply = self.supply(min_request=4)
        Deferred.fromCoroutine(supply.prime())
        ids = source.give(4)
        supply.take(3)  # below half: a request goes
        self.assertEqual([r.range_id for r in supply.stop("softkill")], ids[3:])
        settled = Deferred.fromCoroutine(supply.settled())
        self.assertNoResult(settled)
        late = source.give(4)
        self.successResultOf(settled)
        self.assertEqual([r.range_id for r in supply.late()], late)
        self.assertEqual(supply.late(), [])
        self.assertEqual(supply.level, 0)
        self.assertEqual(supply.received, 8)
        self.assertEqual(len(source.requests), 2)


class HazardTests(SupplyCase):
    """Orders of events around the ends of requests and waits."""

    def two_in_flight(
        self, clock: Clock, source: MemorySource, supply: RangeSupply
    ) -> Deferred[list[EventRange] | None]:
        """Two requests out (a starving worker, then a fast pace); the worker's wait."""
        Deferred.fromCoroutine(supply.prime())
        clock.advance(1.0)
        source.give(2)
        supply.take(2)
        waiting = supply.take()
        supply.note_pace(0.01, workers=8)
        self.assertEqual(len(source.in_flight_acquires), 2)
        return waiting

    def test_the_server_says_no_more_while_another_request_fails(self) -> None:
        """'No more' on one request and a failure of the other still end the supply."""
        clock, source, supply = self.supply(min_request=2, max_in_flight=2, retry_delays=(1.0,))
        first = self.two_in_flight(clock, source, supply)
        source.give(0)
        source.fail_acquire(ServerError("503"))
        clock.advance(60)
        self.assertTrue(supply.ended)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(supply.take()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_server_says_no_more_while_another_reply_repeats_ranges(self) -> None:
        clock, source, supply = self.supply(min_request=2, max_in_flight=2, retry_delays=(1.0,))
        second = self.two_in_flight(clock, source, supply)
        source.give(0)
        source.reply([make_range(1000)])  # a range given before
        clock.advance(60)
        self.assertIsNone(self.successResultOf(second))
        self.assertTrue(supply.ended)

    def test_a_cancelled_prime_then_a_reply(self) -> None:
        _, source, supply = self.supply()
        primed = Deferred.fromCoroutine(supply.prime())
        primed.cancel()
        self.failureResultOf(primed, CancelledError)
        source.give(8)  # no AlreadyCalledError from the prime's wait
        self.assertEqual(supply.level, 8)

    def test_a_cancelled_settle_then_a_reply(self) -> None:
        _, source, supply = self.supply(min_request=1)
        supply.take()
        supply.stop("the end")
        settled = Deferred.fromCoroutine(supply.settled())
        settled.cancel()
        self.failureResultOf(settled, CancelledError)
        late = source.give(2)
        self.assertEqual([r.range_id for r in supply.late()], late)

    def test_prime_with_a_minimum_of_one_asks_the_server(self) -> None:
        _, source, supply = self.supply(min_request=1, max_request=1)
        primed = Deferred.fromCoroutine(supply.prime())
        self.assertEqual(len(source.requests), 1)
        source.give(1)
        self.successResultOf(primed)
        self.assertEqual(supply.level, 1)
