"""Finishing a dead pilot's job: adopt its payload or take its recorded end, stage out, report.

``ResumedJob`` carries out what ``pilot.job.recovery.decide`` found for one job of a
claimed journal.  The job's own state (its work directory, the transfers already
made, the supervisor's status file) is where the dead pilot left it; this pilot
journals the job in its own journal as it goes, so that if it dies too, its own
successor can go on from there.

* ``RESEND_FINAL``: the recorded final update is sent again (it was journaled before
  it went out, redacted), until the server acknowledges it or the deadline passes.
* ``ADOPT``: the payload still runs (same pid, start time and boot): it is watched
  through a pidfd, heartbeats go out meanwhile, and the server's kill commands and
  this pilot's own abort reach its process group; then as ``FINISH``.
* ``FINISH``: the payload's end is known (journaled, or written by its supervisor):
  it is judged as any payload is, outputs are staged out (the transfer record skips
  what is already on storage with the right checksum), the log tarball is made, and
  the final update goes out.
* ``LOST``: the job is reported failed with PREEMPTION: the payload never started, or
  its end cannot be known (the node rebooted); it is never run again here.

Whatever else of the job is still running (a pre-process, a utility, a coprocess: they
carry the job's marker, journaled as ``job.scope``) is stopped: on ``LOST``,
``RESEND_FINAL`` and ``NOTHING`` before the report, on ``FINISH`` and ``ADOPT`` by the
final sweep of the resumed job's scope, which takes the dead pilot's marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import JobErrors, PilotError, local_file_error
from pilot.job.beats import JobBeats
from pilot.job.context import JobContext, JobEnvironment
from pilot.job.journal import JobJournal
from pilot.job.phases.finish import FinishPhase, deliver_final
from pilot.job.phases.payload import judge_payload
from pilot.job.phases.setup import attach_tools, start_heartbeat
from pilot.job.phases.staging import StageOutPhase
from pilot.job.recovery import JournaledJob, Resumption, decide
from pilot.job.states import JobPhase
from pilot.job.summary import JobSummary, utc_text
from pilot.job.updates import JobUpdates
from pilot.logs import pilot_observer
from pilot.model.job import JobDefinitionError, parse_job
from pilot.model.processes import ProcessOutcome
from pilot.model.states import ServerState
from pilot.process.adopt import AdoptedProcess
from pilot.process.environment import JOB_MARKER_VARIABLE
from pilot.process.runner import ManagedProcess
from pilot.process.supervisor import read_status
from pilot.process.sweep import sweep
from pilot.server.client import JobUpdate

log = Logger(observer=pilot_observer)


def _load_definition(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


class ResumedJob:
    """One job of a dead pilot, finished by this one (see the module docstring)."""

    def __init__(self, env: JobEnvironment, journaled: JournaledJob) -> None:
        self.env = env
        self.journaled = journaled
        self.summary = JobSummary(
            panda_id=journaled.panda_id, state="resumed", received_at=env.clock.seconds()
        )
        self.ctx: JobContext | None = None
        self.resumption: Resumption | None = None

    def abort(
        self,
        code: ErrorCode,
        detail: str,
        *,
        keep_log: bool = False,
        final_deadline: float | None = None,
        kill_now: bool = False,
    ) -> None:
        """Stop this job (a signal, the end of the lifetime): the adopted payload too."""
        if self.ctx is not None:
            self.ctx.abort(code, detail, keep_log=keep_log, final_deadline=final_deadline, kill_now=kill_now)

    async def run(self) -> JobSummary:
        env, journaled = self.env, self.journaled
        await self._stop_orphaned_copytools()
        status_file = journaled.status_file
        status = await env.in_thread(read_status, status_file) if status_file is not None else None
        adopted = self._adoptable()
        self.resumption = what = decide(
            journaled, payload_alive=adopted is not None, status_recorded=status is not None
        )
        log.info(
            "job {pandaid} of a dead pilot: {what}",
            pandaid=journaled.panda_id,
            what=what.value,
            event="resume.decision",
        )
        self.summary.commands.append(f"resumed:{what.value}")
        if what in (Resumption.NOTHING, Resumption.RESEND_FINAL, Resumption.LOST):
            await self._sweep_dead_job()
        if what is Resumption.NOTHING:
            self.summary.state = "done-before"
            self.summary.final_update = "delivered"
            return self.summary
        if what is Resumption.RESEND_FINAL:
            return await self._resend_final()
        definition = (
            await env.in_thread(_load_definition, journaled.definition) if journaled.definition else None
        )
        if what is Resumption.LOST or definition is None or journaled.workdir is None:
            return await self._report_lost(
                "the pilot that ran the job died before its payload started"
                if journaled.payload_starting is None and journaled.payload_started is None
                else "the pilot that ran the job died, and how its payload ended is unknown"
            )
        return await self._finish(definition, journaled.workdir, adopted, status)

    async def _stop_orphaned_copytools(self) -> None:
        """Copytools the dead pilot left running (own sessions): stopped before anything else.

        An upload still going on would race this pilot's own stage-out, and nothing would
        ever report what it did; the stage-out that follows copies and verifies again.
        """
        for pid, started in self.journaled.copytools.items():
            try:
                orphan = AdoptedProcess.adopt(
                    pid=pid,
                    pgid=pid,
                    identity=started.get("identity"),
                    status_file=Path("/nonexistent/txpilot-copytool"),
                    clock=self.env.clock,
                    reactor=cast(IReactorFDSet, self.env.spawner),
                    kill_grace=self.env.config.kill_grace,
                    name=f"copytool {started.get('tool')}",
                    in_thread=self.env.in_thread,
                    control=self.env.process_control,
                )
            except (TypeError, ValueError, OSError):
                continue
            if orphan is None:
                continue  # ended meanwhile, or not that process any more
            log.warn(
                "job {pandaid}: stopping copytool {tool} (pid {pid}) left by the dead pilot for {lfn}",
                pandaid=self.journaled.panda_id,
                tool=started.get("tool"),
                pid=pid,
                lfn=started.get("lfn"),
                event="resume.copytool",
            )
            self.summary.commands.append(f"resumed:stopped-copytool:{started.get('lfn')}")
            await orphan.terminate("a copytool of a dead pilot")

    async def _sweep_dead_job(self) -> None:
        """Stop what the job left running (by its marker), for a job that is not finished here."""
        marker = self.journaled.marker
        if marker is None:
            return
        env = self.env
        left = await sweep(
            f"{JOB_MARKER_VARIABLE}={marker}".encode(),
            (),
            in_thread=env.in_thread,
            clock=env.clock,
            fdset=cast(IReactorFDSet, env.spawner) if IReactorFDSet.providedBy(env.spawner) else None,
            grace=env.config.kill_grace,
            backstop=30.0,
            label=f"job {self.journaled.panda_id} of a dead pilot",
        )
        if left:
            log.warn(
                "job {pandaid}: stopped {count} process(es) the dead pilot left running",
                pandaid=self.journaled.panda_id,
                count=left,
                event="resume.swept",
            )
            self.summary.commands.append(f"resumed:swept:{left}")

    # -- the payload -------------------------------------------------------------------

    def _adoptable(self) -> AdoptedProcess | None:
        started = self.journaled.payload_started
        if started is None or self.journaled.payload_ended is not None:
            return None
        try:
            return AdoptedProcess.adopt(
                pid=int(started["pid"]),
                pgid=started.get("pgid"),
                identity=started.get("identity"),
                status_file=Path(started["status_file"]),
                clock=self.env.clock,
                reactor=cast(IReactorFDSet, self.env.spawner),
                in_thread=self.env.in_thread,
                control=self.env.process_control,
                kill_grace=self.env.config.kill_grace,
            )
        except (KeyError, TypeError, ValueError, OSError):
            return None

    def _recorded_outcome(self, status: Any) -> ProcessOutcome:
        ended = self.journaled.payload_ended
        started_at = float((self.journaled.payload_started or {}).get("t", 0.0) or 0.0)
        if ended is not None:
            return ProcessOutcome(
                pid=int((self.journaled.payload_started or {}).get("pid") or 0),
                exit_code=ended.get("exit_code"),
                signal=ended.get("signal"),
                started=float(ended.get("started") or started_at),
                ended=float(ended.get("ended") or ended.get("t") or started_at),
            )
        return status.outcome(started=started_at)  # type: ignore[no-any-return]

    async def _finish(
        self, definition: dict[str, Any], workdir: Path, adopted: AdoptedProcess | None, status: Any
    ) -> JobSummary:
        env = self.env
        try:
            job = parse_job(definition)
        except JobDefinitionError as exc:
            return await self._report_lost(f"the job's kept definition is unusable: {exc}")
        ctx = JobContext(env, job, self.summary, errors=JobErrors())
        self.ctx = ctx
        JobBeats(ctx)
        if env.journal is not None:
            ctx.journal = JobJournal(env.journal, env.in_thread, job.panda_id)
            await ctx.journal.acquired(definition, job.attempt_nr, workdir)
        for phase in (JobPhase.SETUP, JobPhase.STAGEIN, JobPhase.RUNNING):
            ctx.lifecycle.advance(phase)  # where the dead pilot was; nothing is sent for them
        attach_tools(ctx, workdir, marker=self.journaled.marker)
        start_heartbeat(ctx)
        try:
            if adopted is not None:
                outcome = await self._watch(ctx, adopted)
            else:
                outcome = self._recorded_outcome(status)
            ctx.outcome = outcome
            self.summary.exit_code = outcome.shell_status
            await judge_payload(ctx, outcome, workdir)
            await StageOutPhase(ctx).run()
        except PilotError as exc:
            ctx.errors.record_exception(exc)
        except CancelledError:
            if not ctx.control.aborted:
                raise
        except OSError as exc:
            ctx.errors.record_exception(local_file_error(exc, "local file operation failed"))
        return await FinishPhase(ctx).run()

    async def _watch(self, ctx: JobContext, adopted: AdoptedProcess) -> ProcessOutcome:
        """Heartbeats and aborts reach the adopted payload until it ends."""
        ctx.payload = cast(ManagedProcess, adopted)
        ctx.control.track(cast(ManagedProcess, adopted))
        if ctx.journal is not None:
            started = self.journaled.payload_started or {}
            ctx.journal.payload_started(
                adopted.pid,
                started.get("pgid"),
                started.get("identity"),
                Path(started.get("status_file", "")),
            )
        ctx.send_in_background(ServerState.RUNNING)
        outcome = await adopted.wait()
        if ctx.journal is not None:
            ctx.journal.payload_ended(outcome)
        if adopted.status is None and not outcome.terminated_by_pilot:
            # its supervisor was killed too (the slot torn down): how the payload ended is unknown
            raise PilotError(
                ErrorCode.PREEMPTION,
                "the payload of a dead pilot ended without a recorded status (killed with its pilot)",
            )
        return outcome

    # -- updates only ------------------------------------------------------------------

    def _updates(self) -> JobUpdates:
        env = self.env
        return JobUpdates(
            env.reporter,
            env.clock,
            self.journaled.panda_id,
            self.journaled.attempt_nr,
            env.identity,
            secrets=env.secrets,
        )

    async def _resend_final(self) -> JobSummary:
        sent = self.journaled.final_sent or {}
        state = ServerState(sent.get("state", "failed"))
        fields = JobUpdate(**{k: v for k, v in dict(sent.get("fields") or {}).items() if k in _UPDATE_FIELDS})
        await deliver_final(self._updates(), state, fields, self.env.deadline, self.summary)
        self.summary.state = state.value
        self.summary.ended_at = self.env.clock.seconds()
        return self.summary

    async def _report_lost(self, diag: str) -> JobSummary:
        summary = self.summary
        summary.state = "failed"
        summary.pilot_error_code = int(ErrorCode.PREEMPTION)
        summary.pilot_error_diag = diag
        fields = JobUpdate(
            job_id=self.journaled.panda_id,
            state=ServerState.FAILED.value,
            pilot_error_code=int(ErrorCode.PREEMPTION),
            pilot_error_diag=diag,
            end_time=utc_text(self.env.clock.seconds()),
        )
        log.warn("job {pandaid}: {diag}", pandaid=self.journaled.panda_id, diag=diag, event="resume.lost")
        await deliver_final(self._updates(), ServerState.FAILED, fields, self.env.deadline, summary)
        summary.ended_at = self.env.clock.seconds()
        return summary


_UPDATE_FIELDS = frozenset(JobUpdate.__dataclass_fields__)
