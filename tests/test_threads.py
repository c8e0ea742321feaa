"""The pilot's own bounded thread pools (``pilot.util.threads.WorkerPool``), with real threads."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from pilot.util.threads import PoolStopped, ThreadRunner, WorkerPool

reactor: Any = _reactor


class Gate:
    """Blocking calls that wait until the test opens the gate; counts how many run at once."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()

    def call(self, value: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        self.open.wait(30)
        with self.lock:
            self.running -= 1
        return value


class WorkerPoolTests(TestCase):
    timeout = 30

    def pool(self, size: int = 2) -> WorkerPool:
        pool = WorkerPool(reactor, size, "test-pool")
        self.addCleanup(pool.stop)
        return pool

    async def test_runs_off_the_reactor_thread(self) -> None:
        pool = self.pool()
        pool.start()
        runner: ThreadRunner = pool.runner
        name = await runner(lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertIn("test-pool", name)

    async def test_at_most_size_threads_at_once(self) -> None:
        pool = self.pool(size=3)
        pool.start()
        gate = Gate()
        results = [pool.run(gate.call, i) for i in range(8)]
        self.assertEqual(pool.pending, 8)
        reactor.callLater(0.2, gate.open.set)
        self.assertEqual(await gatherResults(results), list(range(8)))
        self.assertEqual(gate.most, 3)
        self.assertLessEqual(len(gate.threads), 3)
        self.assertEqual(pool.pending, 0)

    async def test_failures_come_back_as_failures(self) -> None:
        pool = self.pool()
        pool.start()
        with self.assertRaises(ZeroDivisionError):
            await pool.run(lambda: 1 // 0)

    async def test_work_submitted_before_start_runs_after_it(self) -> None:
        pool = self.pool()
        early = pool.run(lambda: "early")
        self.assertFalse(pool.started)
        pool.start()
        self.assertEqual(await early, "early")

    async def test_stop_waits_for_running_work_and_refuses_new(self) -> None:
        pool = self.pool()
        pool.start()
        gate = Gate()
        running = pool.run(gate.call, 1)
        stopped = pool.stop()
        self.assertFalse(stopped.called, "the thread is still working")
        with self.assertRaises(PoolStopped):
            await pool.run(lambda: None)
        gate.open.set()
        await stopped
        self.assertEqual(await running, 1)
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith("PoolThread-test-pool")], [])
        await pool.stop()  # again: fires at once
        with self.assertRaises(PoolStopped):
            pool.start()

    async def test_stopping_a_pool_never_started_runs_its_backlog(self) -> None:
        pool = self.pool()
        early: Deferred[str] = pool.run(lambda: "ran")
        await pool.stop()
        self.assertEqual(await early, "ran")

    def test_needs_a_thread(self) -> None:
        with self.assertRaises(ValueError):
            WorkerPool(reactor, 0, "none")
