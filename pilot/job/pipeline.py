"""One job, from definition to final update: setup → stage-in → payload → stage-out → report.

``JobRun.run`` is one coroutine that walks the job through the phases of
``pilot.job.states``; there are no queues to poll and no sleeps.  ``JobRun.abort``
(a signal, the end of the pilot's lifetime, a kill from the server) records the
reason with priority, kills the payload through the runner's TERM→KILL escalation
or cancels the step in progress, and lets the coroutine fall through to the final
update, which is always sent.

Errors are values: a step raises ``PilotError`` with PanDA's code; the run records it
and reports the job ``failed`` (or ``holding`` when recoverable).  Anything else is a
bug, reported as UNKNOWNEXCEPTION with the traceback in the log, and the pilot goes
on with the next job.
"""

from __future__ import annotations

import datetime
import json
import resource
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.errors import JobErrors, PilotError, error_for_signal
from pilot.interfaces import IExperiment
from pilot.job.composition import HPO_LOOP_END, Step, fetch_step, parse_steps, step_argv
from pilot.job.credentials import SECRETS_DIR, remove_job_credentials, write_job_credentials
from pilot.job.heartbeat import Heartbeat
from pilot.job.launcher import ProcessLauncher
from pilot.job.logtarball import create_log_tarball
from pilot.job.outputs import describe_outputs
from pilot.job.reporter import FinalUpdateLost, JobReporter, PilotIdentity
from pilot.job.staging import JobStaging, StagingSetup
from pilot.job.states import JobLifecycle, JobPhase, final_server_state
from pilot.job.transformation import download_sources, fetch_transformation
from pilot.logs import pilot_observer
from pilot.model.files import ReportedFile, job_output_report
from pilot.model.job import Job, JobDefinitionError, attempt_nr_of, panda_id_of, parse_job
from pilot.model.processes import ProcessOutcome, ProcessRecord
from pilot.model.states import ServerState
from pilot.monitor import prmon_output
from pilot.monitor.payload_analysis import PayloadAnalysis, analyse_payload
from pilot.monitor.prmon_process import ExternalPrmon, find_prmon, prmon_requested
from pilot.monitor.status import StatusFile
from pilot.monitor.watcher import JobMonitor, Limits, MonitorReport, monitor_update_fields, newest_file_tail
from pilot.process.environment import payload_environment
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError
from pilot.process.usage import tree_usage
from pilot.process.utility import Utility
from pilot.queuedata import QueueData
from pilot.server.client import JobUpdate, PandaClient, UpdateResult
from pilot.util.checksum import file_facts
from pilot.util.threads import ThreadRunner

T = TypeVar("T")


@dataclass(frozen=True)
class JobEnvironment:
    """Everything a job run needs from the pilot (all injected, nothing global)."""

    client: PandaClient
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


@dataclass
class JobSummary:
    """The machine-readable record of one job (logged, and written to --summary-file)."""

    panda_id: int | None
    state: str
    exit_code: int | None = None
    pilot_error_code: int = 0
    pilot_error_diag: str = ""
    final_update: str = "not-sent"
    commands: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    received_at: float = 0.0
    ended_at: float = 0.0
    workdir: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    runtimes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _children_cpu_seconds() -> float:
    """CPU time of every child the pilot has reaped so far (payload trees included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class JobRun:
    """One job's run; see the module docstring."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self, env: JobEnvironment, definition: Mapping[str, Any], *, getjob_seconds: float = 0.0
    ) -> None:
        self.env = env
        self.definition = definition
        self.errors = JobErrors()
        self.summary = JobSummary(
            panda_id=panda_id_of(definition), state="received", received_at=env.clock.seconds()
        )
        self.job: Job | None = None
        self.workdir: Path | None = None
        self._getjob_seconds = getjob_seconds
        self._lifecycle: JobLifecycle | None = None
        self._reporter: JobReporter | None = None
        self._heartbeat: Heartbeat | None = None
        self._process: ManagedProcess | None = None
        self._outcome: ProcessOutcome | None = None
        self._step: Deferred[Any] | None = None
        self._aborted = False
        self._keep_log_on_abort = True
        self._final_deadline: float | None = None
        self._max_rss_kb = 0
        self._cpu_at_start = 0.0
        self._payload_cpu = 0.0
        self._pending: list[Deferred[None]] = []
        self._reported: list[ReportedFile] = []
        self._transformation = ""
        self._staging: JobStaging | None = None
        self._monitor: JobMonitor | None = None
        self._monitor_report: MonitorReport | None = None
        self._analysis: PayloadAnalysis | None = None
        self._prmon: ExternalPrmon | None = None
        self._launcher: ProcessLauncher | None = None

    # -- control from outside ------------------------------------------------------

    def abort(
        self,
        code: ErrorCode,
        detail: str,
        *,
        keep_log: bool = False,
        final_deadline: float | None = None,
        kill_now: bool = False,
    ) -> None:
        """Stop this job for ``code``: kill the payload or cancel the current step."""
        if final_deadline is not None:
            self._final_deadline = (
                final_deadline if self._final_deadline is None else min(self._final_deadline, final_deadline)
            )
            if self._reporter is not None:
                self._reporter.hurry()
        if self._lifecycle is not None and self._lifecycle.is_terminal:
            return
        first_abort = not self._aborted
        self._aborted = True
        self._keep_log_on_abort = self._keep_log_on_abort and keep_log
        if first_abort:
            self.errors.record(code, detail, priority=True)
            self.log.warn(
                "job {pandaid}: aborting: {code} {detail}",
                pandaid=self.summary.panda_id,
                code=code.name,
                detail=detail,
                event="job.abort",
            )
        if self._process is not None and self._process.running:
            if kill_now:
                self._process.kill()
            else:
                self._process.terminate(code.name)
        elif self._step is not None:
            self._step.cancel()

    def _deadline(self) -> float:
        """When the final update must have been delivered (moves closer on a signal)."""
        return self._final_deadline if self._final_deadline is not None else self.env.deadline()

    @property
    def panda_id(self) -> int | None:
        return self.summary.panda_id

    # -- the run -------------------------------------------------------------------

    async def run(self) -> JobSummary:
        try:
            self.job = parse_job(self.definition)
        except JobDefinitionError as exc:
            return await self._reject(exc)
        job = self.job
        self._lifecycle = JobLifecycle(job.panda_id, self.env.clock)
        self._reporter = JobReporter(
            self.env.client, self.env.clock, job.panda_id, job.attempt_nr, self.env.identity
        )
        self.log.info(
            "job {pandaid} (attempt {attempt}) received: {transformation}",
            pandaid=job.panda_id,
            attempt=job.attempt_nr,
            transformation=job.transformation,
            event="job.received",
        )
        try:
            await self._setup(job)
            await self._stage_in(job)
            await self._execute(job)
            await self._stage_out(job)
        except PilotError as exc:
            self.errors.record_exception(exc)
        except CancelledError:
            if not self._aborted:
                raise
        except Exception as exc:  # noqa: BLE001 - a pilot bug must not lose the job
            self.log.failure("job {pandaid}: unexpected error", pandaid=job.panda_id)
            self.errors.record(ErrorCode.UNKNOWNEXCEPTION, f"{type(exc).__name__}: {exc}")
        return await self._finish(job)

    async def _guard(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await a step so that ``abort`` can cancel it."""
        if self._aborted:
            coroutine.close()
            raise CancelledError()
        step: Deferred[T] = Deferred.fromCoroutine(coroutine)
        self._step = step
        try:
            return await step
        finally:
            self._step = None

    def _advance(self, phase: JobPhase) -> ServerState | None:
        assert self._lifecycle is not None
        state = self._lifecycle.advance(phase)
        self._publish_status()
        return state

    def _publish_status(self) -> None:
        """Refresh the job's section of the pilot's status file (if there is one)."""
        status = self.env.status
        if status is None or self._lifecycle is None:
            return
        section: dict[str, Any] = {
            "pandaid": self.summary.panda_id,
            "phase": self._lifecycle.phase.value,
            "since": _utc(self.env.clock.seconds()),
            "workdir": self.summary.workdir,
            "debug": bool(self._heartbeat and self._heartbeat.debug),
        }
        monitor = self._monitor
        if monitor is not None and monitor.last_sample is not None:
            section["usage"] = asdict(monitor.last_sample)
            section["idle_seconds"] = round(monitor.idle)
        if self._staging is not None and self._staging.metrics.transfers:
            section["last_transfer"] = self._staging.metrics.transfers[-1]
        first = self.errors.first
        if first is not None:
            section["error"] = {"code": int(first.code), "name": first.code.name, "diag": first.diag}
        status.update(job=section)

    async def _setup(self, job: Job) -> None:
        state = self._advance(JobPhase.SETUP)
        self.workdir = self._make_workdir(job)
        await self._check_free_space(self.workdir)
        problem = await self.env.in_thread(self.env.experiment.verify_setup, job, self.workdir)
        if problem:
            raise PilotError(ErrorCode.SETUPFAILURE, problem)
        self._launcher = self._make_launcher(job, self.workdir)
        self._staging = JobStaging(
            job,
            self.workdir,
            self.env.staging,
            self.env.queuedata,
            spawner=self.env.spawner,
            clock=self.env.clock,
            in_thread=self.env.in_thread,
            control=self.env.process_control,
            catalog_name=self.env.experiment.file_catalog_name(job),
            wrap_in=self._launcher.copytool_wrapper("stagein"),
            wrap_out=self._launcher.copytool_wrapper("stageout"),
        )
        if state is not None:
            await self._send(state)
        self._heartbeat = Heartbeat(
            self.env.clock,
            self.env.config.heartbeat_period,
            self.env.config.debug_heartbeat_period,
            self._beat,
            debug=job.is_debug,
        )
        self._heartbeat.start()
        sources = download_sources(job, self.env.config.baseurls)
        self._transformation = job.transformation
        if sources:
            workdir = self.workdir
            path = await self._guard(
                fetch_transformation(sources, workdir, lambda url: self.env.client.get_bytes(url))
            )
            self._transformation = f"./{path.name}"

    async def _check_free_space(self, workdir: Path) -> None:
        """A job needs ``min_free_start`` bytes free before it starts (2 GB by default)."""
        needed = self.env.config.monitor.min_free_start
        try:
            free = (await self.env.in_thread(shutil.disk_usage, workdir)).free
        except OSError:
            return
        if free < needed:
            raise PilotError(
                ErrorCode.NOLOCALSPACE,
                f"{free / 1e9:.2f} GB free for the job, {needed / 1e9:.2f} GB needed before it starts",
            )

    def _make_workdir(self, job: Job) -> Path:
        workdir = self.env.pilot_dir / f"PanDA_Pilot-{job.panda_id}"
        try:
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir(mode=0o755)
            (workdir / "tmp").mkdir()
        except OSError as exc:
            raise PilotError(ErrorCode.MKDIR, f"{workdir}: {exc.strerror}") from None
        self.summary.workdir = str(workdir)
        return workdir

    async def _stage_in(self, job: Job) -> None:
        self._advance(JobPhase.STAGEIN)
        assert self._staging is not None
        await self._guard(self._staging.stage_in())

    async def _execute(self, job: Job) -> None:
        """Pre-process, payload with co-process and utilities, post-process (``composition``)."""
        assert self.workdir is not None
        if self._aborted:
            raise CancelledError()
        workdir = self.workdir
        experiment = self.env.experiment
        steps = parse_steps(job)
        for name, step in list(steps.items()):
            if step.is_url:
                steps[name], _digest = await self._guard(fetch_step(step, workdir, self.env.client.get_bytes))
        command = experiment.payload_command(job, self._transformation, workdir)
        base_env = payload_environment(job, workdir, self.env.pilot_environ, self.env.queuedata.environ)
        environ = experiment.payload_environment(job, workdir, base_env)
        staging = self._staging
        if staging is not None and staging.catalog is not None:
            environ.update(experiment.input_environment(job, staging.catalog, staging.turls))
        environ.update(await self.env.in_thread(write_job_credentials, job, workdir))
        launcher = self._launcher
        assert launcher is not None  # made with the work directory, in _setup
        utilities = [
            Utility(
                spec=spec,
                start_process=self._utility_starter(launcher, spec.name, environ),
                clock=self.env.clock,
                record=self._record(spec.name, "utility"),
            )
            for spec in experiment.utilities(job, self.env.queuedata, workdir)
        ]
        try:
            for utility in utilities:
                if utility.spec.when == "before":
                    utility.start()
            if "preprocess" in steps and not await self._preprocess(launcher, steps["preprocess"], environ):
                return
            await self._run_payload(job, launcher, command, environ, steps.get("coprocess"), utilities)
            if "postprocess" in steps:
                await self._postprocess(launcher, steps["postprocess"], environ)
            for utility in utilities:
                if utility.spec.when == "after":
                    utility.start()
                    if utility.process is not None:
                        self._process = utility.process
                        await utility.process.wait()
        finally:
            for utility in utilities:
                await utility.stop()
            await self.env.in_thread(remove_job_credentials, workdir)

    def _make_launcher(self, job: Job, workdir: Path) -> ProcessLauncher:
        credentials = self.env.config.credentials
        # the pilot's directory (its logs, other jobs) and its own credentials
        hidden = [self.env.pilot_dir, *(p for p in (credentials.proxy, credentials.token_file) if p)]
        return ProcessLauncher(
            spawner=self.env.spawner,
            clock=self.env.clock,
            job=job,
            workdir=workdir,
            experiment=self.env.experiment,
            queuedata=self.env.queuedata,
            pilot_environ=self.env.pilot_environ,
            hidden=hidden,
            kill_grace=self.env.config.kill_grace,
            control=self.env.process_control,
        )

    def _record(self, name: str, role: str) -> ProcessRecord:
        record = ProcessRecord(name=name, role=role, stdout=f"{name}.stdout", stderr=f"{name}.stderr")
        self.summary.processes.append(record)
        return record

    def _utility_starter(
        self, launcher: ProcessLauncher, name: str, environ: Mapping[str, str]
    ) -> Callable[[list[str]], ManagedProcess]:
        def start(argv: list[str]) -> ManagedProcess:
            return launcher.start("utility", name, argv, environ, failure=ErrorCode.PAYLOADEXECUTIONFAILURE)

        return start

    async def _run_step(
        self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str], failure: ErrorCode
    ) -> ProcessOutcome:
        record = self._record(step.name, step.name)
        process = launcher.start(step.name, step.name, step_argv(step), environ, failure=failure)
        self._process = process
        record.runtime = launcher.runtimes_used.get(step.name)
        outcome = await process.wait()
        record.finish(outcome)
        self.log.info(
            "job {pandaid}: {step} ended: exit {exit_code}, signal {signal}",
            pandaid=self.summary.panda_id, step=step.name, exit_code=outcome.exit_code,
            signal=outcome.signal, event="job.step_end",
        )  # fmt: skip
        if outcome.terminated_by_pilot:
            raise CancelledError()
        return outcome

    async def _preprocess(self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str]) -> bool:
        """Run the pre-process; False when it ends an HPO loop (no payload, no error)."""
        outcome = await self._run_step(launcher, step, environ, ErrorCode.PREPROCESSFAILURE)
        if outcome.exit_code in HPO_LOOP_END:
            self._advance(JobPhase.RUNNING)  # the job ran (its pre-process), nothing failed
            self.log.info(
                "job {pandaid}: pre-process exit {code}: end of the HPO loop, no payload run",
                pandaid=self.summary.panda_id, code=outcome.exit_code, event="job.hpo_end",
            )  # fmt: skip
            return False
        if outcome.signal is not None or outcome.exit_code != 0:
            how = f"signal {outcome.signal}" if outcome.signal is not None else f"code {outcome.exit_code}"
            raise PilotError(ErrorCode.PREPROCESSFAILURE, f"pre-process {step.command} failed with {how}")
        return True

    async def _postprocess(self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str]) -> None:
        outcome = await self._run_step(launcher, step, environ, ErrorCode.POSTPROCESSFAILURE)
        if outcome.signal is None and outcome.exit_code == 0:
            return
        how = f"signal {outcome.signal}" if outcome.signal is not None else f"code {outcome.exit_code}"
        if step.ignore_failure:
            self.log.warn(
                "job {pandaid}: post-process failed with {how} (ignored)",
                pandaid=self.summary.panda_id,
                how=how,
            )
            return
        raise PilotError(ErrorCode.POSTPROCESSFAILURE, f"post-process {step.command} failed with {how}")

    async def _run_payload(
        self,
        job: Job,
        launcher: ProcessLauncher,
        command: str,
        environ: Mapping[str, str],
        coprocess: Step | None,
        utilities: list[Utility],
    ) -> None:
        workdir = launcher.workdir
        record = self._record("payload", "payload")
        process = launcher.build(
            "payload", "payload", ["/bin/bash", "-c", command], environ,
            failure=ErrorCode.PAYLOADEXECUTIONFAILURE,
        )  # fmt: skip
        record.runtime = launcher.runtimes_used.get("payload")
        self._cpu_at_start = _children_cpu_seconds()
        try:
            pid = process.start()
        except ProcessStartError as exc:
            raise PilotError(ErrorCode.PAYLOADEXECUTIONFAILURE, str(exc)) from None
        self._process = process
        await self._start_monitor(job, workdir, pid, environ)
        self.log.info(
            "job {pandaid}: payload started as pid {pid}",
            pandaid=job.panda_id,
            pid=pid,
            event="job.payload_start",
        )
        state = self._advance(JobPhase.RUNNING)
        if state is not None:
            self._background(self._send(state))
        co_process: ManagedProcess | None = None
        co_record: ProcessRecord | None = None
        if coprocess is not None:
            co_record = self._record("coprocess", "coprocess")
            try:
                co_process = launcher.start(
                    "coprocess",
                    "coprocess",
                    step_argv(coprocess),
                    environ,
                    failure=ErrorCode.PAYLOADEXECUTIONFAILURE,
                )
            except PilotError:
                stopped = await process.terminate("the co-process could not start")  # none left behind
                record.finish(stopped)
                await self._stop_monitor()
                raise
            co_record.runtime = launcher.runtimes_used.get("coprocess")
        for utility in utilities:
            if utility.spec.when == "with":
                utility.payload_pid = pid
                utility.start()
        outcome = await process.wait()
        record.finish(outcome)
        self._outcome = outcome
        if co_process is not None and co_record is not None:
            co_outcome = await co_process.terminate("the payload has ended")
            co_record.finish(co_outcome)
        for utility in utilities:
            if utility.spec.when in ("before", "with"):
                await utility.stop()
        await self._stop_monitor()
        self._payload_cpu = max(0.0, _children_cpu_seconds() - self._cpu_at_start)
        self.summary.exit_code = outcome.shell_status
        self.log.info(
            "job {pandaid}: payload ended: exit {exit_code}, signal {signal}, {wall:.2f} s",
            pandaid=job.panda_id,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            wall=outcome.wall_time,
            event="job.payload_end",
        )
        analysis = await self.env.in_thread(analyse_payload, outcome.exit_code, outcome.signal, workdir)
        self._analysis = self.env.experiment.analyse_payload(job, workdir, analysis)
        if outcome.terminated_by_pilot:
            raise CancelledError()
        if outcome.signal is not None:
            raise PilotError(error_for_signal(outcome.signal), f"payload killed by signal {outcome.signal}")
        found = self._analysis.pilot_error
        if outcome.exit_code != 0:
            if found is not None:
                raise PilotError(found[0], found[1])
            raise PilotError(
                ErrorCode.PAYLOADEXECUTIONFAILURE, f"payload exited with code {outcome.exit_code}"
            )

    async def _start_monitor(self, job: Job, workdir: Path, pid: int, environ: Mapping[str, str]) -> None:
        settings = self.env.config.monitor
        program = (
            find_prmon(environ) if settings.allow_prmon and prmon_requested(self.env.queuedata) else None
        )
        if program is not None:
            prmon = ExternalPrmon(
                self.env.spawner, self.env.clock, program, workdir, environ=environ,
                interval=settings.memory_interval, control=self.env.process_control,
            )  # fmt: skip
            self._prmon = prmon if prmon.start(pid) else None
            if self._prmon is not None and self._prmon.record is not None:
                self.summary.processes.append(self._prmon.record)
        now = self.env.clock.seconds()
        limits = Limits.for_job(
            job, self.env.queuedata, settings,
            started=now, environ=self.env.pilot_environ, now=now, wall_now=self.env.wall(),
        )  # fmt: skip
        staged = self._staging.staged_in if self._staging is not None else ()
        self._monitor = JobMonitor(
            clock=self.env.clock,
            in_thread=self.env.in_thread,
            settings=settings,
            limits=limits,
            workdir=workdir,
            pid=pid,
            abort=lambda code, diag: self.abort(code, diag, keep_log=True),
            panda_id=job.panda_id,
            debug=self._heartbeat.debug if self._heartbeat is not None else job.is_debug,
            skip=tuple(workdir / name for name in staged),
            wall=self.env.wall,
            write_files=self._prmon is None,
        )
        self._monitor.start()

    async def _stop_monitor(self) -> None:
        """Stop the monitors; an external prmon's summary, if any, gives the memory fields."""
        if self._monitor is not None:
            self._monitor_report = await self._monitor.stop()
        if self._prmon is not None:
            summary = await self._prmon.stop(self.env.in_thread)
            if summary is not None and self._monitor_report is not None:
                fields = prmon_output.pilot_fields(summary)
                self._monitor_report = replace(self._monitor_report, fields=fields)

    async def _stage_out(self, job: Job) -> None:
        assert self.workdir is not None
        self._advance(JobPhase.STAGEOUT)
        assert self._staging is not None
        described = await self._guard(
            describe_outputs(
                job, self.workdir, self.env.in_thread, max_size=self.env.config.monitor.max_output_size
            )
        )
        self._reported = await self._guard(self._staging.stage_out(described))

    async def _make_log_tarball(self, job: Job) -> ReportedFile | None:
        """Create and describe the log tarball; a failure is recorded, not raised."""
        if job.log is None or self.workdir is None:
            return None
        try:
            path = await create_log_tarball(
                spawner=self.env.spawner,
                clock=self.env.clock,
                in_thread=self.env.in_thread,
                workdir=self.workdir,
                destination=self.env.pilot_dir / "logs" / self.env.experiment.log_tarball_name(job),
                panda_id=job.panda_id,
                queue=self.env.queuedata.name,
                control=self.env.process_control,
                exclude=[
                    *(self._staging.staged_in if self._staging is not None else ()),
                    SECRETS_DIR,
                ],
            )
            facts = await self.env.in_thread(file_facts, path)
            entry = ReportedFile(job.log.lfn, job.log.guid, facts, path, is_log=True)
            if self._staging is not None:
                (entry,) = await self._staging.stage_out([entry])
        except PilotError as exc:
            self.errors.record_exception(exc)
            return None
        return entry

    async def _finish(self, job: Job) -> JobSummary:
        assert self._lifecycle is not None and self._reporter is not None
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        if self._lifecycle.phase is not JobPhase.STAGEOUT:
            self._reported = []  # outputs count only if the job got through stage-out
        if not self._aborted or self._keep_log_on_abort:
            log_entry = await self._make_log_tarball(job)
            if log_entry is not None:
                self._reported.append(log_entry)
        failed = bool(self.errors) or self._aborted
        self._advance(JobPhase.FAILED if failed else JobPhase.FINISHED)
        for pending in self._pending:
            await pending
        final = final_server_state(self._lifecycle.phase, self.errors)
        await self._send_final(job, final)
        self.summary.state = final.value
        self._record_summary(job)
        await self._cleanup(final)
        return self.summary

    def _final_fields(self, job: Job, state: ServerState) -> JobUpdate:
        assert self._lifecycle is not None
        first = self.errors.first
        outcome = self._outcome
        life = self._lifecycle
        timing = "|".join(
            str(round(x))
            for x in (
                self._getjob_seconds,
                life.duration(JobPhase.STAGEIN, JobPhase.RUNNING),
                outcome.wall_time if outcome else 0.0,
                life.duration(JobPhase.STAGEOUT, life.phase),
                0.0,
                life.duration(JobPhase.SETUP, JobPhase.STAGEIN),
            )
        )
        metrics = f"coreCount={job.core_count}"
        if self._staging is not None and self._staging.metrics.job_metrics():
            metrics += " " + self._staging.metrics.job_metrics()
        analysis = self._analysis or PayloadAnalysis()
        for key, value in analysis.job_metrics.items():
            metrics += f" {key}={value}"
        usage = monitor_update_fields(self._monitor_report.fields if self._monitor_report else {})
        if self._max_rss_kb and not usage.get("max_rss"):
            usage["max_rss"] = self._max_rss_kb
        return JobUpdate(
            **usage,
            job_id=job.panda_id,
            state=state.value,
            trans_exit_code=outcome.shell_status if outcome is not None else None,
            pilot_error_code=int(first.code) if first else 0,
            pilot_error_diag=first.diag if first else None,
            start_time=_utc(outcome.started) if outcome else None,
            end_time=_utc(outcome.ended if outcome else self.env.clock.seconds()),
            pilot_timing=timing,
            cpu_consumption_time=int(round(self._payload_cpu)),
            cpu_consumption_unit="s",
            core_count=job.core_count,
            n_input_files=len(job.inputs),
            job_metrics=metrics,
            job_output_report=job_output_report(self._reported) if self._reported else None,
            exe_error_code=analysis.exe_error_code,
            exe_error_diag=analysis.exe_error_diag,
            n_events=analysis.n_events,
            meta_data=analysis.meta_data,
        )

    async def _send_final(self, job: Job, state: ServerState) -> None:
        assert self._reporter is not None
        try:
            result = await self._reporter.send_final(state, self._final_fields(job, state), self._deadline)
        except FinalUpdateLost as exc:
            self.summary.final_update = "lost"
            self.log.critical("{error}", error=str(exc), event="job.final_update_lost", pandaid=job.panda_id)
            return
        self.summary.final_update = "delivered"
        self.summary.commands += list(result.commands)
        if "softkill" in result.commands:
            self.env.on_softkill()

    async def _reject(self, error: JobDefinitionError) -> JobSummary:
        """Report (if possible) a job whose definition cannot be run; never raises."""
        self.errors.record_exception(error)
        panda_id = self.summary.panda_id
        self.summary.state = "failed"
        first = self.errors.first
        assert first is not None
        self.summary.pilot_error_code = int(first.code)
        self.summary.pilot_error_diag = first.diag
        self.log.error(
            "job {pandaid}: rejected: {diag}",
            pandaid=panda_id,
            diag=first.diag,
            event="job.rejected",
        )
        if panda_id is None:
            self.summary.state = "rejected"
            self.summary.ended_at = self.env.clock.seconds()
            return self.summary
        reporter = JobReporter(
            self.env.client, self.env.clock, panda_id, attempt_nr_of(self.definition), self.env.identity
        )
        self._reporter = reporter
        fields = JobUpdate(
            job_id=panda_id,
            state=ServerState.FAILED.value,
            pilot_error_code=int(first.code),
            pilot_error_diag=first.diag,
            end_time=_utc(self.env.clock.seconds()),
        )
        try:
            await reporter.send_final(ServerState.FAILED, fields, self._deadline)
            self.summary.final_update = "delivered"
        except FinalUpdateLost as exc:
            self.summary.final_update = "lost"
            self.log.critical("{error}", error=str(exc), event="job.final_update_lost", pandaid=panda_id)
        self.summary.ended_at = self.env.clock.seconds()
        return self.summary

    # -- updates and commands ------------------------------------------------------

    async def _send(self, state: ServerState, fields: JobUpdate | None = None) -> None:
        assert self._reporter is not None
        result = await self._reporter.send(state, fields)
        if result is not None:
            self._handle_commands(result)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        d = Deferred.fromCoroutine(coroutine)
        d.addErrback(lambda f: self.log.failure("background update failed", f))
        self._pending.append(d)

    async def _beat(self) -> None:
        assert self._reporter is not None and self._lifecycle is not None and self.job is not None
        state = self._lifecycle.heartbeat_state
        if state is None or self._reporter.busy:
            return
        extra: dict[str, Any] = {}
        process = self._process
        monitor = self._monitor
        if process is not None and process.running and process.pid is not None:
            if monitor is not None and monitor.last_sample is not None:
                extra.update(monitor_update_fields(monitor.current_fields()))
                last = monitor.last_sample
                extra["cpu_consumption_time"] = int(last.utime + last.stime)
            else:
                usage = tree_usage(process.pid)
                self._max_rss_kb = max(self._max_rss_kb, usage.rss_kb)
                extra["cpu_consumption_time"] = int(usage.cpu_seconds)
                extra["max_rss"] = self._max_rss_kb or None
            extra["cpu_consumption_unit"] = "s"
        if self._heartbeat is not None and self._heartbeat.debug and self.workdir is not None:
            extra["stdout"] = await self._debug_tail()
        fields = JobUpdate(
            job_id=self.job.panda_id, state=state.value, core_count=self.job.core_count, **extra
        )
        self._publish_status()
        await self._send(state, fields)

    async def _debug_tail(self) -> str:
        """What the operator sees of the job in debug mode: the newest file's end, redacted."""
        assert self.workdir is not None
        if self._monitor is not None:
            return await self._monitor.debug_tail()
        settings = self.env.config.monitor
        return await self.env.in_thread(newest_file_tail, self.workdir, settings.debug_tail_bytes)

    def _handle_commands(self, result: UpdateResult) -> None:
        commands = set(result.commands)
        self.summary.commands += [c for c in result.commands if c not in self.summary.commands]
        if "tobekilled" in commands:
            self.abort(ErrorCode.PANDAKILL, "the server asked for the job to be killed", keep_log=True)
        elif "alreadydone" in commands:
            self.abort(ErrorCode.FAILEDBYSERVER, "the server has already ended this job", keep_log=False)
        if "softkill" in commands:
            self.env.on_softkill()
        debug: bool | None = True if "debug" in commands else False if "debugoff" in commands else None
        if debug is not None:
            if self._heartbeat is not None:
                self._heartbeat.set_debug(debug)
            if self._monitor is not None:
                self._monitor.set_debug(debug)

    # -- bookkeeping ---------------------------------------------------------------

    def _record_summary(self, job: Job) -> None:
        assert self._lifecycle is not None
        life = self._lifecycle
        first = self.errors.first
        self.summary.pilot_error_code = int(first.code) if first else 0
        self.summary.pilot_error_diag = first.diag if first else ""
        self.summary.ended_at = self.env.clock.seconds()
        self.summary.durations = {
            "getjob": round(self._getjob_seconds, 3),
            "setup": round(life.duration(JobPhase.SETUP, JobPhase.STAGEIN), 3),
            "stagein": round(life.duration(JobPhase.STAGEIN, JobPhase.RUNNING), 3),
            "payload": round(self._outcome.wall_time, 3) if self._outcome else 0.0,
            "stageout": round(life.duration(JobPhase.STAGEOUT, life.phase), 3),
            "total": round(self.summary.ended_at - self.summary.received_at, 3),
        }
        self.summary.outputs = {f.lfn: f.report_entry() for f in self._reported}
        if self._launcher is not None:
            self.summary.runtimes = dict(self._launcher.runtimes_used)
        if self._staging is not None:
            self.summary.transfers = self._staging.metrics.transfers
        self.log.info(
            "job {pandaid}: {state} (exit {exit_code}, pilot error {code}) in {total:.2f} s",
            pandaid=job.panda_id,
            state=self.summary.state,
            exit_code=self.summary.exit_code,
            code=self.summary.pilot_error_code,
            total=self.summary.durations["total"],
            summary=self.summary.to_json(),
            event="job.summary",
        )
        if self.workdir is not None and self.workdir.is_dir():
            (self.workdir / "job_summary.json").write_text(json.dumps(self.summary.to_json(), indent=1))

    async def _cleanup(self, state: ServerState) -> None:
        keep = self.env.config.keep_workdirs
        if self.workdir is None:
            return
        if keep is KeepWorkdirs.ALL or (keep is KeepWorkdirs.FAILED and state is not ServerState.FINISHED):
            return
        if self._process is not None and self._process.cleaning_up:
            self._process.sweep_now()
        for entry in self._reported:
            if entry.is_log:
                entry.path.unlink(missing_ok=True)
        await self.env.in_thread(shutil.rmtree, self.workdir, True)
