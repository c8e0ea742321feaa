"""The process runner: real processes for exit codes, output and kills; a clock for timing."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.model.processes import ProcessOutcome
from pilot.process import runner
from pilot.process.runner import ENV, SETSID, Descendant, ManagedProcess, OSProcessControl, launch_argv
from pilot.util.threads import PoolStopped, ThreadRunner, WorkerPool

from .events import file_ready, processes_gone
from .fakes import FakeProcessControl, FakeSpawner, ManualRunner


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

    async def test_processes_that_end_at_once(self) -> None:
        # posix_spawn returns after the exec: the child may be gone before Twisted's
        # first reap, which then ends the process inside spawnProcess.
        for _ in range(20):
            process = ManagedProcess(
                reactor,
                reactor,
                ["/bin/true"],
                env={},
                cwd=self.dir,
                stdout=self.dir / "true.out",
                stderr=self.dir / "true.out",
                name="true",
            )
            pid = process.start()
            outcome = await process.wait()
            self.assertEqual((outcome.pid, outcome.exit_code), (pid, 0))

    async def test_a_command_whose_name_holds_an_equals_sign(self) -> None:
        script = self.dir / "a=b.sh"
        script.write_text("#!/bin/sh\npwd\n")
        script.chmod(0o755)
        process = ManagedProcess(
            reactor,
            reactor,
            [str(script.resolve())],
            env={},
            cwd=self.dir,
            stdout=self.dir / "where",
            stderr=self.dir / "where.err",
            name="equals",
        )
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 0)
        self.assertEqual(Path((self.dir / "where").read_text().strip()).resolve(), self.dir.resolve())

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
        # The leader exits only once the leftover ignores SIGTERM: the child writes its pid
        # after the trap, then opens the fifo the leader is blocked reading.
        script = (
            "mkfifo ready; (trap '' TERM; echo $BASHPID > child.pid; echo > ready; exec sleep 1000) & "
            "read _ < ready; exit 0"
        )
        process = self._process(script, grace=0.3)
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 0)
        child = int((self.dir / "child.pid").read_text())
        self.assertTrue(process.cleaning_up, "the leftover ignores SIGTERM: SIGKILL is pending")
        await self._assert_gone(child)
        self.assertFalse(process.cleaning_up)


class LaunchTests(SynchronousTestCase):
    """How a process is handed to Twisted: ``env --chdir`` so that Twisted can use posix_spawn."""

    def test_directory_through_env_and_no_path_for_twisted(self) -> None:
        executable, argv, path = launch_argv(["/bin/bash", "-c", "x"], Path("/work dir"))
        self.assertEqual(executable, ENV)
        self.assertEqual(argv, [ENV, "--chdir=/work dir", SETSID, "/bin/bash", "-c", "x"])
        self.assertIsNone(path, "no path: Twisted spawns with posix_spawn instead of fork")

    def test_a_payload_named_like_a_variable_is_not_read_as_one(self) -> None:
        # env takes its first word without "=" (setsid) as the command; the rest is setsid's.
        _, argv, _ = launch_argv(["/x/a=b", "1"], Path("/w"))
        self.assertEqual(argv[2:], [SETSID, "/x/a=b", "1"])

    def test_this_machines_env_has_chdir(self) -> None:
        self.assertTrue(runner.ENV_CHDIR, f"{ENV} is GNU env from coreutils >= 8.28 on Debian")

    def test_an_env_without_chdir_falls_back_to_twisted(self) -> None:
        old = Path(self.mktemp())
        old.write_bytes(b"\x7fELF... Usage: env [OPTION]... [-] [NAME=VALUE]... [COMMAND [ARG]...]")
        self.assertFalse(runner.env_has_chdir(str(old)))
        self.assertFalse(runner.env_has_chdir("/no/such/env"))
        self.patch(runner, "ENV_CHDIR", False)
        executable, argv, path = launch_argv(["/bin/true"], Path("/w"))
        self.assertEqual((executable, argv, path), (SETSID, [SETSID, "/bin/true"], "/w"))


class FakeProcessCase(SynchronousTestCase):
    """Fake processes on a task.Clock: a 10 s kill grace, a 60 s backstop."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner(self.clock)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def _process(self, control: FakeProcessControl, in_thread: ThreadRunner | None = None) -> ManagedProcess:
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
            in_thread=in_thread,
        )


class EscalationTimingTests(FakeProcessCase):
    """TERM → KILL → backstop on a task.Clock (fake processes)."""

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


LEFTOVERS = {Descendant(9_000_001, 1.0), Descendant(9_000_002, 1.0)}


class LeftoverSweepTests(FakeProcessCase):
    """The sweep after a leader ends (issue 11, defect 3): scans in the runner, never inline.

    A leader that left processes behind makes ``processEnded`` walk ``/proc`` and
    signal each leftover: 250 ms of the reactor thread with 2,000 of them.
    """

    def setUp(self) -> None:
        super().setUp()
        self.control = FakeProcessControl(self.spawner, obey_term=False)
        self.runner = ManualRunner()

    def _leaving(self, in_thread: ThreadRunner | None) -> ManagedProcess:
        return self._process(self.control, in_thread)

    def _end_leaving_leftovers(
        self, in_thread: ThreadRunner | None, *, after: float = 0.0
    ) -> tuple[ManagedProcess, int, Deferred[ProcessOutcome]]:
        """Start a process; ``after`` seconds later its leader exits, two processes left in its group."""
        process = self._leaving(in_thread)
        pid = process.start()
        self.control.members[pid] = set(LEFTOVERS)
        waiter = process.wait()
        self.clock.advance(after)
        self.spawner.processes[-1].end(0)
        return process, pid, waiter

    def test_leftover_scan_and_signals_run_in_the_runner(self) -> None:
        process, pid, waiter = self._end_leaving_leftovers(self.runner, after=5)
        self.assertEqual(self.control.scans, [], "no /proc walk on the reactor thread")
        self.assertEqual(len(self.runner.queue), 1)
        self.assertFalse(process.running, "the leader has ended")
        self.assertNoResult(waiter)
        self.clock.advance(1)
        self.runner.run_one()  # the group scan finds the leftovers: TERM to the group now
        self.assertEqual(self.control.signals, [(pid, signal.SIGTERM, 6.0)])
        self.assertNoResult(waiter)
        self.runner.run_one()  # each leftover by pid and start time, in the runner too
        self.assertEqual(
            sorted(self.control.process_signals),
            [(d.pid, signal.SIGTERM) for d in sorted(LEFTOVERS, key=lambda d: d.pid)],
        )
        outcome = self.successResultOf(waiter)
        self.assertEqual((outcome.exit_code, outcome.ended), (0, 5.0), "ended when the leader ended")
        self.assertTrue(process.cleaning_up)
        self.clock.advance(10)
        self.assertEqual(self.control.signals[-1], (pid, signal.SIGKILL, 16.0))
        self.runner.run_all()
        self.assertFalse(process.cleaning_up)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([what for what, _ in self.control.scans], ["group_members"])

    def test_without_a_runner_the_sweep_is_inline_as_before(self) -> None:
        process, pid, waiter = self._end_leaving_leftovers(None)
        self.successResultOf(waiter)
        self.assertEqual(self.control.signals, [(pid, signal.SIGTERM, 0.0)])
        self.assertEqual(len(self.control.process_signals), 2)
        self.assertTrue(process.cleaning_up)
        self.successResultOf(process.sweep_now())
        self.assertEqual(self.control.signals[-1], (pid, signal.SIGKILL, 0.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_left_means_no_scan_and_no_wait(self) -> None:
        process = self._leaving(self.runner)
        process.start()
        waiter = process.wait()
        self.spawner.processes[-1].end(3)
        self.assertEqual(self.successResultOf(waiter).exit_code, 3)
        self.assertEqual((self.runner.calls, self.control.scans), (0, []))

    def test_terminate_finds_descendants_in_the_runner(self) -> None:
        process = self._leaving(self.runner)
        pid = process.start()
        done = process.terminate("test")
        self.assertEqual(self.control.scans, [])
        self.assertEqual(self.control.signals, [], "TERM follows the descendant scan")
        self.runner.run_one()
        self.assertEqual(self.control.signals, [(pid, signal.SIGTERM, 0.0)])
        self.clock.advance(10)
        self.runner.run_all()
        self.assertEqual(self.control.signals[-1], (pid, signal.SIGKILL, 10.0))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(done).signal, signal.SIGKILL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_stopped_pool_still_sweeps(self) -> None:
        """At shutdown the pool may be gone: leftovers are still signalled (inline)."""

        def stopped(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(PoolStopped("stopped"))

        _, pid, waiter = self._end_leaving_leftovers(stopped)
        self.successResultOf(waiter)
        self.assertEqual(self.control.signals, [(pid, signal.SIGTERM, 0.0)])
        self.assertEqual(len(self.control.process_signals), 2)


class RecordingControl(OSProcessControl):
    """The real control, noting the thread every /proc walk ran in."""

    def __init__(self) -> None:
        self.threads: list[tuple[str, str]] = []

    def group_members(self, pgid: int) -> set[Descendant]:
        self.threads.append(("group_members", threading.current_thread().name))
        return super().group_members(pgid)

    def descendants(self, pid: int) -> set[Descendant]:
        self.threads.append(("descendants", threading.current_thread().name))
        return super().descendants(pid)


class RealSweepInThreadTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.pool = WorkerPool(cast(IReactorFromThreads, reactor), 1, "test-process-scans")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def test_leftovers_removed_with_every_scan_in_the_pool(self) -> None:
        control = RecordingControl()
        process = ManagedProcess(
            reactor,
            reactor,
            [
                "/bin/bash",
                "-c",
                "for i in 1 2 3; do (trap '' TERM; exec sleep 1000) & done; echo $! > child.pid; exit 0",
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd=self.dir,
            stdout=self.dir / "out",
            stderr=self.dir / "err",
            kill_grace=0.3,
            control=control,
            in_thread=self.pool.runner,
        )
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 0)
        child = int((self.dir / "child.pid").read_text())
        self.assertTrue(process.cleaning_up, "the leftovers ignore SIGTERM: SIGKILL is pending")
        await process.sweep_now()
        await processes_gone([child], timeout=10)
        self.assertEqual([what for what, _ in control.threads], ["group_members"])
        self.assertTrue(all(name.startswith("PoolThread-test-process-scans") for _, name in control.threads))
