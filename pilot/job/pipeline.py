"""One job, from definition to final update: setup → stage-in → execute → stage-out → finish.

``JobRun.run`` validates the definition, then runs the phases of ``pilot.job.phases``
in order over one ``JobContext``; there are no queues to poll and no sleeps.
``JobRun.abort`` (a signal, the end of the pilot's lifetime, a kill from the server)
records the reason with priority and stops what runs now; the run then falls
through to the finish phase, whose final update is always sent.

Errors are values: a phase raises ``PilotError`` with PanDA's code; the run records
it and reports the job ``failed`` (or ``holding`` when recoverable).  An ``OSError``
escaping a phase is a local file problem (NOLOCALSPACE when the disk is full).
Anything else is a bug, reported as UNKNOWNEXCEPTION with the traceback in the log,
and the pilot goes on with the next job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import JobErrors, PilotError, local_file_error
from pilot.job.beats import JobBeats
from pilot.job.context import JobContext, JobEnvironment
from pilot.job.phases.execute import ExecutePhase
from pilot.job.phases.finish import FinishPhase, deliver_final
from pilot.job.phases.setup import SetupPhase
from pilot.job.phases.staging import StageInPhase, StageOutPhase
from pilot.job.summary import JobSummary, utc_text
from pilot.job.updates import JobUpdates
from pilot.logs import pilot_observer
from pilot.model.job import SECRET_KEYS, Job, JobDefinitionError, attempt_nr_of, panda_id_of, parse_job
from pilot.model.states import ServerState
from pilot.server.client import JobUpdate

log = Logger(observer=pilot_observer)


class Phase(Protocol):
    async def run(self) -> None: ...


class PhaseFactory(Protocol):
    def __call__(self, ctx: JobContext) -> Phase: ...


#: The phases before the finish, in order.
PHASES: tuple[PhaseFactory, ...] = (SetupPhase, StageInPhase, ExecutePhase, StageOutPhase)


class JobRun:
    """One job's run; see the module docstring."""

    def __init__(
        self, env: JobEnvironment, definition: Mapping[str, Any], *, getjob_seconds: float = 0.0
    ) -> None:
        self.env = env
        self.definition = definition
        self.getjob_seconds = getjob_seconds
        self.summary = JobSummary(
            panda_id=panda_id_of(definition), state="received", received_at=env.clock.seconds()
        )
        self.errors = JobErrors()
        self.ctx: JobContext | None = None
        self._early_abort: tuple[ErrorCode, str] | None = None
        self._early_deadline: float | None = None
        self._reject_updates: JobUpdates | None = None

    @property
    def panda_id(self) -> int | None:
        return self.summary.panda_id

    def abort(
        self,
        code: ErrorCode,
        detail: str,
        *,
        keep_log: bool = False,
        final_deadline: float | None = None,
        kill_now: bool = False,
    ) -> None:
        """Stop this job for ``code`` (see ``JobContext.abort``)."""
        if self.ctx is None:  # still validating the definition, or reporting it rejected
            self._early_abort = self._early_abort or (code, detail)
            if final_deadline is not None:
                self._early_deadline = min(self._early_deadline or final_deadline, final_deadline)
                if self._reject_updates is not None:
                    self._reject_updates.hurry()
            return
        self.ctx.abort(code, detail, keep_log=keep_log, final_deadline=final_deadline, kill_now=kill_now)

    async def run(self) -> JobSummary:
        try:
            job = parse_job(self.definition)
        except JobDefinitionError as exc:
            return await self._reject(exc)
        for key in SECRET_KEYS:
            self.env.secrets.add_document(job.raw.get(key))  # redacted wherever they show
        ctx = JobContext(self.env, job, self.summary, errors=self.errors, getjob_seconds=self.getjob_seconds)
        JobBeats(ctx)
        if self.env.journal is not None:
            from pilot.job.journal import JobJournal

            ctx.journal = JobJournal(self.env.journal, self.env.in_thread, job.panda_id)
            await ctx.journal.acquired(self.definition, job.attempt_nr, None)
        self.ctx = ctx
        if self._early_abort is not None:
            ctx.abort(*self._early_abort, final_deadline=self._early_deadline)
        log.info(
            "job {pandaid} (attempt {attempt}) received: {transformation}",
            pandaid=job.panda_id,
            attempt=job.attempt_nr,
            transformation=job.transformation,
            event="job.received",
        )
        await self._run_phases(ctx, job)
        return await FinishPhase(ctx).run()

    async def _run_phases(self, ctx: JobContext, job: Job) -> None:
        try:
            for phase in PHASES:
                await phase(ctx).run()
        except PilotError as exc:
            ctx.errors.record_exception(exc)
        except CancelledError:
            if not ctx.control.aborted:
                raise
        except OSError as exc:
            ctx.errors.record_exception(local_file_error(exc, "local file operation failed"))
            log.failure("job {pandaid}: local file error", pandaid=job.panda_id)
        except Exception as exc:  # noqa: BLE001 - a pilot bug must not lose the job
            log.failure("job {pandaid}: unexpected error", pandaid=job.panda_id)
            ctx.errors.record(ErrorCode.UNKNOWNEXCEPTION, f"{type(exc).__name__}: {exc}")

    def _reject_deadline(self) -> float:
        return self._early_deadline if self._early_deadline is not None else self.env.deadline()

    async def _reject(self, error: JobDefinitionError) -> JobSummary:
        """Report (if possible) a job whose definition cannot be run; never raises."""
        self.errors.record_exception(error)
        summary = self.summary
        first = self.errors.first
        assert first is not None
        summary.state = "failed"
        summary.pilot_error_code = int(first.code)
        summary.pilot_error_diag = first.diag
        log.error(
            "job {pandaid}: rejected: {diag}", pandaid=summary.panda_id, diag=first.diag, event="job.rejected"
        )
        panda_id = summary.panda_id
        if panda_id is None:
            summary.state = "rejected"
            summary.ended_at = self.env.clock.seconds()
            return summary
        updates = JobUpdates(
            self.env.reporter,
            self.env.clock,
            panda_id,
            attempt_nr_of(self.definition),
            self.env.identity,
            secrets=self.env.secrets,
        )
        self._reject_updates = updates
        fields = JobUpdate(
            job_id=panda_id,
            state=ServerState.FAILED.value,
            pilot_error_code=int(first.code),
            pilot_error_diag=first.diag,
            end_time=utc_text(self.env.clock.seconds()),
        )
        await deliver_final(updates, ServerState.FAILED, fields, self._reject_deadline, summary)
        summary.ended_at = self.env.clock.seconds()
        return summary
