"""The job loop: start-up checks, then ask for a job, run it, and ask again while allowed.

``JobLoop.startService`` starts one coroutine that

1. creates the pilot's work directory, loads the queue configuration (from a URL if
   ``--queuedata`` names one) and checks the queue's state;
2. asks its job source for a job, runs it (``pilot.job.pipeline.JobRun``), and asks
   again while the timefloor and the remaining lifetime allow, backing off on the
   clock after a request that brought no job;
3. ends with an exit code (``pilot.errors.ExitCode``), delivered through ``done``.

``-v/--getjob-requests`` counts answers without a job in a row, ``-x/--getjob-failures``
failed requests in a row (a failure is not a "no job": both limits can be reached).
Signals and the end of the lifetime abort the running job with the matching PanDA
code; the job still sends its final update, then the loop ends with the signal's
(or REACHEDMAXTIME's) exit code.  All timing uses the injected clock.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pilot import __version__
from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode, PilotError, exit_code_for
from pilot.interfaces import IEventSource, IExperiment, IJobReporter, IJobSource
from pilot.job.context import Download, JobEnvironment
from pilot.job.pipeline import JobRun
from pilot.job.recovery import journaled_jobs
from pilot.job.resumed import ResumedJob
from pilot.job.staging import StagingSetup
from pilot.job.summary import JobSummary, utc_text
from pilot.logs import pilot_observer
from pilot.monitor.lag import ReactorLagProbe
from pilot.monitor.status import STATUS_NAME, StatusFile
from pilot.process.runner import OS_PROCESS_CONTROL, ProcessControl
from pilot.queuedata import QueueData, parse_queuedata
from pilot.server.client import PandaClient, ServerError, ServerRefused, StatusCode
from pilot.server.downloads import DownloadCache
from pilot.service.journaling import (
    all_delivered,
    claim_dead_journals,
    close_journal,
    open_journal,
    remove_dead_pilot_dir,
)
from pilot.service.requests import job_request, node_resources, pilot_identity
from pilot.source.modes import no_network, no_network_file
from pilot.staging.storage import StorageData
from pilot.util.deferreds import OneShot
from pilot.util.journal import Journal
from pilot.util.secrets import SecretValues
from pilot.util.threads import ThreadRunner

T = TypeVar("T")

#: Largest transformation the pilot downloads.  Downloads stream to disk (memory is not
#: at stake); the bound keeps a wrong URL from filling the work directory.
TRANSFORMATION_LIMIT = 1 << 30

#: Seconds between the reactor-lag probe's ticks while a job runs.  Every tick wakes the
#: reactor (about 0.2 ms of CPU each): at 0.5 s the probe costs 0.05 % of a core, sees
#: every stall longer than that, and a shorter one with a chance of its length / 0.5 s.
#: ``bench/reactorlag`` probes every 5 ms.
LAG_PROBE_INTERVAL = 0.5

#: A job request is not made with less lifetime left than this (seconds).
MIN_REMAINING_FOR_JOB = 60.0


class JobLoop(Service):
    """See the module docstring."""

    name = "jobs"
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        config: PilotConfig,
        *,
        clock: IReactorTime,
        spawner: IReactorProcess,
        source: IJobSource,
        reporter: IJobReporter,
        client: PandaClient,
        experiment: IExperiment,
        in_thread: ThreadRunner,
        environ: Mapping[str, str],
        jitter: Callable[[], float] = random.random,
        process_control: ProcessControl = OS_PROCESS_CONTROL,
        staging: StagingSetup | None = None,
        wall: Callable[[], float] = time.time,
        on_job_done: Callable[[JobSummary], None] = lambda summary: None,
        secrets: SecretValues | None = None,
        pilot_dir: Path | None = None,
        lag_probe: ReactorLagProbe | None = None,
        adjust_queuedata: Callable[[QueueData], QueueData] | None = None,
    ) -> None:
        self.config = config
        #: A file mode's changes to the queue's description (``pilot.source.modes``).
        self._adjust_queuedata = adjust_queuedata
        self._clock = clock
        self._spawner = spawner
        self._source = source
        self._reporter = reporter
        #: Event-service jobs need ranges: from the job source, when it serves them.
        self._event_source: IEventSource | None = source if IEventSource.providedBy(source) else None
        self._client = client
        #: In a file mode nothing is downloaded: the pilot opens no network connection.
        self._offline = config.harvester.offline
        self._fetch: Download = no_network if self._offline else client.get_bytes
        self._experiment = experiment
        self._in_thread = in_thread
        self._environ = environ
        self._jitter = jitter
        self._process_control = process_control
        self._wall = wall
        self._on_job_done = on_job_done
        self._secrets = secrets if secrets is not None else SecretValues()
        #: Measures the reactor's lateness while a job runs (its figures join the job's summary).
        self._lag = lag_probe if lag_probe is not None else ReactorLagProbe(clock, LAG_PROBE_INTERVAL)
        self.staging = staging or StagingSetup(
            storage=config.storagedata or StorageData(), records_dir=config.workdir
        )
        self.queuedata: QueueData = config.queuedata or QueueData.default(config.queue)
        self.summaries: list[JobSummary] = []
        #: Made by the job loop at start unless ``pilot.tap`` made it already.
        self.pilot_dir: Path | None = pilot_dir
        self.status: StatusFile | None = None
        self.started_at = 0.0
        self._done: OneShot[ExitCode] = OneShot()
        #: Fires with True once the pilot directory and the queue configuration are ready
        #: (False if start-up failed): what else needs them waits for this.
        self.ready: Deferred[bool] = Deferred()
        self._stop_code: ErrorCode | None = None
        #: This pilot's journal (``pilot.service.journaling``), once the job loop has opened it.
        self.journal: Journal | None = None
        self._softkill = False
        self._current: JobRun | ResumedJob | None = None
        self._wait: Deferred[Any] | None = None
        self._lifetime_call: IDelayedCall | None = None
        #: Transformations fetched once per pilot (made with the pilot directory).
        self.downloads: DownloadCache | None = None

    # -- Service API ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.started_at = self._clock.seconds()
        main = Deferred.fromCoroutine(self._main())
        main.addErrback(self._crashed)
        main.addCallback(self._ended)

    def stopService(self) -> Deferred[ExitCode]:
        """Stop: the running job is aborted (its final update still goes out); fires with the exit code."""
        super().stopService()  # type: ignore[no-untyped-call]
        if not self._done.fired:
            self.request_stop(ErrorCode.GENERALERROR, "the pilot is being shut down")
        return self._done.wait()

    # -- control from outside ------------------------------------------------------

    def request_stop(
        self, code: ErrorCode, detail: str, *, final_deadline: float | None = None, kill_now: bool = False
    ) -> None:
        """Stop fetching; abort the running job with ``code`` (the first stop's code wins)."""
        if self._stop_code is None:
            self._stop_code = code
        if final_deadline is None:
            final_deadline = self._clock.seconds() + self.config.kill_grace + self.config.shutdown_grace
        if self._current is not None:
            self._current.abort(code, detail, final_deadline=final_deadline, kill_now=kill_now)
        if self._wait is not None:
            self._wait.cancel()

    def softkill(self) -> None:
        """The server asked the pilot to take no further job."""
        if not self._softkill:
            self._softkill = True
            self.log.info("softkill: no further job will be fetched", event="pilot.softkill")

    def _lifetime_reached(self) -> None:
        self._lifetime_call = None
        self.log.warn("the pilot's lifetime is up", event="pilot.lifetime")
        if self._stop_code is None:
            self.request_stop(
                ErrorCode.REACHEDMAXTIME,
                f"pilot lifetime of {self.lifetime:.0f} s reached",
                final_deadline=self._deadline(),
            )

    # -- lifetime ------------------------------------------------------------------

    @property
    def lifetime(self) -> float:
        """The pilot's lifetime: ``--lifetime``, shortened by the queue's ``maxtime``."""
        maxtime = float(self.queuedata.maxtime)
        lifetime: float = self.config.lifetime
        return min(lifetime, maxtime) if maxtime > 0 else lifetime

    def _deadline(self) -> float:
        """The absolute end of the pilot's life: no update is attempted after it."""
        return self.started_at + self.lifetime

    def _remaining(self) -> float:
        return self.started_at + self.lifetime - self.config.lifetime_margin - self._clock.seconds()

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
        for notice in self.config.notices:
            self.log.warn("{notice}", notice=notice, event="pilot.notice")
        credentials = self.config.credentials
        if credentials.proxy is None and credentials.token_file is None:
            self.log.warn(
                "no credential found: no X509_USER_PROXY, no /tmp/x509up_u{uid} and no token file "
                "(--token-file, PANDA_AUTH_TOKEN); a production server will refuse this pilot",
                uid=os.getuid(),
                event="pilot.no_credential",
            )
        try:
            if self.pilot_dir is None:
                self.pilot_dir = await self._in_thread(
                    make_pilot_dir,
                    self.config.workdir.absolute(),
                    self.started_at,
                    self.config.modes.directory,
                )
            self.downloads = DownloadCache(
                self._client,
                self.pilot_dir / "downloads",
                self._clock,
                self._in_thread,
                limit=TRANSFORMATION_LIMIT,
            )
            self.status = StatusFile(self.pilot_dir / STATUS_NAME, self._in_thread)
            self.status.update(
                pilot={
                    "queue": self.config.queue,
                    "server": self.config.server_url,
                    "started": utc_text(self._wall()),
                    "pid": os.getpid(),
                    "jobs": 0,
                }
            )
            await self._guarded(self._load_queuedata())
        except CancelledError:
            self.ready.callback(False)
            return exit_code_for(self._stop_code or ErrorCode.GENERALERROR)
        except PilotError as exc:
            self.ready.callback(False)
            self.log.error("{diag}", diag=exc.diag, event="pilot.startup_failed", code=int(exc.code))
            return exit_code_for(exc.code)
        self.ready.callback(True)
        end_of_work = self.started_at + self.lifetime - self.config.lifetime_margin
        self._lifetime_call = self._clock.callLater(
            max(0.0, end_of_work - self._clock.seconds()), self._lifetime_reached
        )
        if self.config.journal:
            self.journal = await open_journal(
                self.config.workdir, self._in_thread, self.config.node or "node", self._wall(),
                self._wall, queue=self.config.queue, pilot_dir=str(self.pilot_dir),
            )  # fmt: skip
        try:
            await self._resume_dead_pilots()
            return await self._job_loop()
        finally:
            if self.journal is not None:
                await close_journal(self.journal, self.summaries, self._in_thread)

    async def _document(self, source: str, what: str) -> bytes:
        """A configuration document from ``source``; PilotError(QUEUEDATA) if it cannot be had."""
        try:
            return await self._fetch(source)
        except ServerError as exc:  # the message names the URL
            raise PilotError(ErrorCode.QUEUEDATA, f"cannot download the {what}: {exc}") from None

    async def _load_queuedata(self) -> None:
        source = self.config.queuedata_source
        if source and self.config.queuedata is None:
            data = await self._document(source, "queue configuration")
            self.queuedata = parse_queuedata(data, self.config.queue)
        elif self.config.queuedata is None:
            self.log.warn(
                "no queue configuration loaded (no --queuedata): {queue} runs with defaults "
                "(no timefloor, no storage, no containers)",
                queue=self.config.queue,
                event="pilot.no_queuedata",
            )
        storage_source = self.config.storagedata_source
        if storage_source and self.config.storagedata is None:
            data = await self._document(storage_source, "storage description")
            self.staging = replace(self.staging, storage=StorageData.from_bytes(data))
        self.queuedata = self._experiment.adjust_queuedata(self.queuedata)
        if self._adjust_queuedata is not None:
            self.queuedata = self._adjust_queuedata(self.queuedata)
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

    def _why_stop_fetching(self, jobs_run: int) -> str | None:
        if self._stop_code is not None:
            return f"stop requested ({self._stop_code.name})"
        if self._softkill:
            return "the server sent softkill"
        if jobs_run > 0:
            elapsed = self._clock.seconds() - self.started_at
            if self.queuedata.timefloor <= 0:
                return "the queue has no timefloor: one job per pilot"
            if elapsed >= self.queuedata.timefloor:
                return f"timefloor of {self.queuedata.timefloor} s used up after {elapsed:.0f} s"
        if self._remaining() < MIN_REMAINING_FOR_JOB:
            return f"only {max(0.0, self._remaining()):.0f} s of lifetime left"
        return None

    async def _job_loop(self) -> ExitCode:
        jobs_run = no_job_answers = failures = 0
        while True:
            reason = self._why_stop_fetching(jobs_run)
            if reason is not None:
                self.log.info("no further job: {reason}", reason=reason, event="pilot.wrap_up")
                break
            asked_at = self._clock.seconds()
            try:
                resources = await self._in_thread(node_resources, self.pilot_dir)
                request = job_request(self.config, self.queuedata, resources, self._remaining())
                result = await self._guarded(self._source.acquire_jobs(request))
            except CancelledError:
                continue
            except ServerRefused as exc:
                if exc.http_status in (401, 403):
                    return self._refused(str(exc))
                failures += 1
                self.log.error("job request failed: {error}", error=str(exc), event="pilot.getjob_failed")
            except ServerError as exc:
                failures += 1
                self.log.error("job request failed: {error}", error=str(exc), event="pilot.getjob_failed")
            else:
                if result.status is StatusCode.SUCCESS and result.jobs:
                    for definition in result.jobs:
                        await self._run_job(definition, self._clock.seconds() - asked_at)
                        jobs_run += 1
                    no_job_answers = failures = 0
                    continue
                if result.status in (StatusCode.ROLE, StatusCode.PERMISSION):
                    return self._refused(f"StatusCode {int(result.status)}: {result.message}")
                if result.status is StatusCode.NO_JOBS:
                    no_job_answers += 1
                    failures = 0
                    self.log.info(
                        "no job available for {queue}", queue=self.config.queue, event="pilot.nojob"
                    )
                else:
                    failures += 1
                    self.log.error(
                        "job request refused: StatusCode {status} {message}",
                        status=int(result.status),
                        message=result.message,
                        event="pilot.getjob_refused",
                    )
            if failures >= max(1, self.config.getjob_failures):
                self.log.error("{n} job requests failed in a row", n=failures, event="pilot.wrap_up")
                return exit_code_for(self._stop_code) if self._stop_code else ExitCode.COMMUNICATIONFAILURE
            if no_job_answers >= max(1, self.config.getjob_requests):
                self.log.info("no job after {n} requests", n=no_job_answers, event="pilot.wrap_up")
                break
            delay = self._backoff(no_job_answers + failures)
            self.log.info("next job request in {delay:.1f} s", delay=delay, event="pilot.backoff")
            try:
                await self._guarded(deferLater(self._clock, delay, lambda: None))
            except CancelledError:
                continue
        return exit_code_for(self._stop_code) if self._stop_code is not None else ExitCode.OK

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
        """Await something a stop may cancel (a job request, a backoff wait, the queuedata)."""
        if self._stop_code is not None:
            if not isinstance(awaitable, Deferred):
                awaitable.close()
            else:
                awaitable.cancel()
            raise CancelledError()
        wait: Deferred[T] = (
            awaitable if isinstance(awaitable, Deferred) else Deferred.fromCoroutine(awaitable)
        )
        self._wait = wait
        try:
            return await wait
        finally:
            self._wait = None

    def _environment(self) -> JobEnvironment:
        assert self.pilot_dir is not None and self.downloads is not None
        return JobEnvironment(
            reporter=self._reporter,
            download=self._fetch,
            fetch_file=no_network_file if self._offline else self.downloads.fetch,
            clock=self._clock,
            spawner=self._spawner,
            in_thread=self._in_thread,
            config=self.config,
            queuedata=self.queuedata,
            experiment=self._experiment,
            identity=pilot_identity(self.config, self.queuedata, self._environ),
            pilot_dir=self.pilot_dir,
            pilot_environ=self._environ,
            deadline=self._deadline,
            on_softkill=self.softkill,
            process_control=self._process_control,
            staging=self.staging,
            status=self.status,
            wall=self._wall,
            secrets=self._secrets,
            event_source=self._event_source,
            journal=self.journal,
        )

    async def _run_job(self, definition: Mapping[str, Any], getjob_seconds: float) -> None:
        await self._run_tracked(JobRun(self._environment(), definition, getjob_seconds=getjob_seconds))

    async def _resume_dead_pilots(self) -> None:
        """Finish the jobs of pilots that died on this work area (``pilot.job.resumed``)."""
        own = self.journal.path if self.journal is not None else None
        for claimed in await self._in_thread(claim_dead_journals, self.config.workdir.absolute(), own):
            done_before = len(self.summaries)
            for journaled in journaled_jobs(claimed.entries()):
                if self._stop_code is not None:
                    break
                await self._run_tracked(ResumedJob(self._environment(), journaled))
            finished = all_delivered(self.summaries[done_before:]) and self._stop_code is None
            if finished and self.config.keep_workdirs is KeepWorkdirs.NONE:
                await self._in_thread(remove_dead_pilot_dir, claimed, self.config.workdir.absolute())
            await self._in_thread(claimed.release, remove=finished)

    async def _run_tracked(self, run: JobRun | ResumedJob) -> None:
        self._current = run
        if self._stop_code is not None:  # a stop arrived while the job was being fetched
            run.abort(self._stop_code, "the pilot is stopping")
        self._lag.reset()
        self._lag.start()
        try:
            summary = await run.run()
        finally:
            self._lag.stop()
            self._current = None
        summary.reactor = self._lag.snapshot()
        self.summaries.append(summary)
        if self.status is not None:
            pilot_section = dict(self.status.document.get("pilot", {}), jobs=len(self.summaries))
            last = {"pandaid": summary.panda_id, "state": summary.state, "ended": utc_text(self._wall())}
            last["pilot_error_code"] = summary.pilot_error_code
            self.status.update(pilot=pilot_section, job=None, last_job=last)
        self._on_job_done(summary)

    # -- the end -------------------------------------------------------------------

    def _crashed(self, failure: Any) -> ExitCode:
        self.log.failure("the pilot failed unexpectedly", failure)
        return ExitCode.UNKNOWNEXCEPTION

    def _ended(self, code: ExitCode) -> None:
        if not self.ready.called:
            self.ready.callback(False)
        if self._lifetime_call is not None and self._lifetime_call.active():
            self._lifetime_call.cancel()
        self._lifetime_call = None
        self._done.fire(code)

    def when_done(self) -> Deferred[ExitCode]:
        """Fires with the exit code once the loop has ended."""
        return self._done.wait()

    @property
    def ended(self) -> bool:
        return self._done.fired


def make_pilot_dir(base: Path, started: float, mode: int = 0o700) -> Path:
    """The pilot's own directory, ``txpilot_<pid>_<start>`` under ``base`` (``--file-mode``)."""
    path = base / f"txpilot_{os.getpid()}_{int(started)}"
    try:
        path.mkdir(parents=True, mode=mode)
        path.chmod(mode)
    except OSError as exc:
        raise PilotError(
            ErrorCode.MKDIR, f"cannot create the pilot directory {path}: {exc.strerror}"
        ) from None
    return path
