"""The payload itself: started with its co-process and ``with`` utilities, watched by the
monitors (or an external prmon), analysed when it ends.

The ``running`` update goes out without holding the payload back.  When the payload
ends, the co-process and utilities are stopped, the monitors hand over their report,
and the payload's exit is analysed (the experiment refines the generic analysis).
A payload the pilot terminated ends with a cancellation ("aborted", see
``pilot.job.context``); a signal or a non-zero exit fails the job with the code the
analysis found, else PAYLOADEXECUTIONFAILURE.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError, error_for_signal
from pilot.job.composition import step_argv
from pilot.job.context import JobContext
from pilot.job.launcher import ProcessLauncher
from pilot.job.states import JobPhase
from pilot.logs import pilot_observer
from pilot.model.documents import Step
from pilot.model.processes import ProcessOutcome, ProcessRecord
from pilot.monitor import prmon_output
from pilot.monitor.payload_analysis import analyse_payload
from pilot.monitor.prmon_process import ExternalPrmon, find_prmon, prmon_requested
from pilot.monitor.watcher import JobMonitor, Limits
from pilot.process.identity import process_identity
from pilot.process.runner import ManagedProcess, ProcessStartError
from pilot.process.utility import Utility
from pilot.util.disk import is_full

log = Logger(observer=pilot_observer)

#: Where the payload's supervisor records how it ended (in the job's work directory).
PAYLOAD_STATUS_FILE = ".txpilot-payload-status.json"


def children_cpu_seconds() -> float:
    """CPU time of every child the pilot has reaped so far (payload trees included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def judge_payload(ctx: JobContext, outcome: ProcessOutcome, workdir: Path) -> None:
    """Analyse how the payload ended (the experiment refines it); raise its error, if any.

    A payload the pilot terminated raises CancelledError ("aborted"); a signal or a
    non-zero exit raises ``PilotError`` with the code the analysis found, else
    PAYLOADEXECUTIONFAILURE.  Also used for a payload a successor pilot adopted.
    """
    analysis = await ctx.env.in_thread(analyse_payload, outcome.exit_code, outcome.signal, workdir)
    ctx.analysis = ctx.env.experiment.analyse_payload(ctx.job, workdir, analysis)
    if outcome.terminated_by_pilot:
        raise CancelledError()
    if outcome.signal is not None:
        raise PilotError(error_for_signal(outcome.signal), f"payload killed by signal {outcome.signal}")
    if outcome.exit_code != 0:
        found = ctx.analysis.pilot_error
        if found is not None:
            raise PilotError(found[0], found[1])
        if await ctx.env.in_thread(is_full, workdir):
            # its "No space left on device" went to a log on the full disk
            raise PilotError(
                ErrorCode.NOLOCALSPACE,
                f"payload exited with code {outcome.exit_code} with the work directory's disk full",
            )
        raise PilotError(ErrorCode.PAYLOADEXECUTIONFAILURE, f"payload exited with code {outcome.exit_code}")


class PayloadRun:
    """One run of the payload; see the module docstring."""

    def __init__(
        self,
        ctx: JobContext,
        launcher: ProcessLauncher,
        command: str,
        environ: Mapping[str, str],
        coprocess: Step | None,
        utilities: list[Utility],
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.command = command
        self.environ = environ
        self.coprocess = coprocess
        self.utilities = utilities

    async def run(self) -> None:
        ctx, job, launcher = self.ctx, self.ctx.job, self.launcher
        workdir = launcher.workdir
        record = ctx.record("payload", "payload")
        status_file = workdir / PAYLOAD_STATUS_FILE
        process = launcher.build(
            "payload", "payload", ["/bin/bash", "-c", self.command], self.environ,
            failure=ErrorCode.PAYLOADEXECUTIONFAILURE, status_file=status_file,
        )  # fmt: skip
        record.runtime = launcher.runtimes_used.get("payload")
        cpu_at_start = children_cpu_seconds()
        # a status left by an earlier run here (an HPO pass) must not pass for this one's
        await ctx.env.in_thread(status_file.unlink, missing_ok=True)
        if ctx.journal is not None:
            await ctx.journal.payload_starting(status_file)
        try:
            pid = process.start()
        except ProcessStartError as exc:
            raise PilotError(ErrorCode.PAYLOADEXECUTIONFAILURE, str(exc)) from None
        ctx.payload = process
        ctx.control.track(process)
        if ctx.journal is not None:
            identity = await ctx.env.in_thread(process_identity, pid)
            ctx.journal.payload_started(pid, pid, identity.to_json() if identity else None, status_file)
        await self._start_monitor(workdir, pid)
        log.info(
            "job {pandaid}: payload started as pid {pid}",
            pandaid=job.panda_id,
            pid=pid,
            event="job.payload_start",
        )
        if ctx.lifecycle.phase is not JobPhase.RUNNING:  # an HPO job runs its payload once per point
            state = ctx.advance(JobPhase.RUNNING)
            if state is not None:
                ctx.send_in_background(state)
        co_process, co_record = await self._start_coprocess(process, record)
        for utility in self.utilities:
            if utility.spec.when == "with":
                utility.payload_pid = pid
                utility.start()
        outcome = await process.wait()
        record.finish(outcome)
        ctx.outcome = outcome
        if ctx.journal is not None:
            ctx.journal.payload_ended(outcome)
        if co_process is not None and co_record is not None:
            co_record.finish(await co_process.terminate("the payload has ended"))
        for utility in self.utilities:
            if utility.spec.when in ("before", "with"):
                await utility.stop()
        await self._stop_monitor()
        ctx.payload_cpu = max(0.0, children_cpu_seconds() - cpu_at_start)
        ctx.summary.exit_code = outcome.shell_status
        log.info(
            "job {pandaid}: payload ended: exit {exit_code}, signal {signal}, {wall:.2f} s",
            pandaid=job.panda_id, exit_code=outcome.exit_code, signal=outcome.signal,
            wall=outcome.wall_time, event="job.payload_end",
        )  # fmt: skip
        await judge_payload(ctx, outcome, workdir)

    async def _start_coprocess(
        self, payload: ManagedProcess, payload_record: ProcessRecord
    ) -> tuple[ManagedProcess | None, ProcessRecord | None]:
        """Start the co-process beside the payload; if it cannot start, stop the payload too."""
        if self.coprocess is None:
            return None, None
        record = self.ctx.record("coprocess", "coprocess")
        try:
            process = self.launcher.start(
                "coprocess", "coprocess", step_argv(self.coprocess), self.environ,
                failure=ErrorCode.PAYLOADEXECUTIONFAILURE,
            )  # fmt: skip
        except (PilotError, CancelledError):
            payload_record.finish(await payload.terminate("the co-process could not start"))
            await self._stop_monitor()
            raise
        record.runtime = self.launcher.runtimes_used.get("coprocess")
        return process, record

    async def _start_monitor(self, workdir: Path, pid: int) -> None:
        ctx, env, job = self.ctx, self.ctx.env, self.ctx.job
        settings = env.config.monitor
        program = (
            find_prmon(self.environ) if settings.allow_prmon and prmon_requested(env.queuedata) else None
        )
        if program is not None:
            prmon = ExternalPrmon(
                env.spawner, env.clock, program, workdir, environ=self.environ,
                interval=settings.memory_interval, control=env.process_control, in_thread=env.in_thread,
            )  # fmt: skip
            ctx.prmon = prmon if prmon.start(pid) else None
            if ctx.prmon is not None and ctx.prmon.record is not None:
                ctx.summary.processes.append(ctx.prmon.record)
        now = env.clock.seconds()
        limits = Limits.for_job(
            job, env.queuedata, settings,
            started=now, environ=env.pilot_environ, now=now, wall_now=env.wall(),
        )  # fmt: skip
        ctx.monitor = JobMonitor(
            clock=env.clock,
            in_thread=env.in_thread,
            settings=settings,
            limits=limits,
            workdir=workdir,
            pid=pid,
            abort=lambda code, diag: ctx.abort(code, diag, keep_log=True),
            panda_id=job.panda_id,
            debug=ctx.heartbeat.debug if ctx.heartbeat is not None else job.is_debug,
            skip=tuple(workdir / name for name in ctx.staged_in()),
            wall=env.wall,
            write_files=ctx.prmon is None,
            secrets=env.secrets,
        )
        ctx.monitor.start()

    async def _stop_monitor(self) -> None:
        """Stop the monitors; an external prmon's summary, if any, gives the memory fields."""
        ctx = self.ctx
        if ctx.monitor is not None:
            ctx.monitor_report = await ctx.monitor.stop()
        if ctx.prmon is not None:
            summary = await ctx.prmon.stop(ctx.env.in_thread)
            if summary is not None and ctx.monitor_report is not None:
                ctx.monitor_report = replace(ctx.monitor_report, fields=prmon_output.pilot_fields(summary))
