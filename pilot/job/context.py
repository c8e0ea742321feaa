"""What the phases of one job share: the pilot's services, the job's state, and its stop switch.

``JobEnvironment`` is what the pilot hands every job (all injected, nothing global).
``JobContext`` is one job's state, filled in as its phases run: each phase reads what
earlier phases left and adds its own, so a phase can be tested alone with a context
built by hand.  ``JobControl`` is the job's stop switch: ``abort`` terminates the
process in flight or cancels the step in flight, and every phase passes through
``control.check()`` before it starts anything new, so nothing starts after an abort
except the final update (and the log tarball when the abort keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from pilot.config import PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.errors import JobErrors
from pilot.interfaces import IEventSource, IExperiment, IJobReporter
from pilot.job.staging import StagingSetup
from pilot.job.states import JobLifecycle, JobPhase
from pilot.job.summary import JobSummary
from pilot.job.updates import JobUpdates, PilotIdentity
from pilot.logs import pilot_observer
from pilot.model.files import ReportedFile
from pilot.model.job import Job
from pilot.model.processes import ProcessOutcome, ProcessRecord
from pilot.model.states import ServerState
from pilot.monitor.payload_analysis import PayloadAnalysis
from pilot.monitor.status import StatusFile
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl
from pilot.queuedata import QueueData
from pilot.server.client import JobUpdate, UpdateResult
from pilot.util.journal import Journal
from pilot.util.records import record
from pilot.util.secrets import SecretValues
from pilot.util.threads import ThreadRunner

if TYPE_CHECKING:
    from pilot.job.heartbeat import Heartbeat
    from pilot.job.journal import JobJournal
    from pilot.job.launcher import ProcessLauncher
    from pilot.job.staging import JobStaging
    from pilot.monitor.prmon_process import ExternalPrmon
    from pilot.monitor.watcher import JobMonitor, MonitorReport

T = TypeVar("T")

log = Logger(observer=pilot_observer)

#: Fetches a small document (a pre-process script, queuedata) by URL, into memory.
Download = Callable[[str], Awaitable[bytes]]
#: Fetches a URL into a file, streaming (a transformation); returns the file's path.
FetchFile = Callable[[str, Path], Awaitable[Path]]


@record(frozen=True)
class JobEnvironment:
    """Everything a job needs from the pilot (all injected, nothing global)."""

    reporter: IJobReporter
    download: Download
    fetch_file: FetchFile
    clock: IReactorTime
    spawner: IReactorProcess
    in_thread: ThreadRunner
    config: PilotConfig
    queuedata: QueueData
    experiment: IExperiment
    identity: PilotIdentity
    pilot_dir: Path
    pilot_environ: Mapping[str, str]
    deadline: Callable[[], float]
    on_softkill: Callable[[], None] = lambda: None
    process_control: ProcessControl = OS_PROCESS_CONTROL
    staging: StagingSetup = field(default_factory=StagingSetup)
    status: StatusFile | None = None
    wall: Callable[[], float] = time.time
    #: Every secret value the pilot knows (its own and the jobs'): redacted by value.
    secrets: SecretValues = field(default_factory=SecretValues)
    #: Where event-service jobs get their ranges (None: this pilot cannot run them).
    event_source: IEventSource | None = None
    #: The pilot's journal (``pilot.util.journal``): what a successor needs to finish its jobs.
    journal: Journal | None = None


class JobControl:
    """One job's stop switch (see the module docstring)."""

    def __init__(self) -> None:
        self.aborted = False
        #: Whether the log tarball is still made after the abort (a server kill keeps it).
        self.keep_log = True
        self._step: Deferred[Any] | None = None
        self._process: ManagedProcess | None = None

    def check(self) -> None:
        """Raise CancelledError once the job has been aborted: call before starting anything."""
        if self.aborted:
            raise CancelledError()

    def track(self, process: ManagedProcess) -> None:
        """``process`` is the one an abort must stop."""
        self._process = process

    @property
    def process(self) -> ManagedProcess | None:
        """The process most recently tracked (the one an abort would stop)."""
        return self._process

    async def guard(self, coroutine: Coroutine[Any, Any, T], *, after_abort: bool = False) -> T:
        """Await a step so that an abort cancels it.

        A step refuses to start once the job is aborted, unless ``after_abort`` (the log
        tarball of a job the server killed): such a step is still cancelled by a later
        abort (a signal).
        """
        if self.aborted and not after_abort:
            coroutine.close()
            raise CancelledError()
        step: Deferred[T] = Deferred.fromCoroutine(coroutine)
        self._step = step
        try:
            return await step
        finally:
            self._step = None

    def abort(self, *, keep_log: bool, kill_now: bool, reason: str) -> bool:
        """Stop what runs now; True if this is the job's first abort."""
        first = not self.aborted
        self.aborted = True
        self.keep_log = self.keep_log and keep_log
        process = self._process
        if process is not None and process.running:
            if kill_now:
                process.kill()
            else:
                process.terminate(reason)
        elif self._step is not None:
            self._step.cancel()
        return first


async def _no_beat() -> None:
    return None


class JobContext:
    """One job's state, shared by its phases (see the module docstring)."""

    def __init__(
        self,
        env: JobEnvironment,
        job: Job,
        summary: JobSummary,
        *,
        errors: JobErrors | None = None,
        getjob_seconds: float = 0.0,
    ) -> None:
        self.env = env
        self.job = job
        self.summary = summary
        self.errors = errors or JobErrors()
        self.control = JobControl()
        self.lifecycle = JobLifecycle(job.panda_id, env.clock)
        self.updates = JobUpdates(
            env.reporter, env.clock, job.panda_id, job.attempt_nr, env.identity, secrets=env.secrets
        )
        self.getjob_seconds = getjob_seconds
        self.final_deadline: float | None = None
        # filled in by the phases, in order
        self.workdir: Path | None = None
        self.launcher: ProcessLauncher | None = None
        self.staging: JobStaging | None = None
        self.heartbeat: Heartbeat | None = None
        self.transformation = job.transformation
        self.monitor: JobMonitor | None = None
        self.monitor_report: MonitorReport | None = None
        self.prmon: ExternalPrmon | None = None
        self.payload: ManagedProcess | None = None
        self.outcome: ProcessOutcome | None = None
        self.analysis: PayloadAnalysis | None = None
        self.payload_cpu = 0.0
        #: Events processed, when the pilot counted them (event service); else the payload's report.
        self.n_events: int | None = None
        self.max_rss_kb = 0
        self.reported: list[ReportedFile] = []
        self.pending: list[Deferred[None]] = []
        #: Called when the job's phase changes or its monitor learns something new.
        self.on_change: Callable[[], None] = lambda: None
        #: Acts on the server's commands in an update's reply (set by the job run).
        self.on_commands: Callable[[UpdateResult], None] = lambda result: None
        #: The heartbeat's body (set by the job run).
        self.beat: Callable[[], Awaitable[None]] = _no_beat
        #: Called on a softkill, besides the pilot's own (an event-service job stops taking ranges).
        self.softkill_hooks: list[Callable[[], None]] = []
        #: This job's entries in the pilot's journal (None without a journal).
        self.journal: JobJournal | None = None

    # -- stopping ------------------------------------------------------------------

    def abort(
        self,
        code: ErrorCode,
        detail: str,
        *,
        keep_log: bool = False,
        final_deadline: float | None = None,
        kill_now: bool = False,
    ) -> None:
        """Stop this job for ``code``: kill the process in flight or cancel the step in flight.

        The first abort's code is the job's error (it outranks what the abort causes);
        ``final_deadline`` brings the final update's deadline closer (a signal).
        """
        if final_deadline is not None:
            self.final_deadline = (
                final_deadline if self.final_deadline is None else min(self.final_deadline, final_deadline)
            )
            self.updates.hurry()
        if self.lifecycle.is_terminal:
            return
        first = not self.control.aborted
        if first:
            self.errors.record(code, detail, priority=True)
            log.warn(
                "job {pandaid}: aborting: {code} {detail}",
                pandaid=self.job.panda_id,
                code=code.name,
                detail=detail,
                event="job.abort",
            )
        self.control.abort(keep_log=keep_log, kill_now=kill_now, reason=code.name)

    # -- phases and updates --------------------------------------------------------

    def advance(self, phase: JobPhase) -> ServerState | None:
        """Enter ``phase``; returns the server update the transition calls for."""
        state = self.lifecycle.advance(phase)
        if self.journal is not None:
            self.journal.phase(phase.value)
        self.on_change()
        return state

    def deadline(self) -> float:
        """When the final update must have been delivered (moves closer on a signal)."""
        return self.final_deadline if self.final_deadline is not None else self.env.deadline()

    async def send(self, state: ServerState, fields: JobUpdate | None = None) -> UpdateResult | None:
        """A non-final update; the server's commands in the reply are acted upon."""
        result = await self.updates.send(state, fields)
        if result is not None:
            self.on_commands(result)
        return result

    def send_in_background(self, state: ServerState) -> None:
        """Send an update without waiting for it (the final update waits for it)."""

        async def send() -> None:
            try:
                await self.send(state)
            except CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a lost non-final update must not fail the job
                log.failure(
                    "job {pandaid}: {state} update failed", pandaid=self.job.panda_id, state=state.value
                )

        self.pending.append(Deferred.fromCoroutine(send()))

    def record(self, name: str, role: str) -> ProcessRecord:
        """A new process record for the summary (stdout/stderr files named after the process)."""
        record = ProcessRecord(name=name, role=role, stdout=f"{name}.stdout", stderr=f"{name}.stderr")
        self.summary.processes.append(record)
        return record

    def staged_in(self) -> list[str]:
        return self.staging.staged_in if self.staging is not None else []
