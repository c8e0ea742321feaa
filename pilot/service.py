"""The pilot service: start-up checks, the multi-job loop, shutdown, the exit code.

``PilotService.startService`` starts one coroutine, ``_main``, that

1. creates the pilot's work directory and loads the queue configuration (from a URL
   if ``--queuedata`` names one) and checks the queue's state;
2. asks for a job, runs it (``pilot.job.pipeline.JobRun``), and asks again while the
   timefloor and the remaining lifetime allow, backing off on the clock after a
   request that brought no job;
3. ends with an exit code from ``pilot.errors.ExitCode`` and stops the reactor.

Signals (SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGXCPU) and the end of the lifetime
abort the running job with the matching PanDA code, which sends the final update,
and then the pilot exits with the signal's (or REACHEDMAXTIME's) exit code.  A
second signal kills the payload at once and shortens the wait for the final update.
All timing uses the injected clock.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import psutil
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pilot import __version__
from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode, PilotError, error_for_signal, exit_code_for
from pilot.interfaces import IExperiment
from pilot.job.pipeline import JobEnvironment, JobRun, JobSummary
from pilot.job.reporter import PilotIdentity
from pilot.job.staging import StagingSetup
from pilot.logs import JsonLogFile, pilot_observer
from pilot.monitor.status import STATUS_NAME, StatusFile
from pilot.monitor.workernode import describe_worker_node, find_gpus, report_worker_node
from pilot.process.runner import OS_PROCESS_CONTROL, ProcessControl
from pilot.queuedata import QueueData, parse_queuedata
from pilot.server.client import JobRequest, PandaClient, ServerError, ServerRefused, StatusCode
from pilot.staging.storage import StorageData
from pilot.util.files import write_text_atomically
from pilot.util.threads import ThreadRunner

T = TypeVar("T")

#: Signals the pilot handles as "stop now, report the job, exit".
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGXCPU)

#: A job request is not made with less lifetime left than this (seconds).
MIN_REMAINING_FOR_JOB = 60.0

_MB = 1024 * 1024


def _own_resources() -> dict[str, float]:
    """The pilot process's own CPU time and peak memory (payloads not included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_user_s": round(own.ru_utime, 3),
        "cpu_system_s": round(own.ru_stime, 3),
        "max_rss_kb": own.ru_maxrss,
        "children_cpu_s": round(children.ru_utime + children.ru_stime, 3),
    }


def _utc_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


class PilotService(Service):
    """The pilot; see the module docstring."""

    name = "pilot"
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        config: PilotConfig,
        *,
        clock: IReactorTime,
        spawner: IReactorProcess,
        client: PandaClient,
        experiment: IExperiment,
        in_thread: ThreadRunner,
        environ: Mapping[str, str],
        stop_reactor: Callable[[], None] = lambda: None,
        close_connections: Callable[[], Deferred[None] | None] = lambda: None,
        jitter: Callable[[], float] = random.random,
        process_control: ProcessControl = OS_PROCESS_CONTROL,
        staging: StagingSetup | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._wall = wall
        self._clock = clock
        self._spawner = spawner
        self._client = client
        self._experiment = experiment
        self._in_thread = in_thread
        self._environ = environ
        self._stop_reactor = stop_reactor
        self._close_connections = close_connections
        self._jitter = jitter
        self._process_control = process_control
        self.staging = staging or StagingSetup(
            storage=config.storagedata or StorageData(), records_dir=config.workdir
        )
        self.exit_code: ExitCode | None = None
        self.summaries: list[JobSummary] = []
        self.pilot_dir: Path | None = None
        self.status: StatusFile | None = None
        self._node_report: Deferred[None] | None = None
        self.queuedata: QueueData = config.queuedata or QueueData.default(config.queue)
        self._started_at = 0.0
        self._main_done: Deferred[ExitCode] | None = None
        self._stop_code: ErrorCode | None = None
        self._signals_seen = 0
        self._softkill = False
        self._current: JobRun | None = None
        self._wait: Deferred[Any] | None = None
        self._lifetime_call: IDelayedCall | None = None
        self._json_log: JsonLogFile | None = None
        self._finished: Deferred[None] = Deferred()

    # -- Service API ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._started_at = self._clock.seconds()
        if self.config.log_file is not None:
            self._json_log = JsonLogFile(self.config.log_file)
            try:
                self._json_log.open()
            except OSError as exc:
                self.log.error(
                    "cannot open JSON log {path}: {error}", path=self.config.log_file, error=exc.strerror
                )
                self._json_log = None
        main = Deferred.fromCoroutine(self._main())
        self._main_done = main
        main.addErrback(self._crashed)
        main.addCallback(self._wrap_up)

    def stopService(self) -> Deferred[None]:
        """Called by twistd at reactor shutdown; fires once the pilot has wrapped up."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._main_done is not None and not self._main_done.called:
            self._request_stop(ErrorCode.GENERALERROR, "the pilot is being shut down")
        return self._finished_deferred()

    def _finished_deferred(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self._finished.called:
            waiter.callback(None)
        else:
            self._finished.addBoth(lambda _: waiter.callback(None))
        return waiter

    # -- external events -----------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        """A signal arrived (called in the reactor thread)."""
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            self.log.warn("received {signal}: stopping", signal=name, event="pilot.signal")
            self._request_stop(error_for_signal(signum), f"the pilot received {name}")
        else:
            self.log.warn(
                "received {signal} again: killing the payload now", signal=name, event="pilot.signal"
            )
            if self._current is not None:
                self._current.abort(
                    error_for_signal(signum),
                    f"the pilot received {name}",
                    kill_now=True,
                    final_deadline=self._clock.seconds() + min(10.0, self.config.shutdown_grace),
                )

    def softkill(self) -> None:
        """The server asked the pilot to take no further job."""
        if not self._softkill:
            self._softkill = True
            self.log.info("softkill: no further job will be fetched", event="pilot.softkill")

    def _request_stop(self, code: ErrorCode, detail: str) -> None:
        if self._stop_code is None:
            self._stop_code = code
        if self._current is not None:
            self._current.abort(
                code,
                detail,
                final_deadline=self._clock.seconds() + self.config.kill_grace + self.config.shutdown_grace,
            )
        if self._wait is not None:
            self._wait.cancel()

    def _lifetime_reached(self) -> None:
        self._lifetime_call = None
        self.log.warn("the pilot's lifetime is up", event="pilot.lifetime")
        if self._current is not None and self._stop_code is None:
            self._stop_code = ErrorCode.REACHEDMAXTIME
            self._current.abort(
                ErrorCode.REACHEDMAXTIME,
                f"pilot lifetime of {self.lifetime:.0f} s reached",
                final_deadline=self._deadline(),
            )
        elif self._wait is not None:
            self._wait.cancel()

    # -- the main coroutine --------------------------------------------------------

    async def _main(self) -> ExitCode:
        self.log.info(
            "txpilot {version} for queue {queue} against {url} (api {api})",
            version=__version__,
            queue=self.config.queue,
            url=self.config.server_url,
            api=self.config.api.value,
            event="pilot.start",
        )
        try:
            self.pilot_dir = self._make_pilot_dir()
            self.status = StatusFile(self.pilot_dir / STATUS_NAME, self._in_thread)
            self.status.update(
                pilot={
                    "queue": self.config.queue,
                    "server": self.config.server_url,
                    "started": _utc_text(self._wall()),
                    "pid": os.getpid(),
                    "jobs": 0,
                }
            )
            await self._load_queuedata()
            self._node_report = Deferred.fromCoroutine(self._report_worker_node())
        except PilotError as exc:
            self.log.error("{diag}", diag=exc.diag, event="pilot.startup_failed", code=int(exc.code))
            return exit_code_for(exc.code)
        end_of_work = self._started_at + self.lifetime - self.config.lifetime_margin
        self._lifetime_call = self._clock.callLater(
            max(0.0, end_of_work - self._clock.seconds()), self._lifetime_reached
        )
        return await self._job_loop()

    def _make_pilot_dir(self) -> Path:
        base = self.config.workdir.absolute()
        path = base / f"txpilot_{os.getpid()}_{int(self._clock.seconds())}"
        try:
            path.mkdir(parents=True, mode=0o750)
        except OSError as exc:
            raise PilotError(
                ErrorCode.MKDIR, f"cannot create the pilot directory {path}: {exc.strerror}"
            ) from None
        return path

    async def _load_queuedata(self) -> None:
        source = self.config.queuedata_source
        if source and self.config.queuedata is None:
            try:
                data = await self._client.get_bytes(source)
            except ServerError as exc:
                raise PilotError(
                    ErrorCode.QUEUEDATA, f"cannot download queuedata from {source}: {exc}"
                ) from None
            self.queuedata = parse_queuedata(data, self.config.queue)
        storage_source = self.config.storagedata_source
        if storage_source and self.config.storagedata is None:
            try:
                data = await self._client.get_bytes(storage_source)
            except ServerError as exc:
                raise PilotError(
                    ErrorCode.QUEUEDATA,
                    f"cannot download the storage description from {storage_source}: {exc}",
                ) from None
            self.staging = replace(self.staging, storage=StorageData.from_bytes(data))
        self.queuedata = self._experiment.adjust_queuedata(self.queuedata)
        problem = self.queuedata.state_error()
        if problem is not None:
            raise problem
        self.log.info(
            "queue {queue}: timefloor {timefloor} s, maxtime {maxtime} s",
            queue=self.queuedata.name,
            timefloor=self.queuedata.timefloor,
            maxtime=self.queuedata.maxtime,
            event="pilot.queuedata",
        )

    @property
    def lifetime(self) -> float:
        """The pilot's lifetime: ``--lifetime``, shortened by the queue's ``maxtime``."""
        maxtime = float(self.queuedata.maxtime)
        lifetime: float = self.config.lifetime
        return min(lifetime, maxtime) if maxtime > 0 else lifetime

    def _deadline(self) -> float:
        """The absolute end of the pilot's life: no update is attempted after it."""
        return self._started_at + self.lifetime

    def _remaining(self) -> float:
        return self._started_at + self.lifetime - self.config.lifetime_margin - self._clock.seconds()

    def _why_stop_fetching(self, jobs_run: int) -> str | None:
        if self._stop_code is not None:
            return f"stop requested ({self._stop_code.name})"
        if self._softkill:
            return "the server sent softkill"
        if jobs_run > 0:
            elapsed = self._clock.seconds() - self._started_at
            if self.queuedata.timefloor <= 0:
                return "the queue has no timefloor: one job per pilot"
            if elapsed >= self.queuedata.timefloor:
                return f"timefloor of {self.queuedata.timefloor} s used up after {elapsed:.0f} s"
        if self._remaining() < MIN_REMAINING_FOR_JOB:
            return f"only {max(0.0, self._remaining()):.0f} s of lifetime left"
        return None

    async def _job_loop(self) -> ExitCode:
        jobs_run = 0
        without_job = 0
        failures_in_a_row = 0
        streak_all_failures = False
        while True:
            reason = self._why_stop_fetching(jobs_run)
            if reason is not None:
                self.log.info("no further job: {reason}", reason=reason, event="pilot.wrap_up")
                break
            asked_at = self._clock.seconds()
            failed = False
            try:
                result = await self._guarded(self._client.acquire_job(self._job_request()))
            except CancelledError:
                continue
            except ServerRefused as exc:
                if exc.http_status in (401, 403):
                    return self._refused(str(exc))
                failed = True
                self.log.error("job request failed: {error}", error=str(exc), event="pilot.getjob_failed")
            except ServerError as exc:
                failed = True
                self.log.error("job request failed: {error}", error=str(exc), event="pilot.getjob_failed")
            else:
                if result.status is StatusCode.SUCCESS and result.jobs:
                    for definition in result.jobs:
                        await self._run_job(definition, self._clock.seconds() - asked_at)
                        jobs_run += 1
                    without_job = failures_in_a_row = 0
                    streak_all_failures = False
                    continue
                if result.status in (StatusCode.ROLE, StatusCode.PERMISSION):
                    return self._refused(f"StatusCode {int(result.status)}: {result.message}")
                if result.status is not StatusCode.NO_JOBS:
                    failed = True
                    self.log.error(
                        "job request refused: StatusCode {status} {message}",
                        status=int(result.status),
                        message=result.message,
                        event="pilot.getjob_refused",
                    )
                else:
                    self.log.info(
                        "no job available for {queue}", queue=self.config.queue, event="pilot.nojob"
                    )
            without_job += 1
            failures_in_a_row = failures_in_a_row + 1 if failed else 0
            streak_all_failures = failed if without_job == 1 else (streak_all_failures and failed)
            if failures_in_a_row >= max(1, self.config.getjob_failures):
                self.log.error("{n} job requests failed in a row", n=failures_in_a_row, event="pilot.wrap_up")
                break
            if without_job >= max(1, self.config.getjob_requests):
                self.log.info("no job after {n} requests", n=without_job, event="pilot.wrap_up")
                break
            delay = self._backoff(without_job)
            self.log.info("next job request in {delay:.1f} s", delay=delay, event="pilot.backoff")
            try:
                await self._guarded(deferLater(self._clock, delay, lambda: None))
            except CancelledError:
                continue
        if self._stop_code is not None:
            return exit_code_for(self._stop_code)
        if streak_all_failures and without_job > 0:
            return ExitCode.COMMUNICATIONFAILURE
        return ExitCode.OK

    def _refused(self, reason: str) -> ExitCode:
        """The server will not give this pilot jobs with its credentials: asking again is pointless."""
        self.log.error(
            "the server refuses this pilot's credentials ({reason}); check the proxy's VOMS role or the token",
            reason=reason,
            event="pilot.refused",
        )
        return exit_code_for(self._stop_code) if self._stop_code is not None else ExitCode.NOPROXY

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.nojob_backoff * 2.0 ** (attempt - 1), self.config.nojob_backoff_max)
        return base * (0.5 + self._jitter())

    async def _guarded(self, awaitable: Deferred[T] | Coroutine[Any, Any, T]) -> T:
        """Await something the stop logic may cancel (a job request, a backoff wait)."""
        wait: Deferred[T] = (
            awaitable if isinstance(awaitable, Deferred) else Deferred.fromCoroutine(awaitable)
        )
        self._wait = wait
        try:
            return await wait
        finally:
            self._wait = None

    def _job_request(self) -> JobRequest:
        label = "test" if self.queuedata.is_test else self.config.job_label
        disk_mb: int | None = None
        if self.pilot_dir is not None:
            try:
                disk_mb = shutil.disk_usage(self.pilot_dir).free // _MB
            except OSError:
                disk_mb = None
        frequency = None
        try:
            freq = psutil.cpu_freq()
            frequency = int(freq.current) if freq and freq.current else None
        except (OSError, NotImplementedError, AttributeError):
            frequency = None
        return JobRequest(
            site_name=self.queuedata.resource,
            computing_element=self.config.queue,
            prod_source_label=label,
            node=self.config.node,
            disk_space=disk_mb,
            memory=psutil.virtual_memory().total // _MB,
            cpu=frequency,
            resource_type=self.config.resource_type or None,
            harvester_id=self.config.harvester_id or None,
            worker_id=self.config.worker_id,
            remaining_time=int(max(0.0, self._remaining())),
        )

    def _identity(self) -> PilotIdentity:
        source = self._environ.get("GTAG") or f"{self.config.node}:{os.getpid()}"
        batch = (
            "SLURM"
            if "SLURM_JOB_ID" in self._environ
            else ("CONDOR" if "_CONDOR_JOB_AD" in self._environ else "")
        )
        pilot_id = "|".join(p for p in (source, batch, "PR", f"txpilot-{__version__}") if p)
        return PilotIdentity(
            site_name=self.queuedata.resource,
            node=self.config.node,
            pilot_id=pilot_id,
            batch_id=self.config.batch_id,
            scheduler_id=self.config.harvester_id,
        )

    async def _run_job(self, definition: Mapping[str, Any], getjob_seconds: float) -> None:
        assert self.pilot_dir is not None
        env = JobEnvironment(
            client=self._client,
            clock=self._clock,
            spawner=self._spawner,
            in_thread=self._in_thread,
            config=self.config,
            queuedata=self.queuedata,
            experiment=self._experiment,
            identity=self._identity(),
            pilot_dir=self.pilot_dir,
            pilot_environ=self._environ,
            deadline=self._deadline,
            on_softkill=self.softkill,
            process_control=self._process_control,
            staging=self.staging,
            status=self.status,
            wall=self._wall,
        )
        run = JobRun(env, definition, getjob_seconds=getjob_seconds)
        self._current = run
        try:
            summary = await run.run()
        finally:
            self._current = None
        self.summaries.append(summary)
        if self.status is not None:
            pilot_section = dict(self.status.document.get("pilot", {}), jobs=len(self.summaries))
            last = {"pandaid": summary.panda_id, "state": summary.state, "ended": _utc_text(self._wall())}
            last["pilot_error_code"] = summary.pilot_error_code
            self.status.update(pilot=pilot_section, job=None, last_job=last)
        self._write_summary_file()

    # -- the end -------------------------------------------------------------------

    def _crashed(self, failure: Any) -> ExitCode:
        self.log.failure("the pilot failed unexpectedly", failure)
        return ExitCode.UNKNOWNEXCEPTION

    async def _report_worker_node(self) -> None:
        """Describe this node to the server once per pilot (v1 servers only; never fails)."""
        if not self.config.report_worker_node:
            return
        try:
            node = await self._in_thread(
                describe_worker_node,
                self.pilot_dir or self.config.workdir,
                site=self.queuedata.site or self.queuedata.resource,
                panda_queue=self.config.queue,
                host_name=self.config.node or None,
            )
            gpus = await find_gpus(self._spawner, self._environ, clock=self._clock)
            await report_worker_node(self._client, node, gpus)
        except Exception:  # noqa: BLE001 - a description of the node must never stop the pilot
            self.log.failure("cannot describe the worker node")

    async def _cleanup(self) -> None:
        if self._node_report is not None and not self._node_report.called:
            self._node_report.cancel()
        if self._lifetime_call is not None and self._lifetime_call.active():
            self._lifetime_call.cancel()
        self._lifetime_call = None
        if self.pilot_dir is not None and self.config.keep_workdirs is KeepWorkdirs.NONE:
            await self._in_thread(shutil.rmtree, self.pilot_dir, True)
        closing = self._close_connections()
        if closing is not None:
            await closing

    def _wrap_up(self, code: ExitCode) -> Deferred[None]:
        self.exit_code = code
        self._write_summary_file()
        for summary in self.summaries:
            self.log.info(
                "job {pandaid}: {state}, exit code {exit_code}, pilot error {code}, {total:.2f} s",
                pandaid=summary.panda_id,
                state=summary.state,
                exit_code=summary.exit_code,
                code=summary.pilot_error_code,
                total=summary.durations.get("total", 0.0),
                event="pilot.job_line",
            )
        self.log.info(
            "pilot done: {n} job(s), exit code {code} ({name})",
            n=len(self.summaries),
            code=int(code),
            name=code.name,
            event="pilot.end",
        )

        async def finish() -> None:
            try:
                await self._cleanup()
            finally:
                if self._json_log is not None:
                    self._json_log.close()
                self._finished.callback(None)
                self._stop_reactor()

        return Deferred.fromCoroutine(finish())

    def _write_summary_file(self) -> None:
        path = self.config.summary_file
        if path is None:
            return
        document = {
            "pilot": {
                "version": __version__,
                "queue": self.config.queue,
                "node": self.config.node,
                "started_at": self._started_at,
                "exit_code": int(self.exit_code) if self.exit_code is not None else None,
                "exit_name": self.exit_code.name if self.exit_code is not None else None,
                "server_calls": self._client.calls,
                "resources": _own_resources(),
            },
            "jobs": [s.to_json() for s in self.summaries],
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(document, indent=1), durable=False)
        except OSError as exc:
            self.log.error("cannot write summary file {path}: {error}", path=path, error=exc.strerror)
