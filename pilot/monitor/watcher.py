"""The job monitor: while the payload runs, sample it, enforce limits, serve debug tails.

Three ``LoopingCall``s on the injected clock, each doing its I/O in a worker thread:

* **memory** (``memory_interval``, ``debug_interval`` in debug mode): one sample of the
  payload's process tree → prmon-format time series and summary in the work directory;
  PSS above the job's limit kills the payload with PAYLOADEXCEEDMAXMEM.
* **disk** (``disk_interval``): one walk of the work directory → free space on its file
  system (NOLOCALSPACE), its size against ``maxwdir`` (USERDIRTOOLARGE), payload
  stdout/stderr and ``log.*`` against the stdout limit (STDOUTTOOBIG).
* **looping** (``looping_interval``): the newest modification among the payload's files,
  suspension-aware (``LoopingDetector``), against the looping limit (LOOPINGJOB).

and one ``callLater`` at the job's wall-time end (its ``maxWalltime``, the queue's
``maxtime``, the batch system's end of slot), which kills with REACHEDMAXTIME.

A limit violation calls ``abort(code, diag)`` once: the job run records the error and
kills the payload through the runner's TERM→KILL escalation.  Passes never overlap: a
pass still running when the next is due is skipped (LoopingCall waits for it).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.logs import pilot_observer
from pilot.model.job import Job
from pilot.monitor import prmon_output
from pilot.monitor.limits import (
    LoopingDetector,
    batch_end_time,
    job_walltime,
    memory_limit_kb,
    workdir_limit_bytes,
)
from pilot.monitor.redact import redact
from pilot.monitor.sample import Sample
from pilot.monitor.sampler import TreeSampler
from pilot.monitor.scan import WorkdirScan, WorkdirScanner
from pilot.monitor.settings import MonitorSettings
from pilot.queuedata import QueueData
from pilot.server.widths import UPDATE_FITS, tail_lines, utf8_size
from pilot.util.records import record
from pilot.util.secrets import SecretValues
from pilot.util.threads import ThreadRunner

Abort = Callable[[ErrorCode, str], None]

#: Samples kept for the plot; beyond it every other one is dropped (the summary is exact).
MAX_PLOT_SAMPLES = 4000


@record(frozen=True)
class Limits:
    """The numbers one job is held to (None: not checked)."""

    pss_kb: int | None
    workdir_bytes: int | None
    looping: float | None
    walltime_end: float | None  # absolute time on the monitor's clock
    walltime_reason: str = ""

    @classmethod
    def for_job(
        cls,
        job: Job,
        queuedata: QueueData,
        settings: MonitorSettings,
        *,
        started: float,
        environ: Mapping[str, str],
        now: float,
        wall_now: float,
    ) -> Limits:
        ends: list[tuple[float, str]] = []
        walltime = job_walltime(job, queuedata)
        if walltime is not None:
            ends.append((started + walltime, f"wall-time limit of {walltime:.0f} s"))
        batch_end = batch_end_time(environ)
        if batch_end is not None:
            # The batch system's end is in Unix time; the clock may be a test clock.
            ends.append((now + (batch_end - wall_now), "end of the batch slot"))
        looping_off = str(job.raw.get("loopingCheck", "")).lower() in ("false", "0", "no", "off")
        end = min(ends) if ends else None
        return cls(
            pss_kb=memory_limit_kb(job, queuedata),
            workdir_bytes=workdir_limit_bytes(job, queuedata),
            looping=None if looping_off else settings.looping_limit,
            walltime_end=end[0] if end else None,
            walltime_reason=end[1] if end else "",
        )


@record(frozen=True)
class MonitorReport:
    """What the monitor leaves for the final update."""

    fields: dict[str, int]  # maxRSS, avgPSS, totRCHAR, ... (prmon_output.pilot_fields)
    samples: int
    last: Sample | None


class JobMonitor:
    """Watches one payload; ``start`` when it runs, ``stop`` when it has ended."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        *,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        settings: MonitorSettings,
        limits: Limits,
        workdir: Path,
        pid: int,
        abort: Abort,
        panda_id: int,
        debug: bool = False,
        write_files: bool = True,  # False when an external prmon writes the prmon files
        sampler: TreeSampler | None = None,
        skip: tuple[Path, ...] = (),
        wall: Callable[[], float] = time.time,
        secrets: SecretValues | None = None,
    ) -> None:
        self.clock = clock
        self.secrets = secrets
        self.in_thread = in_thread
        self.settings = settings
        self.limits = limits
        self.workdir = workdir
        self.abort_job = abort
        self.panda_id = panda_id
        self.debug = debug
        self.write_files = write_files
        self.started = clock.seconds()
        self.wall = wall
        self.sampler = sampler or TreeSampler(pid, started=wall(), now=wall)
        self.scanner = WorkdirScanner(workdir, skip=skip)
        self.samples: list[Sample] = []  # for the plot: thinned to at most MAX_PLOT_SAMPLES
        self.last_sample: Sample | None = None
        self.summary = prmon_output.RunningSummary()
        self.last_scan: WorkdirScan | None = None
        self._last_scan_at = float("-inf")
        self.idle = 0.0
        self.aborted: ErrorCode | None = None
        self._series = prmon_output.TimeSeriesWriter(workdir / prmon_output.TIME_SERIES_NAME)
        self._detector = (
            LoopingDetector(limits.looping, settings.looping_interval) if limits.looping else None
        )
        self._calls: list[LoopingCall] = []
        self._memory: LoopingCall | None = None
        self._walltime: IDelayedCall | None = None
        self._pending: set[Deferred[Any]] = set()

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        self._memory = self._loop(self._memory_pass, self._memory_interval())
        self._loop(self._disk_pass, self.settings.disk_interval)
        if self._detector is not None:
            self._loop(self._looping_pass, self.settings.looping_interval)
        if self.limits.walltime_end is not None:
            delay = max(0.0, self.limits.walltime_end - self.clock.seconds())
            self._walltime = self.clock.callLater(delay, self._walltime_reached)

    def _loop(self, function: Callable[[], Deferred[None]], interval: float) -> LoopingCall:
        call = LoopingCall(function)
        call.clock = self.clock
        done = call.start(interval, now=False)
        done.addErrback(lambda f: self.log.failure("monitor pass failed", f))
        self._calls.append(call)
        return call

    def _memory_interval(self) -> float:
        settings = self.settings
        return (
            min(settings.debug_interval, settings.memory_interval) if self.debug else settings.memory_interval
        )

    def set_debug(self, on: bool) -> None:
        """Debug mode samples at the debug interval (and heartbeats carry file tails)."""
        if on == self.debug:
            return
        self.debug = on
        if self._memory is not None and self._memory.running:
            self._memory.stop()
            self._calls.remove(self._memory)
            self._memory = self._loop(self._memory_pass, self._memory_interval())

    async def stop(self) -> MonitorReport:
        """Stop every pass, take a last sample, write the summary and the plot."""
        for call in self._calls:
            if call.running:
                call.stop()
        self._calls = []
        if self._walltime is not None and self._walltime.active():
            self._walltime.cancel()
        for pending in list(self._pending):
            await pending
        await self.in_thread(self._write_final)
        self._series.close()
        return MonitorReport(
            fields=prmon_output.pilot_fields(self.summary.summary()) if self.summary.count else {},
            samples=self.summary.count,
            last=self.last_sample,
        )

    def _write_final(self) -> None:
        try:
            if self.write_files:
                prmon_output.write_summary(self.workdir / prmon_output.SUMMARY_NAME, self.summary.summary())
            from pilot.monitor.plot import PLOT_NAME, write_plot  # once per job, at its end

            write_plot(self.workdir / PLOT_NAME, self.samples, f"PanDA job {self.panda_id}")
        except OSError as exc:
            self.log.warn("cannot write the monitor summary: {error}", error=exc)

    def _abort(self, code: ErrorCode, diag: str) -> None:
        if self.aborted is not None:
            return
        self.aborted = code
        self.log.warn(
            "job {pandaid}: {code}: {diag}", pandaid=self.panda_id, code=code.name, diag=diag,
            event="monitor.limit",
        )  # fmt: skip
        self.abort_job(code, diag)

    def _track(self, d: Deferred[None]) -> Deferred[None]:
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    # -- passes --------------------------------------------------------------------

    def _memory_pass(self) -> Deferred[None]:
        return self._track(Deferred.fromCoroutine(self._memory_check()))

    async def _memory_check(self) -> None:
        sample = await self.in_thread(self._sample_and_record)
        if sample is None:
            return
        limit = self.limits.pss_kb
        if limit is not None and sample.pss > limit:
            self._abort(
                ErrorCode.PAYLOADEXCEEDMAXMEM,
                f"PSS {sample.pss // 1024} MB above the limit of {limit // 1024} MB",
            )

    def _sample_and_record(self) -> Sample | None:
        sample = self.sampler.sample()
        if sample.nprocs == 0 and self.last_sample is not None:
            return None  # the payload has gone; keep the last real sample
        self.last_sample = sample
        self.summary.add(sample)
        self.samples.append(sample)
        if len(self.samples) > MAX_PLOT_SAMPLES:
            self.samples = self.samples[::2]  # the plot keeps its shape; memory stays bounded
        if self.write_files:
            try:
                self._series.append(sample)
                prmon_output.write_summary(self.workdir / prmon_output.SUMMARY_NAME, self.summary.summary())
            except OSError:
                pass  # a full disk is the disk check's business
        return sample

    def _disk_pass(self) -> Deferred[None]:
        return self._track(Deferred.fromCoroutine(self._disk_check()))

    async def _disk_check(self) -> None:
        scan, free = await self.in_thread(self._scan_and_free)
        settings = self.settings
        if free is not None and free < settings.min_free_running:
            self._abort(
                ErrorCode.NOLOCALSPACE,
                f"{free / 1e9:.2f} GB free in the work directory's file system"
                f" (at least {settings.min_free_running / 1e9:.2f} GB needed)",
            )
            return
        if self.limits.workdir_bytes is not None and scan.total_bytes > self.limits.workdir_bytes:
            self._abort(
                ErrorCode.USERDIRTOOLARGE,
                f"work directory {scan.total_bytes / 1e6:.0f} MB > limit {self.limits.workdir_bytes / 1e6:.0f} MB",
            )
            return
        if scan.largest_logs and scan.largest_logs[0][1] > settings.stdout_limit:
            name, size = scan.largest_logs[0]
            self._abort(
                ErrorCode.STDOUTTOOBIG,
                f"{name} is {size / 1e6:.0f} MB (limit {settings.stdout_limit / 1e6:.0f} MB)",
            )

    def _scan(self) -> WorkdirScan:
        """A walk of the work directory, or the last one if it is recent enough.

        The disk pass, the looping pass and debug tails all need a walk; when they fall
        due together (same intervals, same start) one walk serves them all.
        """
        now = self.clock.seconds()
        settings = self.settings
        reuse = 0.5 * min(settings.disk_interval, settings.looping_interval, settings.debug_interval)
        if self.last_scan is not None and now - self._last_scan_at < reuse:
            return self.last_scan
        scan = self.scanner.scan()
        self.last_scan, self._last_scan_at = scan, now
        return scan

    def _scan_and_free(self) -> tuple[WorkdirScan, int | None]:
        scan = self._scan()
        try:
            free: int | None = shutil.disk_usage(self.workdir).free
        except OSError:
            free = None
        return scan, free

    def _looping_pass(self) -> Deferred[None]:
        return self._track(Deferred.fromCoroutine(self._looping_check()))

    async def _looping_check(self) -> None:
        assert self._detector is not None and self.limits.looping is not None
        scan: WorkdirScan = await self.in_thread(self._scan)
        # File times are Unix times; the clock is too, except in tests (then ``wall`` is it).
        now = self.clock.seconds()
        newest = now - (self.wall() - scan.newest_mtime) if scan.newest_mtime else 0.0
        self.idle = self._detector.observe(self.clock.seconds(), newest, self.started)
        if self._detector.is_looping(self.idle):
            self._abort(
                ErrorCode.LOOPINGJOB,
                f"no file in the work directory modified for {self.idle:.0f} s"
                f" (limit {self.limits.looping:.0f} s)",
            )

    def _walltime_reached(self) -> None:
        self._walltime = None
        self._abort(ErrorCode.REACHEDMAXTIME, f"job stopped at the {self.limits.walltime_reason}")

    def current_fields(self) -> dict[str, int]:
        """The prmon-derived update fields so far (for heartbeats)."""
        if not self.summary.count:
            return {}
        return prmon_output.pilot_fields(self.summary.summary())

    # -- debug tails ---------------------------------------------------------------

    async def debug_tail(self) -> str:
        """The redacted end of the most recently modified file of the work directory."""
        return await self.in_thread(
            lambda: newest_file_tail(
                self.workdir, self.settings.debug_tail_bytes, self._scan(), secrets=self.secrets
            )
        )


#: prmon-derived PanDA field (``pilot_fields``) → ``JobUpdate`` attribute.
_UPDATE_ATTRIBUTES = {
    "maxRSS": "max_rss", "maxVMEM": "max_vmem", "maxSWAP": "max_swap", "maxPSS": "max_pss",
    "avgRSS": "avg_rss", "avgVMEM": "avg_vmem", "avgSWAP": "avg_swap", "avgPSS": "avg_pss",
    "totRCHAR": "tot_rchar", "totWCHAR": "tot_wchar", "totRBYTES": "tot_rbytes", "totWBYTES": "tot_wbytes",
    "rateRCHAR": "rate_rchar", "rateWCHAR": "rate_wchar", "rateRBYTES": "rate_rbytes",
    "rateWBYTES": "rate_wbytes",
}  # fmt: skip


def monitor_update_fields(fields: Mapping[str, int]) -> dict[str, Any]:
    """``JobUpdate`` keyword arguments from ``prmon_output.pilot_fields``."""
    return {_UPDATE_ATTRIBUTES[k]: v for k, v in fields.items() if k in _UPDATE_ATTRIBUTES}


#: The server's column for the debug tail (``jobsDebug.stdOut``), in bytes.
DEBUG_TAIL_WIDTH = UPDATE_FITS["stdout"].width


def newest_file_tail(
    workdir: Path, limit: int, scan: WorkdirScan | None = None, *, secrets: SecretValues | None = None
) -> str:
    """Last ``limit`` bytes of the newest payload file (payload.stdout if none), redacted.

    ``secrets``: the values the pilot knows, removed before the pattern rules run.
    """
    scan = scan or WorkdirScanner(workdir).scan()
    name = scan.newest_path or "payload.stdout"
    path = workdir / name
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - limit))
            data = handle.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text = text.split("\n", 1)[-1]  # start at a line boundary
    header = f"==> {name} <==\n"
    # the server keeps at most its column's width: the newest lines, after the header
    return header + tail_lines(redact(text, secrets), DEBUG_TAIL_WIDTH - utf8_size(header))
