"""The reactor-lag probe (``pilot.monitor.lag``) on a task.Clock.

Intervals and lags are binary fractions (1/8 s ...): on a Clock that stands exactly on
a LoopingCall's slot boundaries, decimal steps such as 0.05 s accumulate rounding
errors that LoopingCall's own slot arithmetic turns into double ticks.
"""

from __future__ import annotations

import threading
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.monitor.lag import ReactorLagProbe

INTERVAL = 0.125

reactor: Any = _reactor


class ReactorLagProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.probe = ReactorLagProbe(self.clock, interval=INTERVAL)

    def late_tick(self, late: float) -> None:
        """Run the probe's next tick ``late`` seconds after it was due."""
        (call,) = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() + late - self.clock.seconds())

    def test_on_time_ticks_measure_no_lag(self) -> None:
        self.probe.start()
        for _ in range(10):
            self.clock.advance(INTERVAL)
        snapshot = self.probe.snapshot()
        self.assertEqual(snapshot["reactor_lag_samples"], 10)
        self.assertEqual(snapshot["reactor_lag_ms_max"], 0.0)
        self.assertEqual(snapshot["reactor_lag_ms_histogram"]["<=1"], 10)

    def test_a_blocked_reactor_shows_as_lag(self) -> None:
        self.probe.start()
        self.clock.advance(INTERVAL)  # on time
        self.clock.advance(INTERVAL + 0.25)  # the reactor was busy: the next tick runs 250 ms late
        snapshot = self.probe.snapshot()
        self.assertEqual(snapshot["reactor_lag_samples"], 2)
        self.assertEqual(snapshot["reactor_lag_ms_max"], 250.0)
        self.assertEqual(snapshot["reactor_lag_ms_mean"], 125.0)
        self.assertEqual(snapshot["reactor_lag_max_at"], self.clock.seconds())
        self.assertEqual(snapshot["reactor_lag_ms_histogram"]["<=500"], 1)
        for _ in range(4):  # it keeps ticking, on time again
            self.clock.advance(INTERVAL)
        self.assertEqual(self.probe.count, 6)
        self.assertEqual(self.probe.max, 0.25)

    def test_lags_go_to_their_buckets(self) -> None:
        self.probe.start()
        for late in (0.0, 1 / 2048, 1 / 256, 1 / 64, 1 / 64, 0.75, 2.0):
            self.late_tick(late)
        histogram = self.probe.snapshot()["reactor_lag_ms_histogram"]
        self.assertEqual(self.probe.count, 7)
        self.assertEqual((histogram["<=1"], histogram["<=5"], histogram["<=20"]), (2, 1, 2))
        self.assertEqual((histogram["<=1000"], histogram[">1000"]), (1, 1))
        self.assertEqual(sum(histogram.values()), 7)

    def test_reset_starts_a_new_period(self) -> None:
        self.probe.start()
        self.late_tick(0.5)
        self.assertEqual(self.probe.max, 0.5)
        self.probe.reset()
        self.assertEqual(self.probe.snapshot()["reactor_lag_samples"], 0)
        self.assertEqual(self.probe.snapshot()["reactor_lag_ms_mean"], 0.0)
        self.late_tick(0)
        self.assertEqual((self.probe.count, self.probe.max), (1, 0.0))

    def test_stop_leaves_no_timer_and_keeps_the_figures(self) -> None:
        self.probe.start()
        self.probe.start()  # once is enough
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.late_tick(0.125)
        self.probe.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.probe.snapshot()["reactor_lag_ms_max"], 125.0)
        self.probe.start()
        self.late_tick(0)
        self.assertEqual(self.probe.count, 2)
        self.probe.stop()

    def test_a_long_block_is_logged(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.probe.start()
        self.late_tick(0.5)
        self.assertEqual([e for e in events if e.get("event") == "reactor.lag"], [])
        self.late_tick(2.0)
        (event,) = [e for e in events if e.get("event") == "reactor.lag"]
        self.assertEqual(event["lag"], 2.0)

    def test_interval_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            ReactorLagProbe(self.clock, interval=0)


class RealReactorTests(TestCase):
    """The probe against the real reactor: a call that blocks it for 100 ms shows as lag."""

    timeout = 10

    async def test_a_blocking_call_is_seen(self) -> None:
        probe = ReactorLagProbe(reactor, interval=0.01)
        probe.start()
        self.addCleanup(probe.stop)
        await deferLater(reactor, 0.05, lambda: None)
        quiet = probe.max
        await deferLater(reactor, 0, threading.Event().wait, 0.1)  # blocks the reactor thread
        await deferLater(reactor, 0.05, lambda: None)
        self.assertGreater(probe.count, 5)
        self.assertGreaterEqual(probe.max, 0.09)
        self.assertLess(quiet, probe.max)
