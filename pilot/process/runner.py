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
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.model.processes import ProcessOutcome

SETSID = shutil.which("setsid") or "/usr/bin/setsid"


class ProcessStartError(Exception):
    """The process could not be started at all (missing executable, unwritable output)."""


@dataclass(frozen=True)
class Descendant:
    """A process identified safely: pid plus start time (pids get recycled)."""

    pid: int
    create_time: float


class ProcessControl(Protocol):
    """How processes are found and signalled (the OS; a fake in tests)."""

    def signal_group(self, pgid: int, signum: int) -> None: ...

    def group_alive(self, pgid: int) -> bool: ...

    def descendants(self, pid: int) -> set[Descendant]: ...

    def descendants_below(self, pid: int, depth: int) -> set[Descendant]:
        """Descendants more than ``depth`` generations below ``pid`` (its children are 1)."""
        ...

    def group_members(self, pgid: int) -> set[Descendant]: ...

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
        """Whether the group has a member that is not a zombie (zombies are already dead)."""
        if pgid == os.getpgrp():
            return False
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return bool(self.group_members(pgid))

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
        found: set[Descendant] = set()
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                    found.add(Descendant(process.pid, process.create_time()))
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
        self._transport: IProcessTransport | None = None
        self._pid: int | None = None
        self._started: float | None = None
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
            out = os.open(self._stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            os.close(devnull)
            raise ProcessStartError(f"cannot create {self._stdout}: {exc.strerror}") from None
        try:
            err = (
                out
                if self._stderr == self._stdout
                else os.open(self._stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            )
        except OSError as exc:
            os.close(devnull)
            os.close(out)
            raise ProcessStartError(f"cannot create {self._stderr}: {exc.strerror}") from None
        try:
            self._transport = self._spawner.spawnProcess(
                _Protocol(self),
                SETSID,
                [SETSID, *self._argv],
                env=self._env,
                path=str(self._cwd),
                childFDs={0: devnull, 1: out, 2: err},
            )
        except OSError as exc:
            raise ProcessStartError(f"cannot start {self._argv[0]}: {exc}") from None
        finally:
            for fd in {devnull, out, err}:
                os.close(fd)
        self._started = self._clock.seconds()
        pid = self._transport.pid
        assert isinstance(pid, int)
        self._pid = pid
        self.log.debug("{name} started as pid {pid}", name=self.name, pid=pid, event="process.start")
        return pid

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id); kept after the process ended."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._transport is not None and self._outcome is None

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
            self._remember_descendants()
            if self.soft_stop_depth > 0 and self.pid is not None:
                # the leader is one of the launcher levels; its descendants start at generation 1
                for inner in self._control.descendants_below(self.pid, self.soft_stop_depth - 1):
                    self._control.signal_process(inner, signum)
            else:
                self._signal_all(signum)
            self._kill_call = self._clock.callLater(self.kill_grace, self._escalate)
        return self.wait()

    def kill(self) -> Deferred[ProcessOutcome]:
        """SIGKILL the group at once (a second stop request, or the grace is spent)."""
        if self._outcome is None and self._transport is not None:
            self._terminating = True
            self._remember_descendants()
            self._escalate()
        return self.wait()

    # -- internals -----------------------------------------------------------------

    def _escalate(self) -> None:
        self._kill_call = None
        self._signal_all(signal.SIGKILL)
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

    def _remember_descendants(self) -> None:
        """Record every live descendant, including any that left the process group."""
        if self.pid is not None:
            self._descendants |= self._control.descendants(self.pid)

    def _signal_all(self, signum: int) -> None:
        pid = self.pid
        if pid is None:
            return
        self._control.signal_group(pid, signum)
        for descendant in list(self._descendants):
            if not self._control.signal_process(descendant, signum):
                self._descendants.discard(descendant)

    def _ended(self, reason: Failure) -> None:
        exit_code: int | None = None
        signum: int | None = None
        value = reason.value
        if isinstance(value, ProcessDone):
            exit_code = 0
        elif isinstance(value, ProcessTerminated):
            exit_code = value.exitCode
            signum = value.signal
        # Whatever the leader left behind in its group (or outside it) goes now:
        # at once if we were killing it anyway, else TERM now and KILL after the grace.
        if (self.pid is not None and self._control.group_alive(self.pid)) or self._descendants:
            if self.pid is not None:
                self._descendants |= self._control.group_members(self.pid)
            self._signal_all(signal.SIGKILL if self._terminating else signal.SIGTERM)
            if not self._terminating:
                self._cleanup_call = self._clock.callLater(self.kill_grace, self._sweep)
        self._finish(exit_code, signum)

    def _sweep(self) -> None:
        self._cleanup_call = None
        self._signal_all(signal.SIGKILL)

    @property
    def cleaning_up(self) -> bool:
        """True while leftovers of an ended process still await their SIGKILL."""
        return self._cleanup_call is not None and self._cleanup_call.active()

    def sweep_now(self) -> None:
        """SIGKILL leftovers immediately (the pilot is shutting down)."""
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
            self._sweep()

    def _finish(self, exit_code: int | None, signum: int | None, *, lost: bool = False) -> None:
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
            ended=self._clock.seconds(),
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
