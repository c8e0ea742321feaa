"""Harvester's shared files as the job source, reporter and event source (push mode).

On HPC centres without outbound network and under Harvester's push mode, the pilot
talks to no server: Harvester's shared-file messenger feeds it jobs and event ranges
through files in the worker's access point and forwards what the pilot writes there to
PanDA (``interfaces/harvester/``).  ``HarvesterSource`` is that exchange behind the
same interfaces as the PanDA server (``IJobSource``, ``IJobReporter``,
``IEventSource``), so the job pipeline and the event-service machinery do not know
which one they talk to.

The exchange, and what it is careful about (Harvester's side has no locking):

* **Jobs.** ``HPCJobs.json`` (``{PandaID: job}``) is taken when it holds a job this pilot
  has not run, and renamed ``HPCJobs.json.read``.  For another job the pilot writes
  ``worker_requestjob.json`` (``{"nJobs": 1}``) and looks every ``interval`` seconds
  until Harvester has fed one (it deletes the request) or ``job_wait`` has passed.
  Before asking, it makes sure Harvester has read the previous job's final state, then
  removes that job's ``worker_attributes.json`` and ``jobReport.json``: Harvester applies
  whatever attributes file it finds to the job it has just fed, so a stale ``finished``
  would end the new job before it ran.  Harvester says nothing when it reads the
  attributes, but it reads them just before it takes ``event_status.dump.json`` in the
  same check of the worker; so once the final report's dump is taken, the pilot waits
  one ``interval``, writes an empty dump (``{PandaID: []}``, which Harvester takes and
  deletes) and waits until that is taken too: the check that took it had read the
  final attributes.
* **Updates.** Every update rewrites ``worker_attributes.json``: the update's legacy
  ``updateJob`` fields, flat, plus ``jobStatus`` (without the job output report, as
  pilot 3 does).  The final update also writes ``jobReport.json`` (the job report) and
  declares the job's files in ``event_status.dump.json`` (``{PandaID: [{type, path,
  guid, fsize, chksum}]}``) for Harvester to stage out; they are in the outbox, where
  the pilot's stage-out put them (``file://`` destinations, ``pilot.options``).
* **Event ranges.** A request is ``worker_requestevents.json`` (``{PandaID: {nRanges,
  pandaID, taskID, jobsetID}}``); the answer ``JobsEventRanges.json`` (``{PandaID:
  [ranges]}``, an empty list when there are no more) is taken when complete and
  renamed ``.read``; one request is out at a time (Harvester deletes a second one
  unanswered).  Range statuses go to ``worker_updateevents.json``; archives of
  range outputs are declared in ``event_status.dump.json`` with their ranges
  (``eventRangeID``, ``eventStatus``), from which Harvester writes the range updates
  itself.
* **One report file at a time.** Harvester overwrites an unread
  ``worker_updateevents.json`` when it turns a dump into range updates, and reads a
  new dump only once the previous one is acknowledged; so the pilot writes a dump or a
  range update only when neither file is waiting to be read, and waits (on the reactor
  clock) otherwise.  Nothing is ever written over a file Harvester has not taken.

Every file is written atomically (``pilot.source.filebox``) and every file Harvester
writes is read tolerantly: a half-written file is looked at again at the next poll.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.interfaces import IEventSource, IJobReporter, IJobSource
from pilot.logs import pilot_observer
from pilot.server.api import ApiMode
from pilot.server.errors import ServerError
from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult
from pilot.server.messages import (
    AcquireResult,
    JobRequest,
    JobUpdate,
    StatusCode,
    UpdateResult,
    encode_job_update,
)
from pilot.source import filebox
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)

FINAL_STATES = frozenset({"finished", "failed", "holding"})


@record(frozen=True)
class MessengerFiles:
    """The file names of Harvester's ``[payload_interaction]`` section, in one access point."""

    access_point: Path
    job_spec: str = "HPCJobs.json"
    job_request: str = "worker_requestjob.json"
    attributes: str = "worker_attributes.json"
    job_report: str = "jobReport.json"
    event_status: str = "event_status.dump.json"
    events_request: str = "worker_requestevents.json"
    events_feed: str = "JobsEventRanges.json"
    events_update: str = "worker_updateevents.json"
    kill_worker: str = "kill_worker.json"
    heartbeat: str = "worker_heartbeat.json"

    def path(self, name: str) -> Path:
        return self.access_point / name

    @property
    def written(self) -> list[str]:
        """The files this pilot writes (their leftovers are its to clean)."""
        return [
            self.job_request,
            self.attributes,
            self.job_report,
            self.event_status,
            self.events_request,
            self.events_update,
            self.kill_worker,
            self.heartbeat,
        ]


@implementer(IJobSource, IJobReporter, IEventSource)
class HarvesterSource:
    """See the module docstring."""

    name = "harvester"

    def __init__(
        self,
        files: MessengerFiles,
        *,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        interval: float = 10.0,
        job_wait: float = 600.0,
        ack_wait: float = 600.0,
        events_wait: float = 3600.0,
        file_mode: int = 0o644,
    ) -> None:
        self.files = files
        self._clock = clock
        self._in_thread = in_thread
        self.interval = interval
        self.job_wait = job_wait
        self.ack_wait = ack_wait
        self.events_wait = events_wait
        self._mode = file_mode
        self.calls = 0
        self._taken: set[int] = set()
        self._jobs: dict[int, Mapping[str, Any]] = {}
        #: The job whose final state Harvester may not have read yet (see ``_settle_previous_job``).
        self._final_pending: int | None = None
        self._reports = DeferredLock()
        self._range_requests = DeferredLock()

    # -- IJobSource ----------------------------------------------------------------------

    def acquire_jobs(self, request: JobRequest) -> Deferred[AcquireResult]:
        return Deferred.fromCoroutine(self._acquire_jobs())

    async def _acquire_jobs(self) -> AcquireResult:
        self.calls += 1
        taken = await self._in_thread(self._take_job)
        if taken is not None:
            return self._fed(taken)
        await self._settle_previous_job()
        await self._write(self.files.job_request, {"nJobs": 1})
        log.info("asked Harvester for a job ({path})", path=str(self.files.path(self.files.job_request)))
        found = await filebox.poll(
            self._clock, self.interval, self.job_wait, lambda: self._in_thread(self._take_job)
        )
        if found is None:
            # withdrawn, and one more look: Harvester may have read it already
            await self._in_thread(filebox.remove, self.files.path(self.files.job_request))
            found = await self._in_thread(self._take_job)
        if found is None:
            return AcquireResult(StatusCode.NO_JOBS, message=f"Harvester fed no job in {self.job_wait:.0f} s")
        return self._fed(found)

    def _fed(self, job: Mapping[str, Any]) -> AcquireResult:
        panda_id = int(job["PandaID"])
        self._jobs[panda_id] = job
        log.info("job {pandaid} from Harvester", pandaid=panda_id, event="harvester.job")
        return AcquireResult(StatusCode.SUCCESS, (job,))

    def _take_job(self) -> Mapping[str, Any] | None:
        """The job in ``HPCJobs.json`` if it is complete and new; the file renamed ``.read`` (blocking)."""
        path = self.files.path(self.files.job_spec)
        document = filebox.read_json(path, dict)
        if not document:
            return None
        for key, job in document.items():
            try:
                panda_id = int(key)
            except ValueError:
                continue
            if panda_id in self._taken or not isinstance(job, dict):
                continue
            self._taken.add(panda_id)
            filebox.rename_read(path)
            return {**job, "PandaID": job.get("PandaID", panda_id)}
        return None

    async def _settle_previous_job(self) -> None:
        """Harvester has the previous job's final state: its attributes can go (see the docstring)."""
        if self._final_pending is None:
            return
        dump = self.files.path(self.files.event_status)
        taken = await self._until_gone([dump], self.ack_wait)
        if taken:
            await deferLater(self._clock, self.interval, lambda: None)
            await self._report_files({str(self._final_pending): []})
            taken = await self._until_gone([dump], self.ack_wait)
        if not taken:
            log.warn(
                "Harvester has not taken the last job's final report in {wait:.0f} s; asking for a job anyway",
                wait=self.ack_wait,
                event="harvester.final_not_taken",
            )
        for name in (self.files.attributes, self.files.job_report):
            await self._in_thread(filebox.remove, self.files.path(name))
        self._final_pending = None

    # -- IJobReporter --------------------------------------------------------------------

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        return Deferred.fromCoroutine(self._update_job(update, final))

    async def _update_job(self, update: JobUpdate, final: bool) -> UpdateResult:
        attributes = encode_job_update(update, ApiMode.LEGACY)
        attributes.pop("xml", None)  # in the dump
        attributes.pop("metaData", None)  # jobReport.json: Harvester would encode the text twice
        # Harvester ends a job only on finished/failed: a holding job would stay "running" and
        # take the next job's state
        attributes["jobStatus"] = "failed" if update.state == "holding" else update.state
        if final or update.state in FINAL_STATES:
            report = parse_object(update.meta_data)
            if report is not None:
                await self._write(self.files.job_report, report)
            declared = self._declared_files(update)
            await self._report_files({str(update.job_id): declared})
            self._final_pending = update.job_id
        await self._write(self.files.attributes, attributes)
        return UpdateResult(StatusCode.SUCCESS)

    def _declared_files(self, update: JobUpdate) -> list[dict[str, Any]]:
        """The job's stored files as ``event_status.dump.json`` entries."""
        report = parse_object(update.job_output_report) or {}
        job = self._jobs.get(update.job_id, {})
        log_name = job.get("logFile")
        entries = []
        for lfn, entry in sorted(report.items()):
            if not isinstance(entry, dict):
                continue
            path = local_path(entry.get("surl"))
            if path is None:
                log.warn(
                    "job {pandaid}: {lfn} has no local path for Harvester; not declared",
                    pandaid=update.job_id,
                    lfn=lfn,
                    event="harvester.undeclared",
                )
                continue
            declared = {
                "type": "log" if lfn == log_name else "output",
                "path": str(path),
                "fsize": entry.get("fsize"),
                "chksum": entry.get("adler32"),
            }
            if entry.get("guid"):  # without one Harvester makes one (an empty one it would keep)
                declared["guid"] = entry["guid"]
            entries.append(declared)
        return entries

    # -- IEventSource --------------------------------------------------------------------

    def acquire_event_ranges(self, request: EventRangeRequest) -> Deferred[list[dict[str, object]]]:
        return Deferred.fromCoroutine(self._acquire_ranges(request))

    async def _acquire_ranges(self, request: EventRangeRequest) -> list[dict[str, object]]:
        # one request at a time: Harvester answers one and deletes a second written meanwhile
        await self._range_requests.acquire()
        try:
            return await self._request_ranges(request)
        finally:
            self._range_requests.release()

    async def _request_ranges(self, request: EventRangeRequest) -> list[dict[str, object]]:
        key = str(request.job_id)
        await self._write(
            self.files.events_request,
            {
                key: {
                    "nRanges": request.n_ranges,
                    "pandaID": request.job_id,
                    "taskID": request.task_id,
                    "jobsetID": request.jobset_id,
                }
            },
        )
        answer = await filebox.poll(
            self._clock, self.interval, self.events_wait, lambda: self._in_thread(self._take_ranges, key)
        )
        if answer is None:
            raise ServerError(f"Harvester answered no event-range request in {self.events_wait:.0f} s")
        return answer

    def _take_ranges(self, key: str) -> list[dict[str, object]] | None:
        path = self.files.path(self.files.events_feed)
        document = filebox.read_json(path, dict)
        if document is None or not isinstance(document.get(key), list):
            return None
        filebox.rename_read(path)
        return [r for r in document[key] if isinstance(r, dict)]

    def update_event_ranges(self, update: EventRangeUpdate) -> Deferred[EventUpdateResult]:
        return Deferred.fromCoroutine(self._update_ranges(update))

    async def _update_ranges(self, update: EventRangeUpdate) -> EventUpdateResult:
        if not update.range_ids:
            return EventUpdateResult({})
        key = str(update.panda_id)
        if update.version == 0:
            await self._report_ranges({key: [r.wire() for r in update.statuses]})
        else:
            entries = []
            for chunk in update.chunks:
                path = local_path(chunk.url)
                if path is None:
                    raise ServerError(f"archive {chunk.lfn} has no local path for Harvester")
                guid = str(uuid.uuid4())
                for status in chunk.ranges:
                    entries.append(
                        {
                            "type": "zip_output",
                            "path": str(path),
                            "guid": guid,
                            "fsize": chunk.fsize,
                            "chksum": chunk.adler32,
                            "eventRangeID": status.range_id,
                            "eventStatus": status.status,
                        }
                    )
            await self._report_files({key: entries})
        return EventUpdateResult(dict.fromkeys(update.range_ids, True), how="file")

    # -- the report slot -----------------------------------------------------------------

    async def _report_files(self, document: dict[str, list[dict[str, Any]]]) -> None:
        await self._report(self.files.event_status, document)

    async def _report_ranges(self, document: dict[str, list[dict[str, Any]]]) -> None:
        await self._report(self.files.events_update, document)

    async def _report(self, name: str, document: object) -> None:
        """Write ``name`` once neither report file waits to be read (see the docstring)."""
        await self._reports.acquire()
        try:
            waiting = [self.files.path(n) for n in (self.files.event_status, self.files.events_update)]
            await self._until_gone(waiting, None)
            await self._write(name, document)
        finally:
            self._reports.release()

    async def _until_gone(self, paths: list[Path], timeout: float | None) -> bool:
        """Look every ``interval`` until none of ``paths`` exists (Harvester took them); False after ``timeout``."""

        def look() -> Deferred[bool | None]:
            return self._in_thread(lambda: None if any(map(filebox.exists, paths)) else True)

        return await filebox.poll(self._clock, self.interval, timeout, look) is not None

    # -- the worker ----------------------------------------------------------------------

    def touch_heartbeat(self) -> Deferred[None]:
        """``worker_heartbeat.json``: Harvester's liveness check looks at its mtime."""
        return self._write(self.files.heartbeat, {"time": self._clock.seconds()})

    def kill_worker(self) -> Deferred[None]:
        """``kill_worker.json``: the pilot is done; Harvester may end the batch worker.

        A job Harvester fed after all (it had read the request before the pilot withdrew
        it) is reported failed first: a job never reported final would take the worker's
        end as its state, ``finished`` for a worker that exited 0.
        """
        return Deferred.fromCoroutine(self._kill_worker())

    async def _kill_worker(self) -> None:
        await self._in_thread(filebox.remove, self.files.path(self.files.job_request))
        unrun = await self._in_thread(self._take_job)
        if unrun is not None:
            panda_id = int(unrun["PandaID"])
            log.warn(
                "job {pandaid} was fed as the pilot ended: reported failed, not run",
                pandaid=panda_id,
                event="harvester.unrun_job",
            )
            await self._write(
                self.files.attributes,
                {
                    "jobId": panda_id,
                    "jobStatus": "failed",
                    "pilotErrorCode": int(ErrorCode.REACHEDMAXTIME),
                    "pilotErrorDiag": "the pilot ended before it could run the job Harvester fed",
                },
            )
        await self._write(self.files.kill_worker, {"time": self._clock.seconds()})

    def clean_leftovers(self) -> Deferred[int]:
        """Temporary files of a pilot killed while writing (nobody else reads them)."""
        return self._in_thread(filebox.remove_leftovers, self.files.access_point, self.files.written)

    def _write(self, name: str, document: object) -> Deferred[None]:
        return self._in_thread(filebox.write_json, self.files.path(name), document, self._mode)


def parse_object(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def local_path(url: object) -> Path | None:
    """The local path of a ``file://`` URL (or of a plain absolute path); else None."""
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("/"):
        return Path(url)
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parts.path))
