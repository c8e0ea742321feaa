"""The payload supervisor, process identities and adopted processes, with real processes.

The supervisor runs under ``/bin/sh`` (dash here) and under bash invoked as ``sh`` (what
``/bin/sh`` is on EL), through a ``sh`` symlink to bash.  Orphans are made the way a
dead pilot leaves them: a small "pilot" (Python) starts a supervised payload in a
session of its own and is SIGKILLed by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import psutil
from twisted.internet import inotify
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.model.processes import ProcessOutcome
from pilot.process.adopt import AdoptedProcess
from pilot.process.identity import (
    ProcessIdentity,
    boot_id,
    parse_stat,
    process_identity,
    read_stat,
    same_process,
    still_running,
)
from pilot.process.runner import ManagedProcess
from pilot.process.supervisor import (
    SCRIPT,
    SH,
    TMP_SUFFIX,
    PayloadStatus,
    parse_status,
    read_status,
    shell_altered_names,
    supervised_argv,
    sync_takes_files,
)

from .events import file_ready, processes_gone, reactor
from .fakes import FakeProcessControl

#: A dead pilot in miniature: starts argv in a session of its own, names its pid, waits.
FAKE_PILOT = """\
import os, signal, sys
pidfile, *argv = sys.argv[1:]
pid = os.posix_spawn(argv[0], argv, os.environ, setsid=True)
with open(pidfile + ".tmp", "w") as out:
    out.write(str(pid))
os.rename(pidfile + ".tmp", pidfile)
while True:
    signal.pause()
"""


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", **extra}


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


async def _reactor_running() -> None:
    """Let the test body run in a running reactor, not inside its startup.

    A test whose last step completes while the reactor is starting (a child that ended
    before ``reactor.run`` is reaped as the SIGCHLD handler is installed) makes trial
    crash the reactor inside its startup event, and the next test then runs without
    SIGCHLD handling: its children are never reaped.
    """
    await deferLater(reactor, 0, lambda: None)


class RealCase(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        await _reactor_running()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.shells = [SH]
        bash = shutil.which("bash")
        if bash is not None:  # bash as "sh", as /bin/sh is on EL
            (self.dir / "bash-as").mkdir()
            link = self.dir / "bash-as" / "sh"
            link.symlink_to(bash)
            self.shells.append(str(link))

    def _process(
        self,
        argv: Sequence[str],
        name: str,
        *,
        status: Path | None = None,
        env: dict[str, str] | None = None,
        shell: str = SH,
        grace: float = 0.5,
    ) -> ManagedProcess:
        env = _env() if env is None else env
        if status is not None:
            argv = supervised_argv(status, argv, env=env, shell=shell)
        return ManagedProcess(
            reactor,
            reactor,
            argv,
            env=env,
            cwd=self.dir,
            stdout=self.dir / f"{name}.out",
            stderr=self.dir / f"{name}.err",
            kill_grace=grace,
            name=name,
        )

    async def _orphan(
        self, payload: Sequence[str], status: Path, *, env: dict[str, str] | None = None
    ) -> int:
        """A supervised payload whose pilot has been SIGKILLed; returns the supervisor's pid."""
        env = _env() if env is None else env
        pidfile = self.dir / "supervisor.pid"
        if pidfile.exists():
            pidfile.unlink()
        argv = [sys.executable, "-c", FAKE_PILOT, str(pidfile), *supervised_argv(status, payload, env=env)]
        pilot = _Ended()
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(self.dir / "pilot.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            transport = reactor.spawnProcess(
                pilot,
                sys.executable,
                argv,
                env=env,
                path=str(self.dir),
                childFDs={0: devnull, 1: out, 2: out},
            )
        finally:
            os.close(devnull)
            os.close(out)
        await file_ready(pidfile, unless=pilot.ended)
        pid = int(pidfile.read_text())
        assert isinstance(transport.pid, int)
        os.kill(transport.pid, signal.SIGKILL)
        await pilot.ended
        return pid

    def _adopt(self, pid: int, status: Path, **kwargs: Any) -> AdoptedProcess:
        identity = process_identity(pid)
        assert identity is not None
        adopted = AdoptedProcess.adopt(
            pid=pid,
            pgid=pid,
            identity=identity.to_json(),
            status_file=status,
            clock=reactor,
            reactor=reactor,
            kill_grace=kwargs.pop("kill_grace", 0.3),
            **kwargs,
        )
        assert adopted is not None
        return adopted


class SupervisedAsWithoutTests(RealCase):
    """The pilot's ManagedProcess sees what it saw without the supervisor; the status says it too."""

    async def test_exit_codes_and_signals(self) -> None:
        cases = [
            ("exit 0", 0, None),
            ("exit 3", 3, None),
            ("kill -KILL $$", None, signal.SIGKILL),
            ("kill -SEGV $$", None, signal.SIGSEGV),
        ]
        for shell in self.shells:
            for script, code, signum in cases:
                direct = self._process(["/bin/sh", "-c", script], "direct")
                direct.start()
                plain = await direct.wait()
                status = self.dir / "status.json"
                supervised = self._process(
                    ["/bin/sh", "-c", script], "supervised", status=status, shell=shell
                )
                supervised.start()
                seen = await supervised.wait()
                what = f"{script} under {shell}"
                self.assertEqual((plain.exit_code, plain.signal), (code, signum), what)
                self.assertEqual((seen.exit_code, seen.signal), (code, signum), what)
                recorded = read_status(status)
                assert recorded is not None, what
                self.assertEqual(recorded.exit_status, plain.shell_status, what)
                self.assertEqual((recorded.exit_code, recorded.signal), (code, signum), what)
                self.assertEqual(recorded.pid, supervised.pid)
                self.assertEqual(recorded.boot_id, boot_id())
                self.assertFalse(Path(str(status) + TMP_SUFFIX).exists())
                self.assertEqual((self.dir / "supervised.err").read_text(), "", what)
                status.unlink()

    async def test_the_payload_sees_the_same_environment_files_and_signals(self) -> None:
        report = (
            "import json, os, sys\n"
            "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'argv': sys.argv[1:],"
            " 'fds': sorted(os.listdir('/proc/self/fd')), 'stdin': os.readlink('/proc/self/fd/0'),"
            " 'sigblk': status['SigBlk'], 'sigign': status['SigIgn'], 'pgid': os.getpgrp(), 'sid': os.getsid(0)}))\n"
        )
        argv = [sys.executable, "-S", "-c", report, "a b", "$HOME", "'", ""]
        environments = [
            _env(),
            _env(PWD="/elsewhere", OLDPWD="/no/such/dir", SHLVL="7", HOME="/h", EMPTY=""),
        ]
        for shell in self.shells:
            for env in environments:
                direct = self._process(argv, "direct", env=env)
                direct.start()
                await direct.wait()
                supervised = self._process(
                    argv, "supervised", status=self.dir / "s.json", env=env, shell=shell
                )
                supervised.start()
                await supervised.wait()
                before = json.loads((self.dir / "direct.out").read_text())
                after = json.loads((self.dir / "supervised.out").read_text())
                self.assertEqual((before.pop("pgid"), before.pop("sid")), (direct.pid, direct.pid))
                self.assertEqual((after.pop("pgid"), after.pop("sid")), (supervised.pid, supervised.pid))
                self.assertEqual(after, before, f"under {shell}")
                self.assertEqual(after["argv"], ["a b", "$HOME", "'", ""])
                self.assertEqual(after["fds"], ["0", "1", "2", "3"])  # 3: listdir's own

    async def test_sigterm_to_the_group_reaches_the_payload_and_is_recorded(self) -> None:
        for shell in self.shells:
            status = self.dir / "status.json"
            ready = self.dir / "ready"
            process = self._process(
                ["/bin/sh", "-c", 'echo ready > "$1"; exec sleep 1000', "payload", str(ready)],
                "payload", status=status, shell=shell,
            )  # fmt: skip
            process.start()
            await file_ready(ready, unless=process.wait())
            outcome = await process.terminate("test")
            self.assertEqual((outcome.exit_code, outcome.signal), (None, signal.SIGTERM), shell)
            recorded = read_status(status)
            assert recorded is not None
            self.assertEqual((recorded.exit_status, recorded.signal), (128 + signal.SIGTERM, signal.SIGTERM))
            status.unlink()
            ready.unlink()

    async def test_a_payload_that_handles_the_signal_decides_how_it_ends(self) -> None:
        # A batch system's warning (SIGUSR1 to the whole group) must not end the supervisor.
        script = 'trap "exit 9" USR1; echo ready > "$1"; sleep 1000 & wait $!; exit 1'
        for shell in self.shells:
            status = self.dir / "status.json"
            ready = self.dir / "ready"
            process = self._process(
                ["/bin/sh", "-c", script, "payload", str(ready)], "p", status=status, shell=shell
            )
            pid = process.start()
            await file_ready(ready, unless=process.wait())
            os.killpg(pid, signal.SIGUSR1)
            outcome = await process.wait()
            self.assertEqual((outcome.exit_code, outcome.signal), (9, None), shell)
            recorded = read_status(status)
            assert recorded is not None
            self.assertEqual(recorded.exit_status, 9)
            status.unlink()
            ready.unlink()

    async def test_the_status_file_is_never_seen_half_written(self) -> None:
        for shell in self.shells:
            status = self.dir / f"status-{len(shell)}.json"
            seen: list[tuple[int, PayloadStatus | None]] = []
            arrived: Deferred[None] = Deferred()

            def changed(
                _: object,
                path: FilePath[Any],
                mask: int,
                status: Path = status,
                seen: list[tuple[int, PayloadStatus | None]] = seen,
                arrived: Deferred[None] = arrived,
            ) -> None:
                if os.fsdecode(path.basename()) == status.name:
                    seen.append((mask, read_status(status)))
                    if not arrived.called:
                        arrived.callback(None)

            notifier = inotify.INotify(reactor)
            notifier.startReading()
            try:
                every = inotify.IN_CREATE | inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO
                notifier.watch(FilePath(str(self.dir)), mask=every | inotify.IN_ATTRIB, callbacks=[changed])
                process = self._process(["/bin/sh", "-c", "exit 5"], "p", status=status, shell=shell)
                process.start()
                await process.wait()
                await arrived.addTimeout(10, reactor)
            finally:
                notifier.loseConnection()
            masks = [mask for mask, _ in seen]
            self.assertTrue(all(mask & inotify.IN_MOVED_TO for mask in masks), masks)
            self.assertEqual([s.exit_status if s else None for _, s in seen], [5] * len(seen))

    async def test_a_status_that_cannot_be_written_is_reported_and_the_exit_kept(self) -> None:
        for shell in self.shells:
            status = self.dir / "no-such-dir" / "status.json"
            process = self._process(["/bin/sh", "-c", "exit 4"], "p", status=status, shell=shell)
            process.start()
            outcome = await process.wait()
            self.assertEqual(outcome.exit_code, 4)
            self.assertIn(f"could not record exit status 4 in {status}", (self.dir / "p.err").read_text())
            self.assertIsNone(read_status(status))

    async def test_a_missing_command_is_127_as_without(self) -> None:
        process = self._process(["no-such-command-here"], "p", status=self.dir / "s.json")
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, 127)
        self.assertIn("no-such-command-here", (self.dir / "p.err").read_text())


class OrphanTests(RealCase):
    """The supervisor outlives its pilot; a successor adopts it."""

    def _go_fifo(self) -> tuple[Path, int]:
        """A fifo the payload waits on; the test holds a writer open, so the payload's open never blocks."""
        fifo = self.dir / "go"
        os.mkfifo(fifo)
        hold = os.open(fifo, os.O_RDWR)
        self.addCleanup(os.close, hold)
        return fifo, hold

    async def test_the_payload_ends_after_its_pilot_and_is_adopted(self) -> None:
        fifo, hold = self._go_fifo()
        status = self.dir / "status.json"
        pid = await self._orphan(["/bin/sh", "-c", 'read line < "$1"; exit 7', "payload", str(fifo)], status)
        identity = process_identity(pid)
        assert identity is not None
        self.assertTrue(still_running(identity), "the supervisor survived its pilot")
        self.assertEqual(psutil.Process(pid).ppid() != os.getpid(), True)
        adopted = self._adopt(pid, status)
        self.assertTrue(adopted.running)
        self.assertEqual(adopted.pid, pid)
        ended = adopted.wait()
        self.assertNoResult(ended)
        os.write(hold, b"go\n")
        outcome = await ended.addTimeout(10, reactor)
        self.assertEqual((outcome.exit_code, outcome.signal, outcome.lost), (7, None, False))
        self.assertFalse(outcome.terminated_by_pilot)
        self.assertFalse(adopted.running)
        recorded = read_status(status, supervisor=identity)
        assert recorded is not None
        self.assertEqual(recorded.exit_status, 7)
        self.assertEqual(adopted.status, recorded)
        self.assertEqual(json.loads(status.read_text())["exit_status"], 7)
        self.assertEqual((await adopted.wait()).exit_code, 7, "a later waiter gets the outcome at once")

    async def test_watching_by_polling_where_there_are_no_pidfds(self) -> None:
        fifo, hold = self._go_fifo()
        status = self.dir / "status.json"
        pid = await self._orphan(["/bin/sh", "-c", 'read line < "$1"; exit 6', "payload", str(fifo)], status)
        adopted = self._adopt(pid, status, use_pidfd=False, poll_interval=0.05)
        ended = adopted.wait()
        os.write(hold, b"go\n")
        outcome = await ended.addTimeout(10, reactor)
        self.assertEqual(outcome.exit_code, 6)

    async def test_terminate_kills_the_group_and_reports_the_signal(self) -> None:
        status = self.dir / "status.json"
        background = self.dir / "background.pid"
        script = 'sleep 1000 & echo $! > "$1"; exec sleep 1000'
        pid = await self._orphan(["/bin/sh", "-c", script, "payload", str(background)], status)
        await file_ready(background)
        adopted = self._adopt(pid, status)
        outcome = await adopted.terminate("test").addTimeout(10, reactor)
        self.assertEqual((outcome.exit_code, outcome.signal), (None, signal.SIGTERM))
        self.assertEqual((outcome.terminated_by_pilot, outcome.lost), (True, False))
        await processes_gone([int(background.read_text())])
        recorded = read_status(status)
        assert recorded is not None
        self.assertEqual(recorded.exit_status, 128 + signal.SIGTERM)

    async def test_a_payload_ignoring_sigterm_is_killed_after_the_grace(self) -> None:
        status = self.dir / "status.json"
        ready = self.dir / "ready"
        script = 'trap "" TERM; echo ready > "$1"; exec sleep 1000'
        pid = await self._orphan(["/bin/sh", "-c", script, "payload", str(ready)], status)
        await file_ready(ready)
        adopted = self._adopt(pid, status, kill_grace=0.2)
        outcome = await adopted.terminate("test").addTimeout(10, reactor)
        # The SIGKILL took the supervisor too: nothing recorded, SIGKILL is the known cause.
        self.assertEqual(
            (outcome.signal, outcome.terminated_by_pilot, outcome.lost), (signal.SIGKILL, True, False)
        )
        self.assertIsNone(read_status(status))
        self.assertIsNone(adopted.status)

    async def test_ended_without_a_recorded_status(self) -> None:
        status = self.dir / "status.json"
        payload = self.dir / "payload.pid"
        pid = await self._orphan(
            ["/bin/sh", "-c", 'echo $$ > "$1"; exec sleep 1000', "p", str(payload)], status
        )
        await file_ready(payload)
        adopted = self._adopt(pid, status)
        os.kill(pid, signal.SIGKILL)  # the supervisor alone, as the OOM killer might
        outcome = await adopted.wait().addTimeout(10, reactor)
        self.assertEqual((outcome.exit_code, outcome.signal, outcome.lost), (None, None, True))
        self.assertFalse(outcome.terminated_by_pilot)
        # its payload, left in the group, gets SIGTERM at once and SIGKILL after the grace
        await processes_gone([int(payload.read_text())])
        await adopted.sweep_now()
        self.assertFalse(adopted.cleaning_up)

    async def test_adoption_refused_for_a_recycled_pid(self) -> None:
        process = self._process(["/bin/sh", "-c", "exec sleep 1000"], "p")
        pid = process.start()
        identity = process_identity(pid)
        assert identity is not None
        self.assertTrue(same_process(identity))
        # the same pid with another start time, or from another boot: another process
        for other in (
            ProcessIdentity(pid, identity.start_ticks + 1, identity.boot_id),
            ProcessIdentity(pid, identity.start_ticks, "00000000-0000-0000-0000-000000000000"),
        ):
            self.assertFalse(same_process(other))
            self.assertIsNone(
                AdoptedProcess.adopt(
                    pid=pid,
                    pgid=pid,
                    identity=other,
                    status_file=self.dir / "s",
                    clock=reactor,
                    reactor=reactor,
                )
            )
        await process.terminate("test")
        self.assertFalse(same_process(identity), "gone (reaped): its pid names nothing or another process")
        self.assertIsNone(
            AdoptedProcess.adopt(
                pid=pid,
                pgid=pid,
                identity=identity,
                status_file=self.dir / "s",
                clock=reactor,
                reactor=reactor,
            )
        )

    async def test_adoption_refused_without_identity_or_with_another_group(self) -> None:
        process = self._process(["/bin/sh", "-c", "exec sleep 1000"], "p")
        pid = process.start()
        identity = process_identity(pid)
        assert identity is not None
        common: dict[str, Any] = {"status_file": self.dir / "s", "clock": reactor, "reactor": reactor}
        self.assertIsNone(AdoptedProcess.adopt(pid=pid, pgid=pid, identity=None, **common))
        with self.assertRaises(ValueError):
            AdoptedProcess.adopt(pid=pid, pgid=pid + 1, identity=identity, **common)
        with self.assertRaises(ValueError):
            AdoptedProcess.adopt(pid=pid, pgid=pid, identity={"pid": pid, "start_ticks": "x"}, **common)
        await process.terminate("test")


class IdentityTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        await _reactor_running()

    async def test_a_command_name_with_parentheses_and_spaces(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        script = directory / "x) (y z"
        script.write_text('#!/bin/sh\necho ready > "$1"\nsleep 1000\n')
        script.chmod(0o755)
        ready = directory / "ready"
        process = ManagedProcess(
            reactor, reactor, [str(script), str(ready)], env=_env(), cwd=directory,
            stdout=directory / "out", stderr=directory / "err", name="odd name",
        )  # fmt: skip
        pid = process.start()
        await file_ready(ready, unless=process.wait())
        self.assertEqual(Path(f"/proc/{pid}/comm").read_text().strip(), "x) (y z")
        fields = read_stat(pid)
        assert fields is not None
        self.assertEqual((fields.pgid, fields.state in "RS"), (pid, True))
        identity = process_identity(pid)
        assert identity is not None
        started = identity.started_at()
        assert started is not None
        self.assertAlmostEqual(started, psutil.Process(pid).create_time(), delta=0.05)
        self.assertEqual(ProcessIdentity.from_json(json.loads(json.dumps(identity.to_json()))), identity)
        await process.terminate("test")


class ParsingTests(SynchronousTestCase):
    def test_stat_lines(self) -> None:
        rest = b"S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 0\n"
        for name in (b"sh", b"x) (y z", b") ) )", b"(", b"a b c d e f g h i j k l m n o p q r s t"):
            fields = parse_stat(b"123 (" + name + b") " + rest)
            assert fields is not None, name
            self.assertEqual((fields.state, fields.pgid, fields.start_ticks), ("S", 4242, 987654))
        for bad in (b"", b"123 sh S 1", b"123 (sh) S 1 2 3", b"123 (sh) " + rest.replace(b"987654", b"x")):
            self.assertIsNone(parse_stat(bad))

    def test_identity_json(self) -> None:
        identity = ProcessIdentity(12, 34, "b")
        self.assertEqual(identity.to_json(), {"pid": 12, "start_ticks": 34, "boot_id": "b"})
        for bad in ({}, {"pid": 0, "start_ticks": 1, "boot_id": ""}, {"pid": True, "start_ticks": 1, "boot_id": ""},
                    {"pid": 1, "start_ticks": -1, "boot_id": ""}, {"pid": 1, "start_ticks": 1, "boot_id": None}):  # fmt: skip
            with self.assertRaises(ValueError):
                ProcessIdentity.from_json(bad)

    def test_no_such_process(self) -> None:
        self.assertIsNone(process_identity(0))
        self.assertIsNone(process_identity(2**22 + 1))  # above Linux's largest pid_max

    def test_status_tolerates_missing_partial_and_garbage_files(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        status = directory / "status.json"
        self.assertIsNone(read_status(status))
        good = b'{"exit_status": 3, "ended": 1700000000, "pid": 12, "start_ticks": 34, "boot_id": "b"}\n'
        for text in (b"", good[:20], good[:-3], b"\xff\xfe garbage", b"[3]", b"null", b'{"exit_status": "3"}',
                     b'{"exit_status": 256}', b'{"exit_status": true}', b'{"exit_status": 3, "pid": -1}',
                     b'{"exit_status": 3, "ended": "soon"}'):  # fmt: skip
            status.write_bytes(text)
            self.assertIsNone(read_status(status), text)
        status.write_bytes(good)
        self.assertEqual(read_status(status), PayloadStatus(3, 1700000000.0, 12, 34, "b"))
        self.assertIsNone(read_status(status, supervisor=ProcessIdentity(12, 35, "b")), "an earlier run's")
        self.assertIsNotNone(read_status(status, supervisor=ProcessIdentity(12, 34, "b")))
        # the rename was lost (a crash): the fsync'ed copy is read
        status.rename(directory / ("status.json" + TMP_SUFFIX))
        self.assertEqual(read_status(status), PayloadStatus(3, 1700000000.0, 12, 34, "b"))
        minimal = parse_status(
            b'{"exit_status": 0, "ended": null, "pid": null, "start_ticks": null, "boot_id": null}'
        )
        self.assertEqual(minimal, PayloadStatus(0))
        assert minimal is not None
        self.assertTrue(minimal.written_by(ProcessIdentity(1, 2, "c")), "names no supervisor")

    def test_exit_status_as_exit_code_or_signal(self) -> None:
        for status, code, signum in ((0, 0, None), (3, 3, None), (137, None, 9), (143, None, 15), (139, None, 11),
                                     (147, 147, None), (128, 128, None), (255, 255, None), (168, None, 40)):  # fmt: skip
            recorded = PayloadStatus(status, ended=5.0)
            self.assertEqual((recorded.exit_code, recorded.signal), (code, signum), status)
            outcome = recorded.outcome(started=1.0, pid=7)
            self.assertEqual(outcome, ProcessOutcome(7, code, signum, 1.0, 5.0))
            self.assertEqual(outcome.shell_status, status)

    def test_argv_is_a_prefix_and_nothing_is_interpolated(self) -> None:
        argv = supervised_argv(
            Path("/w/s t.json"), ["/bin/echo", "$(x)", "'"], env={"PWD": "/p", "SHLVL": "2"}
        )
        self.assertEqual(argv[:3], [SH, "-c", SCRIPT])
        self.assertEqual(argv[4], "/w/s t.json")
        self.assertEqual(argv[9:], ["=/p", "", "=2", "/bin/echo", "$(x)", "'"])
        self.assertEqual(supervised_argv(Path("/s"), ["/bin/true"])[9:12], ["-", "-", "-"])
        for status, payload in ((Path("rel.json"), ["/bin/true"]), (Path("/s"), []), (Path("/s"), ["-x"])):
            with self.assertRaises(ValueError):
                supervised_argv(status, payload)

    def test_shell_altered_names(self) -> None:
        env = {"PATH": "/bin", "IFS": ":", "BASH_FUNC_module%%": "() { :; }", "PPID": "1", "X_1": "y"}
        self.assertEqual(shell_altered_names(env), ["BASH_FUNC_module%%", "IFS", "PPID"])

    def test_sync_with_file_operands_is_recognised(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        old = directory / "sync-8.22"
        old.write_bytes(b"\x7fELF Usage: sync [OPTION]\nForce changed blocks to disk")
        new = directory / "sync-9"
        new.write_bytes(b"\x7fELF Usage: sync [OPTION] [FILE]...\n  -f, --file-system  sync the file systems")
        self.assertEqual((sync_takes_files(str(old)), sync_takes_files(str(new))), (False, True))
        self.assertFalse(sync_takes_files(str(directory / "none")))


class AdoptedTimingTests(SynchronousTestCase):
    """TERM → KILL → backstop on a task.Clock, for a real process whose signals a fake control records."""

    def test_escalation_and_backstop(self) -> None:
        pid = os.posix_spawn("/bin/sleep", ["sleep", "1000"], {}, setsid=True)

        def reap() -> None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

        self.addCleanup(reap)
        identity = process_identity(pid)
        assert identity is not None
        clock = Clock()
        control = FakeProcessControl(None)
        adopted = AdoptedProcess(
            identity, Path(self.mktemp()), clock=clock, reactor=cast(IReactorFDSet, _NoReactor()), pidfd=None,
            kill_grace=10.0, backstop=60.0, control=control, poll_interval=1000.0,
        )  # fmt: skip
        done = adopted.terminate("test")
        self.assertEqual(control.signals, [(pid, signal.SIGTERM, 0.0)])
        clock.advance(10)
        self.assertEqual([s for _, s, _ in control.signals], [signal.SIGTERM, signal.SIGKILL])
        self.assertNoResult(done)
        clock.advance(60)
        outcome = self.successResultOf(done)
        self.assertEqual(
            (outcome.signal, outcome.terminated_by_pilot, outcome.lost), (signal.SIGKILL, True, True)
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(adopted.running)


class _NoReactor:
    """Only for the polling watch: nothing is ever registered."""

    def addReader(self, reader: object) -> None:
        raise AssertionError("no pidfd here")

    def removeReader(self, reader: object) -> None:
        raise AssertionError("no pidfd here")
