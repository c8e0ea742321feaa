"""The process runner: real processes for exit codes, output and kills; a clock for timing."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.model.processes import ProcessOutcome
from pilot.process.runner import ManagedProcess

from .events import file_ready, processes_gone
from .fakes import FakeProcessControl, FakeSpawner


class RealProcessTests(TestCase):
    """Real children of the test process (short graces, real reactor)."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def _process(self, script: str, grace: float = 0.5) -> ManagedProcess:
        return ManagedProcess(
            reactor,
            reactor,
            ["/bin/bash", "-c", script],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd=self.dir,
            stdout=self.dir / "payload.stdout",
            stderr=self.dir / "payload.stderr",
            kill_grace=grace,
            name="test payload",
        )

    async def _wait_for_file(self, path: Path, limit: float = 10.0) -> str:
        await file_ready(path, timeout=limit)
        return path.read_text().strip()

    async def _assert_gone(self, pid: int, limit: float = 10.0) -> None:
        await processes_gone([pid], timeout=limit)

    async def test_exit_codes(self) -> None:
        for code in (0, 3, 255):
            process = self._process(f"exit {code}")
            process.start()
            outcome = await process.wait()
            self.assertEqual((outcome.exit_code, outcome.signal, outcome.shell_status), (code, None, code))
            self.assertFalse(outcome.terminated_by_pilot)

    async def test_output_files_complete(self) -> None:
        process = self._process("for i in $(seq 1 20000); do echo line $i; done; echo oops >&2; exit 0")
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 0)
        lines = (self.dir / "payload.stdout").read_text().splitlines()
        self.assertEqual(lines[0], "line 1")
        self.assertEqual(lines[19999], "line 20000")
        self.assertEqual((self.dir / "payload.stderr").read_text(), "oops\n")

    async def test_runs_in_its_own_process_group_and_directory(self) -> None:
        process = self._process("echo $$ $(ps -o pgid= $$) $(pwd)")
        pid = process.start()
        await process.wait()
        shell_pid, pgid, cwd = (self.dir / "payload.stdout").read_text().split()
        self.assertEqual(int(shell_pid), pid)
        self.assertEqual(int(pgid), pid)
        self.assertNotEqual(int(pgid), os.getpgrp())
        self.assertEqual(Path(cwd).resolve(), self.dir.resolve())

    async def test_killed_by_a_signal(self) -> None:
        process = self._process("kill -SEGV $$")
        process.start()
        outcome = await process.wait()
        self.assertEqual((outcome.exit_code, outcome.signal), (None, signal.SIGSEGV))
        self.assertEqual(outcome.shell_status, 128 + signal.SIGSEGV)

    async def test_terminate_kills_background_child_ignoring_sigterm(self) -> None:
        script = (
            "trap '' TERM; "
            "(trap '' TERM; exec sleep 1000) & echo $! > child.pid; "
            f"exec {sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)'"
        )
        process = self._process(script, grace=0.3)
        pid = process.start()
        child = int(await self._wait_for_file(self.dir / "child.pid"))
        self.assertIn(child, [p.pid for p in psutil.Process(pid).children(recursive=True)])
        outcome = await process.terminate("test")
        self.assertTrue(outcome.terminated_by_pilot)
        self.assertEqual(outcome.signal, signal.SIGKILL, "the leader ignored SIGTERM, so SIGKILL ended it")
        await self._assert_gone(child)
        await self._assert_gone(pid)

    async def test_terminate_reaches_a_child_that_left_the_group(self) -> None:
        # The escaped process writes its own pid, so it has left the group by the time it is read.
        script = "setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & sleep 1000"
        process = self._process(script, grace=0.3)
        pid = process.start()
        escaped = int(await self._wait_for_file(self.dir / "escaped.pid"))
        self.assertNotEqual(os.getpgid(escaped), pid)
        outcome = await process.terminate("test")
        self.assertEqual(outcome.signal, signal.SIGTERM)
        await self._assert_gone(escaped)

    async def test_leftovers_of_a_finished_payload_are_removed(self) -> None:
        script = "(trap '' TERM; exec sleep 1000) & echo $! > child.pid; exit 0"
        process = self._process(script, grace=0.3)
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 0)
        child = int((self.dir / "child.pid").read_text())
        self.assertTrue(process.cleaning_up, "the leftover ignores SIGTERM: SIGKILL is pending")
        await self._assert_gone(child)
        self.assertFalse(process.cleaning_up)


class EscalationTimingTests(SynchronousTestCase):
    """TERM → KILL → backstop on a task.Clock (fake processes)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner(self.clock)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def _process(self, control: FakeProcessControl) -> ManagedProcess:
        return ManagedProcess(
            self.spawner,
            self.clock,
            ["/bin/bash", "-c", "sleep 1000"],
            env={},
            cwd=self.dir,
            stdout=self.dir / "out",
            stderr=self.dir / "err",
            kill_grace=10.0,
            backstop=60.0,
            control=control,
        )

    def test_sigkill_after_the_grace(self) -> None:
        control = FakeProcessControl(self.spawner, obey_term=False)
        process = self._process(control)
        pid = process.start()
        done: Deferred[ProcessOutcome] = process.terminate("test")
        self.assertEqual(control.signals, [(pid, signal.SIGTERM, 0.0)])
        self.clock.advance(9.999)
        self.assertNoResult(done)
        self.assertEqual(len(control.signals), 1)
        self.clock.advance(0.001)
        self.assertEqual(control.signals[1], (pid, signal.SIGKILL, 10.0))
        self.clock.advance(0)
        outcome = self.successResultOf(done)
        self.assertEqual(
            (outcome.signal, outcome.terminated_by_pilot, outcome.lost), (signal.SIGKILL, True, False)
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_obedient_process_gets_no_sigkill(self) -> None:
        control = FakeProcessControl(self.spawner, obey_term=True)
        process = self._process(control)
        process.start()
        done = process.terminate("test")
        self.clock.advance(0)
        outcome = self.successResultOf(done)
        self.assertEqual(outcome.signal, signal.SIGTERM)
        self.assertNotIn(signal.SIGKILL, [s for _, s, _ in control.signals])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backstop_when_sigkill_does_not_end_it(self) -> None:
        control = FakeProcessControl(None)  # signals go nowhere: a process stuck in D state
        process = self._process(control)
        process.start()
        done = process.terminate("test")
        self.clock.advance(10.0)
        self.clock.advance(59.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        outcome = self.successResultOf(done)
        self.assertTrue(outcome.lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_natural_exit_needs_no_timers(self) -> None:
        control = FakeProcessControl(self.spawner)
        process = self._process(control)
        process.start()
        waiter = process.wait()
        self.spawner.processes[-1].end(0)
        self.assertEqual(self.successResultOf(waiter).exit_code, 0)
        self.assertEqual(control.signals, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_waiter_gets_its_own_deferred(self) -> None:
        process = self._process(FakeProcessControl(self.spawner))
        process.start()
        first, second = process.wait(), process.wait()
        self.assertIsNot(first, second)
        self.spawner.processes[-1].end(2)
        self.assertEqual(self.successResultOf(first).exit_code, 2)
        self.assertEqual(self.successResultOf(second).exit_code, 2)
        self.assertEqual(self.successResultOf(process.wait()).exit_code, 2)
