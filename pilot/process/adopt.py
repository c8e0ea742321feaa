"""A payload started by a pilot that has died since: watched, stopped and judged by its successor.

``AdoptedProcess.adopt(...)`` takes over a supervised payload (``pilot.process.supervisor``)
whose parent, a dead pilot, is gone: the supervisor has been reparented and runs on.
It is not this pilot's child, so Twisted never reaps it and no SIGCHLD arrives:

* **Watching without polling.**  ``os.pidfd_open(pid)`` (Linux >= 5.3) gives a file
  descriptor that becomes readable when the process ends, whoever its parent is; it is
  registered with the reactor as an ``IReadDescriptor``.  The identity (pid, start
  ticks, boot id: ``pilot.process.identity``) is checked right *after* the pidfd is
  opened: if it still matches, the pidfd names the very process the journal recorded,
  not a newcomer that got its pid.  Where pidfds do not exist (EL7's 3.10 kernel) the
  identity is checked on the clock every ``poll_interval`` seconds instead.
* **How it ended** comes from the supervisor's status file (``read_status``, matched to
  the supervisor's identity): exit code or signal as the pilot would have seen them.
  Without a status the outcome says so: ``exit_code`` and ``signal`` None and ``lost``
  True ("ended without a recorded status"), unless this pilot had sent SIGKILL, which
  then is the cause (a SIGKILL'ed supervisor writes nothing).
* **Stopping** signals only its process group, and only while the leader is the recorded
  process and still leads the recorded group: ``terminate`` sends SIGTERM (the
  supervisor survives it and records the payload's end), then SIGKILL after
  ``kill_grace`` on the injected clock, then gives up after ``backstop``, like
  ``ManagedProcess``.  When the leader has ended, what is left in its group gets SIGTERM
  and, ``kill_grace`` later, SIGKILL (at once if the pilot was stopping it), unless
  its pid already names another process (then the group id may no longer be ours).

What it offers of ``ManagedProcess``'s interface, so that the job's phases, monitors,
heartbeat and abort can use it in its place: ``pid``, ``name``, ``running``, ``outcome``,
``wait()``, ``terminate(reason, signum=)``, ``kill()``, ``cleaning_up``, ``sweep_now()``,
``kill_grace``, ``backstop``.  Not offered: ``start`` (it runs already), ``soft_stop_depth``
(its signal goes to the whole group), the remembered descendants that left the group
(nothing of the dead pilot's memory survives).

How the pilot uses this
-----------------------
A successor that finds ``payload.started`` without ``payload.ended`` in a dead pilot's
journal calls ``AdoptedProcess.adopt(pid=, pgid=, identity=, status_file=, clock=,
reactor=, kill_grace=)`` with what the journal recorded (``identity`` in its JSON form).
None means the payload is gone or its pid now names another process: the successor
then reads the status file (``read_status``), or reports the job lost.  Otherwise it
tracks the adopted process as the job's payload (heartbeats, server kill commands,
its own abort) and awaits ``wait()``.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.logs import pilot_observer
from pilot.model.processes import ProcessOutcome
from pilot.process.identity import ProcessIdentity, process_identity, same_process, still_running
from pilot.process.runner import OS_PROCESS_CONTROL, Descendant, ProcessControl
from pilot.process.supervisor import PayloadStatus, read_status
from pilot.util.threads import PoolStopped, ThreadRunner

T = TypeVar("T")


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; None where the kernel or Python has none.

    ``ProcessLookupError`` if there is no such process.
    """
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):  # no pidfd_open, or a seccomp filter refusing it
            return None
        raise
    return fd


@implementer(IReadDescriptor)
class _PidfdWatch:
    """The adopted process's pidfd in the reactor: readable once the process has ended."""

    def __init__(self, fd: int, ended: Callable[[], None]) -> None:
        self._fd: int | None = fd
        self._ended = ended

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def doRead(self) -> None:
        if self._fd is not None:
            self._ended()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "pidfd"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AdoptedProcess:
    """A supervised payload a dead pilot started; see the module docstring."""

    log = Logger(observer=pilot_observer)

    @classmethod
    def adopt(
        cls,
        *,
        pid: int,
        pgid: int | None,
        identity: ProcessIdentity | Mapping[str, Any] | None,
        status_file: Path,
        clock: IReactorTime,
        reactor: IReactorFDSet,
        kill_grace: float = 10.0,
        backstop: float = 60.0,
        name: str = "payload",
        control: ProcessControl = OS_PROCESS_CONTROL,
        in_thread: ThreadRunner | None = None,
        poll_interval: float = 1.0,
        use_pidfd: bool = True,
    ) -> AdoptedProcess | None:
        """Watch the process the journal recorded, if it is still that process; else None.

        ``identity``: a ``ProcessIdentity`` or its JSON form; without one nothing tells
        the recorded process from a newcomer with its pid, so nothing is adopted.
        ``pgid`` must be ``pid`` (None: the same), as for every process the pilot starts.
        ``ValueError`` for a malformed identity or group; ``use_pidfd=False`` watches by
        polling, as on kernels without pidfds.
        """
        if identity is None:
            cls.log.warn("{name} (pid {pid}): no identity recorded; not adopted", name=name, pid=pid)
            return None
        known = identity if isinstance(identity, ProcessIdentity) else ProcessIdentity.from_json(identity)
        if known.pid != pid:
            raise ValueError(f"identity of pid {known.pid} given for pid {pid}")
        if pgid is not None and pgid != pid:
            raise ValueError(f"pid {pid} does not lead its recorded process group {pgid}")
        try:
            fd = open_pidfd(pid) if use_pidfd else None
        except ProcessLookupError:
            return None
        # After the pidfd is open: if the identity still matches, the pidfd is that process's.
        try:
            ours = same_process(known) and os.getpgid(pid) == pid
        except ProcessLookupError:
            ours = False
        if not ours:
            if fd is not None:
                os.close(fd)
            return None
        return cls(
            known,
            status_file,
            clock=clock,
            reactor=reactor,
            pidfd=fd,
            kill_grace=kill_grace,
            backstop=backstop,
            name=name,
            control=control,
            in_thread=in_thread,
            poll_interval=poll_interval,
        )

    def __init__(
        self,
        identity: ProcessIdentity,
        status_file: Path,
        *,
        clock: IReactorTime,
        reactor: IReactorFDSet,
        pidfd: int | None,
        kill_grace: float = 10.0,
        backstop: float = 60.0,
        name: str = "payload",
        control: ProcessControl = OS_PROCESS_CONTROL,
        in_thread: ThreadRunner | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        """Use ``adopt``: it checks the identity and opens the pidfd (None: poll instead)."""
        self.identity = identity
        self.status_file = status_file
        self._clock = clock
        self._reactor = reactor
        self.kill_grace = kill_grace
        self.backstop = backstop
        self.name = name
        self._control = control
        self._in_thread = in_thread
        self._started = identity.started_at() or clock.seconds()
        self._leader_ended: float | None = None
        self._outcome: ProcessOutcome | None = None
        #: what the supervisor recorded, once the process has ended (None: nothing usable)
        self.status: PayloadStatus | None = None
        self._waiters: list[Deferred[ProcessOutcome]] = []
        self._terminating = False
        self._killed = False
        self._kill_call: IDelayedCall | None = None
        self._backstop_call: IDelayedCall | None = None
        self._cleanup_call: IDelayedCall | None = None
        self._watch: _PidfdWatch | None = None
        self._poll: LoopingCall | None = None
        self.log.info(
            "adopted {name} (pid {pid}), watched by {how}",
            name=name,
            pid=identity.pid,
            how="pidfd" if pidfd is not None else f"polling every {poll_interval} s",
            event="process.adopt",
        )
        if pidfd is not None:
            self._watch = _PidfdWatch(pidfd, self._leader_gone)
            reactor.addReader(self._watch)
        else:
            self._poll = LoopingCall(self._check)
            self._poll.clock = clock
            self._poll.start(poll_interval, now=True).addErrback(self._failed, "watching")

    # -- what ManagedProcess offers ------------------------------------------------

    @property
    def pid(self) -> int:
        """The supervisor's pid (also its process group id)."""
        return self.identity.pid

    @property
    def running(self) -> bool:
        """Not ended (its leftovers may still be being swept)."""
        return self._leader_ended is None and self._outcome is None

    @property
    def outcome(self) -> ProcessOutcome | None:
        return self._outcome

    def wait(self) -> Deferred[ProcessOutcome]:
        """A new Deferred that fires with the outcome once the process has ended."""
        if self._outcome is not None:
            return succeed(self._outcome)

        def forget(waiter: Deferred[ProcessOutcome]) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: Deferred[ProcessOutcome] = Deferred(forget)
        self._waiters.append(waiter)
        return waiter

    def terminate(self, reason: str = "", *, signum: int = signal.SIGTERM) -> Deferred[ProcessOutcome]:
        """``signum`` (SIGTERM) to the group now, SIGKILL after ``kill_grace``; fires when it has ended."""
        if self.running and not self._terminating:
            self._terminating = True
            self.log.info(
                "terminating adopted {name} (pid {pid}): {reason}",
                name=self.name,
                pid=self.pid,
                reason=reason or "requested",
                event="process.terminate",
            )
            self._kill_call = self._clock.callLater(self.kill_grace, self._escalate)
            self._signal_group(signum)
        return self.wait()

    def kill(self) -> Deferred[ProcessOutcome]:
        """SIGKILL the group at once."""
        if self._outcome is None:
            self._terminating = True
            if self.running:
                self._escalate()
        return self.wait()

    @property
    def cleaning_up(self) -> bool:
        """True while leftovers of the ended process still await their SIGKILL."""
        return self._cleanup_call is not None and self._cleanup_call.active()

    def sweep_now(self) -> Deferred[None]:
        """SIGKILL leftovers immediately (the pilot is shutting down); fires once signalled."""
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
            return self._sweep()
        return succeed(None)

    # -- internals -----------------------------------------------------------------

    def _blocking(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a file read or ``/proc`` walk in the runner's thread, or inline without one."""
        if self._in_thread is None:
            return maybeDeferred(f, *args)

        def inline_if_stopped(failure: Failure) -> T:
            failure.trap(PoolStopped)
            return f(*args)

        return self._in_thread(f, *args).addErrback(inline_if_stopped)

    def _failed(self, failure: Failure, what: str) -> None:
        self.log.failure(
            "adopted {name} (pid {pid}): {what} failed", failure, name=self.name, pid=self.pid, what=what
        )

    def _leads_its_group(self) -> bool:
        """The recorded process is alive and still leads the recorded group."""
        try:
            return still_running(self.identity) and os.getpgid(self.pid) == self.pid
        except ProcessLookupError:
            return False

    def _signal_group(self, signum: int) -> None:
        if self._leader_ended is None and self._leads_its_group():
            self._control.signal_group(self.pid, signum)

    def _escalate(self) -> None:
        self._kill_call = None
        self._killed = True
        self._signal_group(signal.SIGKILL)
        if self._outcome is None and self._backstop_call is None:
            self._backstop_call = self._clock.callLater(self.backstop, self._give_up)

    def _give_up(self) -> None:
        self._backstop_call = None
        if self._outcome is not None:
            return
        self.log.error(
            "adopted {name} (pid {pid}) did not end {backstop} s after SIGKILL; giving up on it",
            name=self.name,
            pid=self.pid,
            backstop=self.backstop,
            event="process.lost",
        )
        self._stop_watching()
        self._finish(ProcessOutcome(self.pid, None, signal.SIGKILL, self._started, self._clock.seconds(),
                                    terminated_by_pilot=True, lost=True))  # fmt: skip

    def _check(self) -> None:
        """The polling watch (no pidfd): has the process ended?"""
        if not still_running(self.identity):
            self._leader_gone()

    def _stop_watching(self) -> None:
        if self._watch is not None:
            self._reactor.removeReader(self._watch)
            self._watch.close()
            self._watch = None
        if self._poll is not None:
            if self._poll.running:
                self._poll.stop()
            self._poll = None

    def _leader_gone(self) -> None:
        """The supervisor has ended: read what it recorded, sweep its group, deliver the outcome."""
        if self._leader_ended is not None:
            return
        self._leader_ended = self._clock.seconds()
        self._stop_watching()
        for call in (self._kill_call, self._backstop_call):
            if call is not None and call.active():
                call.cancel()
        self._kill_call = self._backstop_call = None
        reading = self._blocking(partial(read_status, supervisor=self.identity), self.status_file)
        reading.addCallback(self._recorded)
        reading.addErrback(self._failed, "reading the status file")
        reading.addCallback(lambda _: self._sweep_leftovers())
        reading.addErrback(self._failed, "sweeping the leftovers")
        reading.addCallback(lambda _: self._finish(self._ended_outcome()))

    def _recorded(self, status: PayloadStatus | None) -> None:
        self.status = status

    def _ended_outcome(self) -> ProcessOutcome:
        ended = self._leader_ended
        assert ended is not None
        status = self.status
        if status is not None:
            return status.outcome(started=self._started, pid=self.pid, terminated_by_pilot=self._terminating)
        # a SIGKILL'ed supervisor records nothing; otherwise how it ended is unknown
        return ProcessOutcome(
            pid=self.pid,
            exit_code=None,
            signal=signal.SIGKILL if self._killed else None,
            started=self._started,
            ended=ended,
            terminated_by_pilot=self._terminating,
            lost=not self._killed,
        )

    def _group_still_ours(self) -> bool:
        """Nothing else has taken the group's id: the pid is free, or still our (zombie) leader."""
        now = process_identity(self.pid)
        return now is None or now == self.identity

    def _sweep_leftovers(self) -> Deferred[None] | None:
        if not self._group_still_ours() or not self._control.group_alive(self.pid):
            return None
        members = self._blocking(self._control.group_members, self.pid)
        return members.addCallback(self._signal_leftovers)

    def _signal_leftovers(self, members: set[Descendant]) -> None:
        if not members:
            return
        self.log.info(
            "adopted {name} (pid {pid}) ended; {count} processes of its group remain",
            name=self.name,
            pid=self.pid,
            count=len(members),
            event="process.leftovers",
        )
        if self._terminating:
            self._control.signal_group(self.pid, signal.SIGKILL)
            return
        self._control.signal_group(self.pid, signal.SIGTERM)
        self._cleanup_call = self._clock.callLater(self.kill_grace, self._sweep)

    def _sweep(self) -> Deferred[None]:
        self._cleanup_call = None
        if self._group_still_ours():
            self._control.signal_group(self.pid, signal.SIGKILL)
        return succeed(None)

    def _finish(self, outcome: ProcessOutcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        self.log.info(
            "adopted {name} (pid {pid}) ended: exit {exit_code}, signal {signal}{unknown}",
            name=self.name,
            pid=self.pid,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            unknown=" (no status recorded)" if outcome.lost else "",
            event="process.end",
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(outcome)
