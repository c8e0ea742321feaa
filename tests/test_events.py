"""The event-driven waits of ``tests/events.py``: they fire on the event, and only then."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from twisted.internet.defer import TimeoutError
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.process.runner import ManagedProcess

from .events import ProcessEndedFirst, exists, file_ready, log_event, processes_gone, reactor


class EventWaitTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    def _process(self, script: str) -> ManagedProcess:
        process = ManagedProcess(
            reactor,
            reactor,
            ["/bin/sh", "-c", script],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd=self.dir,
            stdout=self.dir / "out",
            stderr=self.dir / "err",
            kill_grace=1.0,
            name="event test",
        )
        process.start()
        self.addCleanup(lambda: process.terminate("test over") if process.running else None)
        return process

    async def test_file_written_by_another_process(self) -> None:
        process = self._process("sleep 0.2; echo 42 > tmp.txt; mv tmp.txt value.txt; sleep 30")
        await file_ready(self.dir / "value.txt", timeout=10.0, unless=process.wait())
        self.assertEqual((self.dir / "value.txt").read_text(), "42\n")

    async def test_file_already_there(self) -> None:
        (self.dir / "here").write_text("x")
        await file_ready(self.dir / "here", ready=exists, timeout=0.5)

    async def test_writer_that_ends_first_fails_the_wait_at_once(self) -> None:
        process = self._process("exit 3")
        wait = process.wait()
        with self.assertRaises(ProcessEndedFirst):
            await file_ready(self.dir / "never", timeout=20.0, unless=wait)
        self.assertEqual((await wait).exit_code, 3, "the writer's own result is untouched")

    async def test_file_that_never_comes_times_out(self) -> None:
        with self.assertRaises(TimeoutError):
            await file_ready(self.dir / "never", timeout=0.2)

    async def test_processes_gone(self) -> None:
        process = self._process("sleep 0.2")
        assert process.pid is not None
        await processes_gone([process.pid, 2**22 + 12345], timeout=10.0)  # the second never existed
        self.assertEqual((await process.wait()).exit_code, 0)

    async def test_live_process_times_out(self) -> None:
        process = self._process("sleep 30")
        assert process.pid is not None
        with self.assertRaises(TimeoutError):
            await processes_gone([process.pid], timeout=0.2)

    async def test_log_event(self) -> None:
        log = Logger()
        seen = log_event(lambda event: event.get("event") == "test.wanted", timeout=5.0)
        log.info("other", event="test.other")
        log.info("wanted {n}", n=1, event="test.wanted")
        log.info("wanted {n}", n=2, event="test.wanted")
        self.assertEqual((await seen)["n"], 1)
        never = log_event(lambda event: False, timeout=0.1)
        with self.assertRaises(TimeoutError):
            await never


#: Modules allowed to poll the real reactor, and why.
POLLING_ALLOWED = {
    "services.py": "wait_until: xrootd, moto, fake-gcs-server and the Rucio server offer no readiness event",
    "test_integration.py": "being reworked by the lead (its two polling tests are listed in the report)",
}


def polling_loops(source: str) -> list[int]:
    """Lines of loops that wait by awaiting ``deferLater(reactor, ...)``: polling in real time."""
    found: list[int] = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, ast.For | ast.While | ast.AsyncFor):
            continue
        for node in ast.walk(loop):
            if not (isinstance(node, ast.Await) and isinstance(node.value, ast.Call)):
                continue
            func, args = node.value.func, node.value.args
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name == "deferLater" and args and isinstance(args[0], ast.Name) and "reactor" in args[0].id:
                found.append(loop.lineno)
                break
    return found


class HygieneTests(SynchronousTestCase):
    def test_no_test_polls_the_real_reactor(self) -> None:
        here = Path(__file__).resolve().parent
        offenders = {
            path.name: lines
            for path in sorted(here.glob("*.py"))
            if path.name not in POLLING_ALLOWED and (lines := polling_loops(path.read_text()))
        }
        self.assertEqual(offenders, {}, "wait on an event (tests/events.py) or drive a task.Clock instead")

    def test_the_checker_finds_a_polling_loop(self) -> None:
        source = (
            "async def f():\n    while not done():\n        await deferLater(reactor, 0.05, lambda: None)\n"
        )
        self.assertEqual(polling_loops(source), [2])
        self.assertEqual(polling_loops("async def f():\n    await deferLater(clock, 5, g)\n"), [])
