"""The pilot as a service tree: the job loop and what it needs, started and stopped in order.

``PilotService`` (a ``MultiService``, built by ``pilot.tap``) holds

* ``jobs`` (``JobLoop``): start-up, the job loop, the exit code;
* ``node-report``: the worker node's description, sent once at start (v1 servers);
* ``closing`` steps: the server connections (and any other resource ``pilot.tap``
  hands in) closed when the pilot stops.

When the job loop ends, the pilot writes its summary, removes its work directory
(unless asked to keep it), logs its last line and asks for the reactor to stop;
twistd then calls ``stopService``, which stops the children one after the other, each
bounded by a time-out on the injected clock (a stuck step is logged and skipped:
twistd would otherwise wait for ever).  The exit code is ``exit_code``; library code
never ends the process (``pilot.tap`` applies it at exit).

Signals (SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGXCPU) abort the running job with the
matching PanDA code; a second signal kills the payload at once and shortens the wait
for the final update.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, TimeoutError, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errors import ExitCode, error_for_signal
from pilot.interfaces import IExperiment, IJobReporter, IJobSource
from pilot.job.staging import StagingSetup
from pilot.job.summary import JobSummary
from pilot.logs import JsonLogFile, pilot_observer
from pilot.process.runner import OS_PROCESS_CONTROL, ProcessControl
from pilot.queuedata import QueueData
from pilot.server.client import PandaClient
from pilot.service.jobloop import JobLoop
from pilot.service.summaryfile import summary_document, write_summary_file
from pilot.source.panda import PandaServerSource
from pilot.util.deferreds import OneShot
from pilot.util.secrets import SecretValues
from pilot.util.threads import ThreadRunner

#: Signals the pilot handles as "stop now, report the job, exit".
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGXCPU)

#: Longest wait for a closing step (connections, the thread pool) at shutdown.
CLOSE_TIMEOUT = 10.0


class ClosingStep(Service):
    """A resource to release when the pilot stops (``close`` returns a Deferred or None)."""

    def __init__(self, name: str, close: Callable[[], Deferred[Any] | None]) -> None:
        self.name = name
        self._close = close

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._close()


class NodeReport(Service):
    """Describes the worker node to the server once per pilot; never fails, cancelled at stop."""

    name = "node-report"
    log = Logger(observer=pilot_observer)

    def __init__(self, send: Callable[[], Awaitable[None]]) -> None:
        self._send = send
        self._sending: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._sending = Deferred.fromCoroutine(self._report())

    async def _report(self) -> None:
        try:
            await self._send()
        except CancelledError:
            self.log.info("worker node report cancelled: the pilot is stopping", event="pilot.node_report")
        except Exception:  # noqa: BLE001 - a description of the node must never stop the pilot
            self.log.failure("cannot describe the worker node")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sending is not None and not self._sending.called:
            self._sending.cancel()
        return self._sending


class PilotService(MultiService):
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
        close_connections: Callable[[], Deferred[Any] | None] = lambda: None,
        jitter: Callable[[], float] = random.random,
        process_control: ProcessControl = OS_PROCESS_CONTROL,
        staging: StagingSetup | None = None,
        wall: Callable[[], float] = time.time,
        source: IJobSource | None = None,
        reporter: IJobReporter | None = None,
        secrets: SecretValues | None = None,
        pilot_dir: Path | None = None,
        helpers: Sequence[IService] = (),
        adjust_queuedata: Callable[[QueueData], QueueData] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.client = client
        self._clock = clock
        self._in_thread = in_thread
        self._environ = environ
        self._spawner = spawner
        self._stop_reactor = stop_reactor
        if secrets is None:
            secrets = SecretValues()
            secrets.add_environment(environ)
        panda = PandaServerSource(client)
        self.source: IJobSource = source or panda
        self.jobs = JobLoop(
            config,
            clock=clock,
            spawner=spawner,
            source=self.source,
            reporter=reporter or panda,
            client=client,
            experiment=experiment,
            in_thread=in_thread,
            environ=environ,
            jitter=jitter,
            process_control=process_control,
            staging=staging,
            wall=wall,
            on_job_done=lambda _summary: self._write_summary_file(),
            secrets=secrets,
            pilot_dir=pilot_dir,
            adjust_queuedata=adjust_queuedata,
        )
        self._close_connections = close_connections
        # started in this order, stopped in the reverse one (see stopService): what the
        # job loop needs (connections, credentials, threads) outlives it
        ClosingStep("server-connections", self.close_connections).setServiceParent(self)  # type: ignore[no-untyped-call]
        for helper in helpers:
            helper.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.jobs.setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.report_worker_node:
            NodeReport(self._report_worker_node).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.exit_code: ExitCode | None = None
        self._signals_seen = 0
        self._json_log: JsonLogFile | None = None
        self._finished: OneShot[None] = OneShot()
        self._stopping: OneShot[None] | None = None
        self._summary_lock = DeferredLock()

    # -- what tests and tools look at ----------------------------------------------

    @property
    def summaries(self) -> list[JobSummary]:
        return self.jobs.summaries

    @property
    def pilot_dir(self) -> Any:
        return self.jobs.pilot_dir

    def close_connections(self) -> Deferred[None]:
        """Close the server connections the pilot keeps open (idempotent)."""
        closing = self._close_connections()
        done: Deferred[None] = closing.addCallback(lambda _: None) if closing is not None else succeed(None)
        return done

    def when_finished(self) -> Deferred[None]:
        """Fires once the pilot has wrapped up (summary written, directory removed)."""
        return self._finished.wait()

    # -- Service API ---------------------------------------------------------------

    def startService(self) -> None:
        if self.config.log_file is not None:
            self._json_log = JsonLogFile(self.config.log_file, mode=self.config.modes.file)
            try:
                self._json_log.open()
            except OSError as exc:
                self.log.error(
                    "cannot open JSON log {path}: {error}", path=self.config.log_file, error=exc.strerror
                )
                self._json_log = None
        super().startService()  # type: ignore[no-untyped-call]
        self.jobs.when_done().addCallback(lambda code: Deferred.fromCoroutine(self._wrap_up(code)))

    def stopService(self) -> Deferred[None]:
        """Stop the children in reverse order of start, each bounded in time; never fails."""
        if self._stopping is None:
            self._stopping = OneShot()
            self._stopping.follow(Deferred.fromCoroutine(self._stop_children()))
        return self._stopping.wait()

    async def _stop_children(self) -> None:
        if self.running:
            Service.stopService(self)  # type: ignore[no-untyped-call]
        grace = self.config.kill_grace + self.config.shutdown_grace + CLOSE_TIMEOUT
        for child in reversed(list(self)):
            await self._stop_child(child, grace if child is self.jobs else CLOSE_TIMEOUT)
            if child is self.jobs and self.jobs.started_at:
                # the wrap-up (summary, pilot directory) follows the loop's end and needs the
                # thread pools and credentials that are stopped next
                await self._stop_child_deferred("wrap-up", self.when_finished(), CLOSE_TIMEOUT)

    async def _stop_child(self, child: IService, timeout: float) -> None:
        if not child.running:
            return
        try:
            stopping = child.stopService()  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001 - one child's failure must not keep the others running
            self.log.failure("stopping {name} failed", name=child.name)
            return
        if isinstance(stopping, Deferred):
            await self._stop_child_deferred(child.name or "?", stopping, timeout)

    async def _stop_child_deferred(self, name: str, stopping: Deferred[Any], timeout: float) -> None:
        stopping.addTimeout(timeout, self._clock)
        try:
            await stopping
        except TimeoutError:
            self.log.error("stopping {name} took over {timeout:.0f} s: going on", name=name, timeout=timeout)
        except Exception:  # noqa: BLE001 - shutdown goes on whatever one step did
            self.log.failure("stopping {name} failed", name=name)

    # -- external events -----------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        """A signal arrived (called in the reactor thread)."""
        self._signals_seen += 1
        name = signal.Signals(signum).name
        detail = f"the pilot received {name}"
        if self._signals_seen == 1:
            self.log.warn("received {signal}: stopping", signal=name, event="pilot.signal")
            self.jobs.request_stop(error_for_signal(signum), detail)
        else:
            self.log.warn(
                "received {signal} again: killing the payload now", signal=name, event="pilot.signal"
            )
            deadline = self._clock.seconds() + min(10.0, self.config.shutdown_grace)
            self.jobs.request_stop(error_for_signal(signum), detail, final_deadline=deadline, kill_now=True)

    # -- the end -------------------------------------------------------------------

    async def _report_worker_node(self) -> None:
        if not await self.jobs.ready:
            return
        # imported here: once per pilot, and never when the report is turned off
        from pilot.monitor.gpus import find_gpus
        from pilot.monitor.workernode import describe_worker_node, report_worker_node

        node = await self._in_thread(
            describe_worker_node,
            self.jobs.pilot_dir or self.config.workdir,
            site=self.jobs.queuedata.site or self.jobs.queuedata.resource,
            panda_queue=self.config.queue,
            host_name=self.config.node or None,
        )
        gpus = await find_gpus(self._spawner, self._environ, clock=self._clock)
        await report_worker_node(self.client, node, gpus)

    async def _wrap_up(self, code: ExitCode) -> None:
        self.exit_code = code
        try:
            await self._write_summary_file_now()
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
            if self.jobs.status is not None:
                await self.jobs.status.close()
            pilot_dir = self.jobs.pilot_dir
            if pilot_dir is not None and self.config.keep_workdirs is KeepWorkdirs.NONE:
                await self._in_thread(shutil.rmtree, pilot_dir, True)
            self.log.info(
                "pilot done: {n} job(s), exit code {code} ({name})",
                n=len(self.summaries),
                code=int(code),
                name=code.name,
                event="pilot.end",
            )
        finally:
            if self._json_log is not None:
                self._json_log.close()
                self._json_log = None
            self._finished.fire(None)
            self._stop_reactor()

    def _write_summary_file(self) -> None:
        writing = Deferred.fromCoroutine(self._write_summary_file_now())
        writing.addErrback(lambda f: self.log.failure("cannot write the summary file", f))

    def _costs(self) -> dict[str, Any]:
        """What the pilot's own traffic cost: connections, TLS handshakes, downloads."""
        costs: dict[str, Any] = {}
        connection = self.client.connection
        if connection is not None:
            costs["connections"] = connection.stats.as_dict()
        downloads = self.jobs.downloads
        if downloads is not None:
            costs["downloads"] = {"fetched": downloads.downloads, "revalidated": downloads.revalidations}
        return costs

    async def _write_summary_file_now(self) -> None:
        """Write the summary as it is now; writes never overlap, so the last one written wins."""
        path = self.config.summary_file
        if path is None:
            return
        async with self._summary_lock:  # built inside the lock: a later write has newer facts
            document = summary_document(
                self.config,
                self.jobs.started_at,
                self.exit_code,
                self.source.calls,
                self.summaries,
                self._costs(),
            )
            try:
                await self._in_thread(write_summary_file, path, document, self.config.modes.file)
            except OSError as exc:
                self.log.error("cannot write summary file {path}: {error}", path=path, error=exc.strerror)
