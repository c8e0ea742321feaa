"""Child processes the pilot starts: own process group, output to files, sure kills.

Every payload (and, later, every copytool and utility) runs through
``ManagedProcess``:

* It is started through ``setsid`` so that it leads a new session and process group
  whose id equals its pid; killing the group reaches everything it forked, including
  background children, without the pilot ever signalling a process it did not start.
* stdout and stderr go straight to files (no pipes through the reactor, so a
  background grandchild holding a pipe cannot delay the exit notification).
* ``terminate`` sends SIGTERM to the group, then SIGKILL after ``kill_grace``
  seconds, on the injected clock.  Descendants that left the group (``setsid`` of
  their own) are found with psutil at kill time and signalled too, checked by
  their start time so a recycled pid is never hit.  After the leader exits, the
  group is signalled once more so that nothing it left behind survives.
* A backstop fires if the process does not go away even after SIGKILL (a process
  stuck in uninterruptible I/O), so the pilot is never stuck waiting forever.
* Finding descendants and group members walks ``/proc`` (60-250 ms with 2,000
  processes), and signalling remembered descendants one by one checks each one's
  start time (120 ms for 2,000).  Given a ``ThreadRunner`` (``in_thread``), all of that
  runs in its worker thread; without one it runs inline, as before.  ``killpg``
  stays on the reactor: it is one system call, and when 2,000 members die of it
  the kernel's work (~100 ms) happens with the GIL held (``os.killpg`` does not
  release it), so a worker thread would stall the reactor just the same.  Either
  way the outcome is delivered only after the leftovers of an ended leader have
  been signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.model.processes import ProcessOutcome
from pilot.util.records import record
from pilot.util.threads import PoolStopped, ThreadRunner

T = TypeVar("T")

SETSID = shutil.which("setsid") or "/usr/bin/setsid"
ENV = shutil.which("env") or "/usr/bin/env"


def env_has_chdir(path: str) -> bool:
    """Whether ``path`` is a GNU ``env`` with ``--chdir`` (coreutils >= 8.28; EL7 has 8.22).

    Told by its own help text, so that no process is started to find out; anything
    else (an older or a busybox ``env``) makes the runner fall back to Twisted's chdir.
    """
    try:
        with open(path, "rb") as binary:
            return b"--chdir=DIR" in binary.read(1 << 20)
    except OSError:
        return False


ENV_CHDIR = env_has_chdir(ENV)


def launch_argv(argv: Sequence[str], cwd: Path) -> tuple[str, list[str], str | None]:
    """The executable, argv and working directory handed to ``spawnProcess``.

    Every process starts in a session (and process group) of its own through
    ``setsid``, so that the pilot can signal exactly what it started.  The working
    directory is set by ``env --chdir`` rather than by Twisted's ``path``: Twisted
    then starts the child with ``posix_spawn`` instead of ``fork``, which spares the
    pilot the copy of its page tables and the copy-on-write faults after every start
    (``bench/pilotcost``).  ``env`` reads its first word without ``=`` as the command:
    that is ``setsid``, so the payload's own argv is never taken for a variable.
    """
    if not ENV_CHDIR or "=" in SETSID:  # no --chdir, or a path env reads as a variable
        return SETSID, [SETSID, *argv], str(cwd)
    return ENV, [ENV, f"--chdir={cwd}", SETSID, *argv], None


class ProcessStartError(Exception):
    """The process could not be started at all (missing executable, unwritable output)."""


@record(frozen=True)
class Descendant:
    """A process identified safely: pid plus start time (pids get recycled)."""

    pid: int
    create_time: float


class ProcessControl(Protocol):
    """How processes are found and signalled (the OS; a fake in tests)."""

    def signal_group(self, pgid: int, signum: int) -> None: ...

    def group_alive(self, pgid: int) -> bool:
        """Whether the group may still have members (cheap: zombies may count)."""
        ...

    def descendants(self, pid: int) -> set[Descendant]: ...

    def descendants_below(self, pid: int, depth: int) -> set[Descendant]:
        """Descendants more than ``depth`` generations below ``pid`` (its children are 1)."""
        ...

    def group_members(self, pgid: int) -> set[Descendant]:
        """The group's live members (a ``/proc`` walk: call it where blocking is allowed)."""
        ...

    def signal_process(self, process: Descendant, signum: int) -> bool: ...


class OSProcessControl:
    """The real thing: ``killpg`` and psutil, never touching the pilot's own group."""

    def signal_group(self, pgid: int, signum: int) -> None:
        if pgid == os.getpgrp():
            return
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self, pgid: int) -> bool:
        """Whether the group has any member, zombies included: one ``killpg(0)``, no scan."""
        if pgid == os.getpgrp():
            return False
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def descendants(self, pid: int) -> set[Descendant]:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return set()
        found: set[Descendant] = set()
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.add(Descendant(child.pid, child.create_time()))
            except psutil.Error:
                continue
        return found

    def descendants_below(self, pid: int, depth: int) -> set[Descendant]:
        try:
            level = [psutil.Process(pid)]
        except psutil.Error:
            return set()
        found: set[Descendant] = set()
        generation = 0
        while level:
            generation += 1
            children: list[psutil.Process] = []
            for process in level:
                try:
                    children += process.children()
                except psutil.Error:
                    continue
            for child in children:
                if generation > depth:
                    try:
                        if child.status() != psutil.STATUS_ZOMBIE:
                            found.add(Descendant(child.pid, child.create_time()))
                    except psutil.Error:
                        continue
            level = children
        return found

    def group_members(self, pgid: int) -> set[Descendant]:
        """Live members of group ``pgid``: ``getpgid`` of every pid, psutil only for members.

        A group that is gone costs one ``killpg(0)``; otherwise the walk costs ~4 ms
        per 2,000 other processes on the node (``getpgid`` is a bare system call), plus
        ~70 µs per member (status and start time from ``/proc``).
        """
        if not self.group_alive(pgid):
            return set()
        found: set[Descendant] = set()
        for pid in psutil.pids():
            try:
                if os.getpgid(pid) != pgid:
                    continue
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.add(Descendant(pid, process.create_time()))
            except (OSError, psutil.Error):
                continue
        return found

    def signal_process(self, process: Descendant, signum: int) -> bool:
        try:
            target = psutil.Process(process.pid)
            if target.create_time() != process.create_time:
                return False
            target.send_signal(signum)
        except psutil.Error:
            return False
        return True


OS_PROCESS_CONTROL = OSProcessControl()


class _Protocol(ProcessProtocol):
    def __init__(self, owner: ManagedProcess) -> None:
        self._owner = owner

    def connectionMade(self) -> None:
        # Called inside spawnProcess, before Twisted's first reap: a child that has
        # already exited (posix_spawn returns only after the exec) ends right there.
        assert self.transport is not None
        self._owner._spawned(self.transport)

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(reason)


class ManagedProcess:
    """One child process in its own process group; see the module docstring."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        spawner: IReactorProcess,
        clock: IReactorTime,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
        kill_grace: float = 10.0,
        backstop: float = 60.0,
        name: str = "process",
        control: ProcessControl = OS_PROCESS_CONTROL,
        soft_stop_depth: int = 0,
        in_thread: ThreadRunner | None = None,
        output_mode: int = 0o600,
    ) -> None:
        if not argv:
            raise ValueError("empty argv")
        self._spawner = spawner
        self._clock = clock
        self._argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._stdout = stdout
        self._stderr = stderr
        self.kill_grace = kill_grace
        self.backstop = backstop
        self.name = name
        self._control = control
        #: Launcher levels (the leader and as many generations below it as needed, e.g. bwrap
        #: and its namespace init = 2) spared the soft stop signal: a container
        #: launcher such as bwrap would die of it and SIGKILL the sandbox, robbing the
        #: payload of its grace period.  They still get the SIGKILL of the escalation.
        self.soft_stop_depth = soft_stop_depth
        #: Where ``/proc`` walks and per-process signalling run; None: inline (blocking).
        self._in_thread = in_thread
        #: stdout/stderr files are the pilot user's alone unless the site says otherwise
        self._output_mode = output_mode
        self._transport: IProcessTransport | None = None
        self._pid: int | None = None
        self._started: float | None = None
        self._leader_ended: float | None = None
        self._outcome: ProcessOutcome | None = None
        self._waiters: list[Deferred[ProcessOutcome]] = []
        self._terminating = False
        self._kill_call: IDelayedCall | None = None
        self._backstop_call: IDelayedCall | None = None
        self._cleanup_call: IDelayedCall | None = None
        self._descendants: set[Descendant] = set()

    # -- life ----------------------------------------------------------------------

    def start(self) -> int:
        """Spawn the process; returns its pid (also its process group id)."""
        if self._transport is not None:
            raise RuntimeError(f"{self.name} already started")
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            out = os.open(
                self._stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self._output_mode
            )
        except OSError as exc:
            os.close(devnull)
            raise ProcessStartError(f"cannot create {self._stdout}: {exc.strerror}") from None
        try:
            err = (
                out
                if self._stderr == self._stdout
                else os.open(
                    self._stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self._output_mode
                )
            )
        except OSError as exc:
            os.close(devnull)
            os.close(out)
            raise ProcessStartError(f"cannot create {self._stderr}: {exc.strerror}") from None
        try:
            executable, argv, path = launch_argv(self._argv, self._cwd)
            transport = self._spawner.spawnProcess(
                _Protocol(self),
                executable,
                argv,
                env=self._env,
                path=path,
                childFDs={0: devnull, 1: out, 2: err},
            )
        except OSError as exc:
            raise ProcessStartError(f"cannot start {self._argv[0]}: {exc}") from None
        finally:
            for fd in {devnull, out, err}:
                os.close(fd)
        if self._transport is None:  # a spawner that does not connect its protocol
            self._spawned(transport)
        assert self._pid is not None
        return self._pid

    def _spawned(self, transport: IProcessTransport) -> None:
        """The child exists: note its transport, pid and start time (once)."""
        if self._transport is not None:
            return
        pid = transport.pid
        assert isinstance(pid, int)
        self._transport = transport
        self._started = self._clock.seconds()
        self._pid = pid
        self.log.debug("{name} started as pid {pid}", name=self.name, pid=pid, event="process.start")

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id); kept after the process ended."""
        return self._pid

    @property
    def running(self) -> bool:
        """Started and its leader not ended (its leftovers may still be being swept)."""
        return self._transport is not None and self._leader_ended is None and self._outcome is None

    @property
    def outcome(self) -> ProcessOutcome | None:
        return self._outcome

    def wait(self) -> Deferred[ProcessOutcome]:
        """A new Deferred that fires with the outcome once the process has ended."""
        waiter: Deferred[ProcessOutcome] = Deferred()
        if self._outcome is not None:
            waiter.callback(self._outcome)
        else:
            self._waiters.append(waiter)
        return waiter

    def terminate(self, reason: str = "", *, signum: int = signal.SIGTERM) -> Deferred[ProcessOutcome]:
        """``signum`` (SIGTERM) to the group now, SIGKILL after ``kill_grace``; fires when it has ended."""
        if self._outcome is None and self._transport is not None and not self._terminating:
            self._terminating = True
            self.log.info(
                "terminating {name} (pid {pid}): {reason}",
                name=self.name,
                pid=self.pid,
                reason=reason or "requested",
                event="process.terminate",
            )
            self._kill_call = self._clock.callLater(self.kill_grace, self._escalate)
            stopping = self._remember_descendants()
            if self.soft_stop_depth > 0:
                stopping.addCallback(lambda _: self._blocking(self._signal_inner, signum))
            else:
                stopping.addCallback(lambda _: self._signal_all(signum))
            stopping.addErrback(self._failed, "terminate")
        return self.wait()

    def kill(self) -> Deferred[ProcessOutcome]:
        """SIGKILL the group at once (a second stop request, or the grace is spent)."""
        if self._outcome is None and self._transport is not None:
            self._terminating = True
            self._remember_descendants().addCallback(lambda _: self._escalate())
        return self.wait()

    # -- internals -----------------------------------------------------------------

    def _blocking(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a ``/proc`` walk or per-process signalling: in the runner's thread, or inline.

        A pool already stopped (the pilot is shutting down) must not leave processes
        behind: then the call runs inline after all.
        """
        if self._in_thread is None:
            return maybeDeferred(f, *args)

        def inline_if_stopped(failure: Failure) -> T:
            failure.trap(PoolStopped)
            return f(*args)

        return self._in_thread(f, *args).addErrback(inline_if_stopped)

    def _failed(self, failure: Failure, what: str) -> None:
        self.log.failure(
            "{name} (pid {pid}): {what} failed", failure, name=self.name, pid=self.pid, what=what
        )

    def _signal_inner(self, signum: int) -> None:
        """Blocking: the soft stop for everything below the launcher levels."""
        assert self.pid is not None
        # the leader is one of the launcher levels; its descendants start at generation 1
        for inner in self._control.descendants_below(self.pid, self.soft_stop_depth - 1):
            self._control.signal_process(inner, signum)

    def _escalate(self) -> None:
        self._kill_call = None
        self._signal_all(signal.SIGKILL).addErrback(self._failed, "SIGKILL")
        if self._outcome is None and self._backstop_call is None:
            self._backstop_call = self._clock.callLater(self.backstop, self._give_up)

    def _give_up(self) -> None:
        self._backstop_call = None
        if self._outcome is not None:
            return
        self.log.error(
            "{name} (pid {pid}) did not end {backstop} s after SIGKILL; giving up on it",
            name=self.name,
            pid=self.pid,
            backstop=self.backstop,
            event="process.lost",
        )
        self._finish(None, signal.SIGKILL, lost=True)

    def _remember_descendants(self) -> Deferred[None]:
        """Record every live descendant, including any that left the process group."""
        if self.pid is None:
            return succeed(None)
        return self._blocking(self._control.descendants, self.pid).addCallback(self._remember)

    def _remember(self, found: set[Descendant]) -> None:
        self._descendants |= found

    def _signal_all(self, signum: int) -> Deferred[None]:
        """``signum`` to the group (now) and to each remembered descendant (maybe in the runner)."""
        pid = self.pid
        if pid is None:
            return succeed(None)
        self._control.signal_group(pid, signum)
        if not self._descendants:
            return succeed(None)
        signalling = self._blocking(self._signal_each, frozenset(self._descendants), signum)
        return signalling.addCallback(self._forget)

    def _signal_each(self, known: frozenset[Descendant], signum: int) -> set[Descendant]:
        """Blocking: signal each of ``known``; returns those that are gone."""
        return {d for d in known if not self._control.signal_process(d, signum)}

    def _forget(self, gone: set[Descendant]) -> None:
        self._descendants -= gone

    def _ended(self, reason: Failure) -> None:
        exit_code: int | None = None
        signum: int | None = None
        value = reason.value
        if isinstance(value, ProcessDone):
            exit_code = 0
        elif isinstance(value, ProcessTerminated):
            exit_code = value.exitCode
            signum = value.signal
        ended = self._leader_ended = self._clock.seconds()
        pid = self.pid
        # Whatever the leader left behind in its group (or outside it) goes now:
        # at once if we were killing it anyway, else TERM now and KILL after the grace.
        if pid is None or not (self._control.group_alive(pid) or self._descendants):
            self._finish(exit_code, signum)  # the common case: nothing left, no scan
            return
        sweeping = self._blocking(self._control.group_members, pid)
        sweeping.addCallback(self._sweep_leftovers)
        sweeping.addErrback(self._failed, "sweeping the leftovers")
        sweeping.addCallback(lambda _: self._finish(exit_code, signum, ended=ended))

    def _sweep_leftovers(self, members: set[Descendant]) -> Deferred[None]:
        self._descendants |= members
        if not self._descendants:
            return succeed(None)
        if not self._terminating:
            self._cleanup_call = self._clock.callLater(self.kill_grace, self._sweep)
        return self._signal_all(signal.SIGKILL if self._terminating else signal.SIGTERM)

    def _sweep(self) -> Deferred[None]:
        self._cleanup_call = None
        sweeping = self._signal_all(signal.SIGKILL)
        sweeping.addErrback(self._failed, "the final SIGKILL of the leftovers")
        return sweeping

    @property
    def cleaning_up(self) -> bool:
        """True while leftovers of an ended process still await their SIGKILL."""
        return self._cleanup_call is not None and self._cleanup_call.active()

    def sweep_now(self) -> Deferred[None]:
        """SIGKILL leftovers immediately (the pilot is shutting down); fires once signalled."""
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
            return self._sweep()
        return succeed(None)

    def leftovers_gone(self) -> None:
        """Cancel the pending SIGKILL of the leftovers: the job's final sweep saw them end.

        Signalling the group then could hit a recycled group id (``pilot.process.sweep``).
        """
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
        self._cleanup_call = None

    def _finish(
        self, exit_code: int | None, signum: int | None, *, lost: bool = False, ended: float | None = None
    ) -> None:
        if self._outcome is not None:
            return
        for call in (self._kill_call, self._backstop_call):
            if call is not None and call.active():
                call.cancel()
        self._kill_call = self._backstop_call = None
        assert self._started is not None and self.pid is not None
        self._outcome = ProcessOutcome(
            pid=self.pid,
            exit_code=exit_code,
            signal=signum,
            started=self._started,
            ended=self._clock.seconds() if ended is None else ended,
            terminated_by_pilot=self._terminating,
            lost=lost,
        )
        self.log.debug(
            "{name} (pid {pid}) ended: exit {exit_code}, signal {signal}",
            name=self.name,
            pid=self.pid,
            exit_code=exit_code,
            signal=signum,
            event="process.end",
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._outcome)
