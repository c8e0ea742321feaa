"""Finish: the job's leftover processes, the log tarball, the final update, the job's summary,
its directory tidied away.

First, whatever the job's processes left running is ended and waited for
(``pilot.process.jobscope``: its cgroup, else its process groups and environment
marker), whatever ``--keep-workdirs`` says, so that nothing the job started outlives
it and nothing still writes into the directory the tarball is made of.

This phase runs whatever happened before, and the final update is always attempted:
a failure of any step here (a full disk while the tarball is written, a bug) is
recorded as the job's error, never allowed to skip the update or end the pilot.
Only the final update's deadline bounds it.  Steps after the update (the summary,
removing the work directory) can only be logged when they fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.config import KeepWorkdirs
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError, local_file_error
from pilot.job.context import JobContext
from pilot.job.credentials import SECRETS_DIR
from pilot.job.journal import JobJournal
from pilot.job.logtarball import create_log_tarball
from pilot.job.states import JobPhase, final_server_state
from pilot.job.summary import JobSummary, utc_text
from pilot.job.updates import FinalUpdateLost, JobUpdates, redacted
from pilot.logs import pilot_observer
from pilot.model.files import ReportedFile, job_output_report
from pilot.model.states import ServerState
from pilot.monitor.payload_analysis import PayloadAnalysis
from pilot.monitor.watcher import monitor_update_fields
from pilot.server.client import JobUpdate, UpdateResult
from pilot.util.checksum import file_facts
from pilot.util.files import write_text_atomically
from pilot.util.secrets import SecretValues
from pilot.util.untrusted import safe_file_name

log = Logger(observer=pilot_observer)


async def deliver_final(
    updates: JobUpdates,
    state: ServerState,
    fields: JobUpdate,
    deadline: Callable[[], float],
    summary: JobSummary,
    journal: JobJournal | None = None,
    secrets: SecretValues | None = None,
) -> UpdateResult | None:
    """Send a job's final update and note in ``summary`` whether it arrived; never raises.

    With a journal, the update (redacted) is journaled before it goes out and its
    acknowledgement after, so a successor of a pilot that dies meanwhile sends it again
    if, and only if, the server never acknowledged it.
    """
    if journal is not None:
        await journal.final_sent(state.value, redacted(fields, secrets))
    try:
        result = await updates.send_final(state, fields, deadline)
    except FinalUpdateLost as exc:
        summary.final_update = "lost"
        log.critical("{error}", error=str(exc), event="job.final_update_lost", pandaid=summary.panda_id)
        return None
    summary.final_update = "delivered"
    if journal is not None:
        journal.final_acked(state.value)
    for command in result.commands:
        summary.note_command(command)
    return result


def final_fields(ctx: JobContext, state: ServerState) -> JobUpdate:
    """The final update's fields: outcome, timings, resources, metrics, the job output report."""
    job, life, outcome = ctx.job, ctx.lifecycle, ctx.outcome
    first = ctx.errors.first
    timing = "|".join(
        str(round(x))
        for x in (
            ctx.getjob_seconds,
            life.duration(JobPhase.STAGEIN, JobPhase.RUNNING),
            outcome.wall_time if outcome else 0.0,
            life.duration(JobPhase.STAGEOUT, life.phase),
            0.0,
            life.duration(JobPhase.SETUP, JobPhase.STAGEIN),
        )
    )
    metrics = f"coreCount={job.core_count}"
    if ctx.staging is not None and ctx.staging.metrics.job_metrics():
        metrics += " " + ctx.staging.metrics.job_metrics()
    analysis = ctx.analysis or PayloadAnalysis()
    for key, value in analysis.job_metrics.items():
        metrics += f" {key}={value}"
    usage = monitor_update_fields(ctx.monitor_report.fields if ctx.monitor_report else {})
    if ctx.max_rss_kb and not usage.get("max_rss"):
        usage["max_rss"] = ctx.max_rss_kb
    return JobUpdate(
        **usage,
        job_id=job.panda_id,
        state=state.value,
        trans_exit_code=outcome.shell_status if outcome is not None else None,
        pilot_error_code=int(first.code) if first else 0,
        pilot_error_diag=first.diag if first else None,
        start_time=utc_text(outcome.started) if outcome else None,
        end_time=utc_text(outcome.ended if outcome else ctx.env.clock.seconds()),
        pilot_timing=timing,
        cpu_consumption_time=int(round(ctx.payload_cpu)),
        cpu_consumption_unit="s",
        core_count=job.core_count,
        n_input_files=len(job.inputs),
        job_metrics=metrics,
        job_output_report=job_output_report(ctx.reported) if ctx.reported else None,
        exe_error_code=analysis.exe_error_code,
        exe_error_diag=analysis.exe_error_diag,
        n_events=ctx.n_events if ctx.n_events is not None else analysis.n_events,
        meta_data=analysis.meta_data,
    )


class FinishPhase:
    """See the module docstring."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> JobSummary:
        ctx = self.ctx
        if ctx.heartbeat is not None:
            await self._safely("stopping the heartbeat", ctx.heartbeat.stop)
        await self._safely("ending the job's processes", self._end_processes)
        if ctx.lifecycle.phase is not JobPhase.STAGEOUT:
            ctx.reported = []  # outputs count only if the job got through stage-out
        if not ctx.control.aborted or ctx.control.keep_log:
            await self._safely("making the log tarball", self._log_tarball, ErrorCode.LOGFILECREATIONFAILURE)
        if not ctx.errors and not ctx.control.aborted and ctx.lifecycle.phase is not JobPhase.STAGEOUT:
            # only a job that got through stage-out has finished; anything else is a pilot bug
            phase = ctx.lifecycle.phase.value
            ctx.errors.record(ErrorCode.UNKNOWNEXCEPTION, f"the job ended in phase {phase} without an error")
        ctx.advance(JobPhase.FAILED if ctx.errors or ctx.control.aborted else JobPhase.FINISHED)
        for pending in ctx.pending:
            await pending
        final = final_server_state(ctx.lifecycle.phase, ctx.errors, stored_files=bool(ctx.reported))
        await deliver_final(
            ctx.updates,
            final,
            final_fields(ctx, final),
            ctx.deadline,
            ctx.summary,
            journal=ctx.journal,
            secrets=ctx.env.secrets,
        )
        ctx.summary.state = final.value
        self._record_summary()
        await self._safely("writing the job summary", self._write_summary)
        await self._safely("removing the work directory", lambda: self._cleanup(final))
        return ctx.summary

    async def _safely(
        self, what: str, step: Callable[[], Awaitable[None]], code: ErrorCode | None = None
    ) -> None:
        """Run ``step``; a failure becomes the job's error (with ``code``) or a log line, never a crash."""
        try:
            await step()
        except CancelledError:
            log.warn("job {pandaid}: {what} interrupted", pandaid=self.ctx.job.panda_id, what=what)
        except PilotError as exc:
            self.ctx.errors.record_exception(exc)
        except OSError as exc:
            if code is not None:
                self.ctx.errors.record_exception(local_file_error(exc, what, code))
            log.error(
                "job {pandaid}: {what} failed: {error}", pandaid=self.ctx.job.panda_id, what=what, error=exc
            )
        except Exception as exc:  # noqa: BLE001 - a pilot bug here must not cost the final update
            log.failure("job {pandaid}: {what} failed", pandaid=self.ctx.job.panda_id, what=what)
            if code is not None:
                self.ctx.errors.record(ErrorCode.UNKNOWNEXCEPTION, f"{what}: {type(exc).__name__}: {exc}")

    async def _end_processes(self) -> None:
        launcher = self.ctx.launcher
        if launcher is not None and launcher.scope is not None:
            self.ctx.summary.cgroup = await launcher.scope.end()

    async def _log_tarball(self) -> None:
        """Create the log tarball, describe it and store it; it joins the job output report."""
        ctx, env, job = self.ctx, self.ctx.env, self.ctx.job
        if job.log is None or ctx.workdir is None:
            return
        try:
            name = safe_file_name(env.experiment.log_tarball_name(job))
        except ValueError as exc:
            raise PilotError(
                ErrorCode.LOGFILECREATIONFAILURE, f"the experiment's log tarball name: {exc}"
            ) from None
        destination = env.pilot_dir / "logs" / name
        path = await ctx.control.guard(
            create_log_tarball(
                spawner=env.spawner,
                clock=env.clock,
                in_thread=env.in_thread,
                workdir=ctx.workdir,
                destination=destination,
                panda_id=job.panda_id,
                queue=env.queuedata.name,
                control=env.process_control,
                exclude=[*ctx.staged_in(), SECRETS_DIR],
            ),
            after_abort=True,
        )
        facts = await env.in_thread(file_facts, path)
        entry = ReportedFile(job.log.lfn, job.log.guid, facts, path, is_log=True)
        if ctx.staging is not None:
            (entry,) = await ctx.control.guard(ctx.staging.stage_out([entry]), after_abort=True)
        ctx.reported.append(entry)

    def _record_summary(self) -> None:
        ctx = self.ctx
        life, summary = ctx.lifecycle, ctx.summary
        first = ctx.errors.first
        summary.pilot_error_code = int(first.code) if first else 0
        summary.pilot_error_diag = first.diag if first else ""
        summary.ended_at = ctx.env.clock.seconds()
        summary.durations = {
            "getjob": round(ctx.getjob_seconds, 3),
            "setup": round(life.duration(JobPhase.SETUP, JobPhase.STAGEIN), 3),
            "stagein": round(life.duration(JobPhase.STAGEIN, JobPhase.RUNNING), 3),
            "payload": round(ctx.outcome.wall_time, 3) if ctx.outcome else 0.0,
            "stageout": round(life.duration(JobPhase.STAGEOUT, life.phase), 3),
            "total": round(summary.ended_at - summary.received_at, 3),
        }
        summary.outputs = {f.lfn: f.report_entry() for f in ctx.reported}
        if ctx.launcher is not None:
            summary.runtimes = dict(ctx.launcher.runtimes_used)
        if ctx.staging is not None:
            summary.transfers = ctx.staging.metrics.transfers
        log.info(
            "job {pandaid}: {state} (exit {exit_code}, pilot error {code}) in {total:.2f} s",
            pandaid=ctx.job.panda_id,
            state=summary.state,
            exit_code=summary.exit_code,
            code=summary.pilot_error_code,
            total=summary.durations["total"],
            summary=summary.to_json(),
            event="job.summary",
        )

    async def _write_summary(self) -> None:
        workdir = self.ctx.workdir
        if workdir is not None:
            text = json.dumps(self.ctx.summary.to_json(), indent=1)
            mode = self.ctx.env.config.modes.file
            await self.ctx.env.in_thread(_write_if_present, workdir / "job_summary.json", text, mode)

    async def _cleanup(self, state: ServerState) -> None:
        ctx = self.ctx
        keep = ctx.env.config.keep_workdirs
        if ctx.workdir is None:
            return
        if keep is KeepWorkdirs.ALL or (keep is KeepWorkdirs.FAILED and state is not ServerState.FINISHED):
            return
        last = ctx.control.process
        if last is not None and last.cleaning_up:
            await last.sweep_now()
        logs = [entry.path for entry in ctx.reported if entry.is_log]
        await ctx.env.in_thread(_remove, ctx.workdir, logs)


def _write_if_present(path: Path, text: str, mode: int) -> None:
    if path.parent.is_dir():
        write_text_atomically(path, text, durable=False, mode=mode)


def _remove(workdir: Path, files: list[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
