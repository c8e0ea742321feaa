"""Harvester's side of the shared-file messenger, for the tests: one worker, one access point.

``HarvesterSide`` behaves like Harvester's agents (monitor, submitter, event feeder)
towards ONE worker with the ``shared_file_messenger`` and the MT_OneToOne mapping, in
push mode: jobs are fed one after another into the same access point, each on the
pilot's request (or the first one before the pilot starts).  It was written from
Harvester's behaviour (``interfaces/harvester/README.md``), not from its code, and it
keeps Harvester's rough edges on purpose, so that a test sees what a site would see:

* it writes ``HPCJobs.json`` and ``JobsEventRanges.json`` in place (optionally in two
  steps with a pause in between, ``torn_writes``), never atomically;
* it reads every file the pilot writes once per cycle, applies the attributes file to
  every job of the worker it still thinks is running (a stale ``finished`` from the
  previous job ends a newly fed one), and reads each shared file once per job of the
  worker, as Harvester loops over the worker's PandaIDs;
* ``event_status.dump.json`` and ``worker_updateevents.json`` are taken by renaming
  them ``.read``; while a ``.read`` is there a new file is not looked at; ranges
  declared in the dump become a ``worker_updateevents.json`` written over any unread
  one; an invalid file is deleted unread; after a cycle that took files or range
  updates both ``.read`` files are renamed ``.read.<timestamp>``;
* files and range updates of a job it no longer counts as running are dropped.

A cycle runs the monitor's steps in Harvester's order (job request, kill request,
heartbeat, attributes and job report, files to stage out, range updates, range
request, then applying all of it and the acknowledgement), then the submitter's job
feed and the event feeder's.  It runs every ``interval`` seconds on the given clock
after ``start()``, or when a test awaits ``cycle()``.  What it saw is kept for
assertions (``jobs_fed``, ``final_states``, ``staged``, ``range_updates``,
``problems`` and so on); ``problems`` also names what Harvester would not notice but
a site would suffer from (a file staged out with another checksum than declared, one
job's attributes applied to another job).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater

from pilot.util.records import record

#: A job ends, in Harvester's eyes, only with one of these as ``jobStatus``.
FINAL = ("finished", "failed")
#: ``eventService``, ``cloneJob`` or ``isHPO`` among a job's keys makes the worker use event ranges.
EVENT_KEYS = ("eventService", "cloneJob", "isHPO")
#: Harvester's acknowledgement suffix: ``.read.`` and this UTC time format.
ACK_FORMAT = "%Y-%m-%d_%H_%M_%S.%f"


class _MonitorFailed(Exception):
    """Harvester's monitor check of the worker raises: nothing of this cycle is applied."""


@record(frozen=True)
class HarvesterNames:
    """The ``[payload_interaction]`` file names (Harvester's defaults)."""

    job_spec: str = "HPCJobs.json"
    job_request: str = "worker_requestjob.json"
    pool_catalog: str = "PoolFileCatalog_H.xml"
    panda_ids: str = "worker_pandaids.json"
    attributes: str = "worker_attributes.json"
    job_report: str = "jobReport.json"
    event_status: str = "event_status.dump.json"
    events_request: str = "worker_requestevents.json"
    events_feed: str = "JobsEventRanges.json"
    events_update: str = "worker_updateevents.json"
    kill_worker: str = "kill_worker.json"
    heartbeat: str = "worker_heartbeat.json"


@record(frozen=True)
class StagedFile:
    """One file declared in ``event_status.dump.json``, as Harvester would stage it out."""

    lfn: str  # Harvester takes the path's base name as the LFN
    path: str
    type: str
    fsize: Any  # as declared (Harvester stats the file only when absent)
    chksum: Any  # as declared (Harvester computes the adler32 only when absent)
    guid: Any
    event_range_id: str | None = None
    event_status: str | None = None
    cycle: int = 0


@record
class _Request:
    body: Any
    cycle: int


class HarvesterSide:
    """See the module docstring."""

    def __init__(
        self,
        access_point: Path,
        *,
        clock: IReactorTime,
        jobs: Iterable[Mapping[str, Any]] = (),
        inputs: Mapping[int, Sequence[Path]] | None = None,
        ranges: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
        interval: float = 0.2,
        names: HarvesterNames | None = None,
        preplace: bool = False,
        torn_writes: bool = False,
        tear_pause: float = 1.0,
        feed_delay: int = 0,
        heartbeat_limit: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.access_point = access_point
        self.clock = clock
        self.interval = interval
        self.names = names or HarvesterNames()
        self.preplace_first = preplace
        self.torn_writes = torn_writes
        self.tear_pause = tear_pause
        #: Cycles between the monitor reading a request and a feeder answering it.
        self.feed_delay = feed_delay
        self.heartbeat_limit = heartbeat_limit
        self._wall = wall
        self._queue: list[Mapping[str, Any]] = list(jobs)
        self._inputs: dict[int, list[Path]] = {k: list(v) for k, v in (inputs or {}).items()}
        self._ranges: dict[int, list[dict[str, Any]]] = {
            k: [dict(r) for r in v] for k, v in (ranges or {}).items()
        }
        self._job_request: _Request | None = None
        self._events_request: _Request | None = None
        self._uses_events = False
        self._started_at: float | None = None
        self._lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._updates: dict[int, list[dict[str, Any]]] = {}  # range updates from one dump read
        self._sizes: dict[str, Any] = {}  # and its per-path size and checksum
        self._sums: dict[str, Any] = {}
        # -- what was seen, for assertions --
        self.cycles = 0
        self.jobs_fed: list[int] = []
        self.job_requests: list[int] = []
        self.event_requests: list[dict[str, Any]] = []
        self.ranges_fed: dict[int, list[str]] = {}
        self.attributes_seen: dict[int, list[dict[str, Any]]] = {}
        self.job_attributes: dict[int, dict[str, Any]] = {}
        self.final_states: dict[int, tuple[str, dict[str, Any]]] = {}
        self.staged: dict[int, list[StagedFile]] = {}
        self.range_updates: dict[int, dict[str, list[str]]] = {}
        self.range_status: dict[int, dict[str, str]] = {}
        self.duplicate_updates = 0
        self.acknowledged: list[str] = []
        self.problems: list[str] = []
        self.killed = False
        self.last_heartbeat: float | None = None
        self.heartbeat_expired = False

    # -- driving -------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.access_point / name

    def _note(self, problem: str) -> None:
        self.problems.append(f"cycle {self.cycles}: {problem}")

    @property
    def running(self) -> list[int]:
        """The worker's jobs Harvester still counts as running (fed, no final ``jobStatus`` seen)."""
        return [p for p in self.jobs_fed if p not in self.final_states]

    def add_job(self, job: Mapping[str, Any], inputs: Sequence[Path] = ()) -> None:
        """Another job for the queue (PanDA gave Harvester one more)."""
        self._queue.append(job)
        if inputs:
            self._inputs[int(job["PandaID"])] = list(inputs)

    def add_ranges(self, panda_id: int, ranges: Sequence[Mapping[str, Any]]) -> None:
        self._ranges.setdefault(panda_id, []).extend(dict(r) for r in ranges)

    def start(self) -> None:
        """Set up the access point, place the first job if asked, and cycle every ``interval``."""
        self.access_point.mkdir(parents=True, exist_ok=True)
        self._started_at = self._wall()
        if self.preplace_first:
            self.preplace()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.cycle()))
        self._loop.clock = self.clock
        done = self._loop.start(self.interval, now=True)
        done.addErrback(lambda f: self.problems.append(f"cycle loop failed: {f.value!r}"))

    async def stop(self) -> None:
        """Stop cycling; returns once the cycle under way (if any) is over."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        await self._lock.acquire()  # cycles hold the lock
        self._lock.release()

    def preplace(self) -> int | None:
        """Push mode: the first queued job into the access point before the pilot starts."""
        self.access_point.mkdir(parents=True, exist_ok=True)
        if not self._queue:
            return None
        job = self._queue.pop(0)
        self._feed_job_files(job, json.dumps({str(_panda_id(job)): job}))
        return _panda_id(job)

    async def cycle(self) -> None:
        """One pass of the monitor, the submitter and the event feeder over the worker."""
        await self._lock.acquire()
        try:
            self.cycles += 1
            try:
                self._monitor()
            except _MonitorFailed as exc:
                self._note(f"monitor check failed: {exc}")
            await self._feed_jobs()
            await self._feed_events()
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the loop; it is a problem
            self._note(repr(exc))
        finally:
            self._lock.release()

    # -- the monitor ---------------------------------------------------------------------

    def _monitor(self) -> None:
        names = self.names
        if self._job_request is None:  # Harvester looks only while no refill is pending
            wanted = self._job_requested()
            if wanted is not None:
                self.job_requests.append(wanted)
                self._job_request = _Request(wanted, self.cycles)
        if self.path(names.kill_worker).exists():
            self.killed = True
        self._check_heartbeat()
        running = self.running  # the jobs of the worker that are still "running"
        attributes = self._work_attributes()
        files = self._files_to_stage_out()
        events = self._events_to_update() if self._uses_events else {}
        if self._uses_events and self._events_request is None:
            request = _read_json(self.path(names.events_request))
            if isinstance(request, dict) and request:
                self.event_requests.append(request)
                self._events_request = _Request(request, self.cycles)
        self._apply(running, attributes, files, events)
        if files or events:
            self._acknowledge()

    def _job_requested(self) -> int | None:
        path = self.path(self.names.job_request)
        if not path.exists():
            return None
        document = _read_json(path)
        try:
            return int(document["nJobs"])
        except (TypeError, KeyError, ValueError):
            return 1  # an unreadable request asks for one job

    def _check_heartbeat(self) -> None:
        try:
            self.last_heartbeat = os.stat(self.path(self.names.heartbeat)).st_mtime
        except OSError:
            self.last_heartbeat = None
        if self.heartbeat_limit is None:
            return
        now = self._wall()
        since = self.last_heartbeat if self.last_heartbeat is not None else self._started_at
        if since is not None and now - since > self.heartbeat_limit and not self.heartbeat_expired:
            self.heartbeat_expired = True
            self._note("heartbeat expired: Harvester kills the worker")

    def _work_attributes(self) -> dict[str, Any] | None:
        """The attributes file plus the job report as ``metaData`` (None: nothing readable)."""
        if not self.jobs_fed:
            return None
        attributes = _read_json(self.path(self.names.attributes))
        found: dict[str, Any] = dict(attributes) if isinstance(attributes, dict) else {}
        if attributes is not _UNREADABLE and not isinstance(attributes, dict):
            self._note(f"{self.names.attributes} is not a JSON object")
        report = _read_json(self.path(self.names.job_report))
        if report is not _UNREADABLE:
            found["metaData"] = report
        return found or None

    def _take(self, name: str) -> Path | None:
        """``name.read`` if still there (not acknowledged), else ``name`` renamed to it; None: neither."""
        taken = self.path(name + ".read")
        if not taken.exists():
            if not self.path(name).exists():
                return None
            try:
                os.rename(self.path(name), taken)
            except OSError as exc:
                self._note(f"cannot rename {name}: {exc}")
                return None
        return taken

    def _files_to_stage_out(self) -> dict[int, dict[str, list[StagedFile]]]:
        """Harvester's rename-and-read of the dump, once per PandaID of the worker."""
        files: dict[int, dict[str, list[StagedFile]]] = {}
        for _ in self.jobs_fed:  # one access point, read again for every PandaID
            taken = self._take(self.names.event_status)
            if taken is None:
                continue
            document = _read_json(taken)
            skip = not isinstance(document, dict)
            if skip:
                self._note(f"{taken.name} is not a JSON object: deleted")
            count = 0
            self._updates, self._sizes, self._sums = {}, {}, {}
            for key, entries in (document if isinstance(document, dict) else {}).items():
                try:
                    panda_id = int(key)
                except ValueError:
                    raise _MonitorFailed(f"{taken.name}: PandaID {key!r} is not an integer") from None
                if not isinstance(entries, list):
                    self._note(f"{taken.name}: {key} holds no list")
                    skip = True
                    break
                for entry in entries:
                    count += 1
                    self._declared(panda_id, entry, files)
            if not skip and self._updates:  # Harvester writes them itself, over any unread file
                target = self.path(self.names.events_update)
                staging = target.with_name(target.name + ".new")
                staging.write_text(json.dumps({str(k): v for k, v in self._updates.items()}))
                os.rename(staging, target)
            if skip or count == 0:
                taken.unlink(missing_ok=True)
        return files

    def _declared(self, panda_id: int, entry: Any, files: dict[int, dict[str, list[StagedFile]]]) -> None:
        """One entry of the dump, with Harvester's per-entry rules (a bad entry is lost)."""
        if not isinstance(entry, dict):
            self._note(f"job {panda_id}: entry {entry!r} is not an object")
            return
        range_id = entry.get("eventRangeID")
        try:
            if "path" in entry:
                path = str(entry["path"])
                if path not in self._sizes:  # the first entry of a path gives its size and checksum
                    self._sizes[path] = entry["fsize"] if "fsize" in entry else os.stat(path).st_size
                if path not in self._sums:
                    self._sums[path] = entry["chksum"] if "chksum" in entry else adler32(Path(path))
                kind = entry["type"]
                ranged = kind in ("es_output", "zip_output")
                staged = StagedFile(
                    lfn=os.path.basename(path),
                    path=path,
                    type=kind,
                    fsize=self._sizes[path],
                    chksum=self._sums[path],
                    guid=entry.get("guid"),
                    event_range_id=range_id if ranged else None,
                    event_status=entry.get("eventStatus") if ranged else None,
                    cycle=self.cycles,
                )
                files.setdefault(panda_id, {}).setdefault(staged.lfn, []).append(staged)
                if not ranged:
                    return
            update = {"eventRangeID": range_id, "eventStatus": entry["eventStatus"]}
            self._updates.setdefault(panda_id, []).append(update)
        except (KeyError, OSError, TypeError, ValueError) as exc:
            self._note(f"job {panda_id}: entry {entry!r} lost: {exc!r}")

    def _events_to_update(self) -> dict[int, Any]:
        found: dict[int, Any] = {}
        for _ in self.jobs_fed:
            taken = self._take(self.names.events_update)
            if taken is None:
                continue
            count = 0
            try:
                for key, statuses in _read_json(taken).items():
                    found[int(key)] = statuses
                    count += len(statuses)
            except (AttributeError, TypeError, ValueError):
                self._note(f"{taken.name} unreadable: deleted")
            if count == 0:
                taken.unlink(missing_ok=True)
        return found

    def _apply(
        self,
        running: list[int],
        attributes: dict[str, Any] | None,
        files: dict[int, dict[str, list[StagedFile]]],
        events: dict[int, Any],
    ) -> None:
        """What Harvester does with one cycle's readings, for the jobs it counts as running."""
        for panda_id in running:
            if attributes is not None:
                self._set_attributes(panda_id, attributes)
            for staged in (s for group in files.get(panda_id, {}).values() for s in group):
                self._stage(panda_id, staged)
            for status in events.get(panda_id, ()):
                self._range_update(panda_id, status)
            status = self.job_attributes.get(panda_id, {}).get("jobStatus")
            if status in FINAL and panda_id not in self.final_states:
                self.final_states[panda_id] = (status, dict(self.job_attributes[panda_id]))
        for panda_id in sorted(set(files) - set(running)):
            self._note(f"files of job {panda_id} dropped: not running")
        for panda_id in sorted(set(events) - set(running)):
            self._note(f"range updates of job {panda_id} dropped: not running")

    def _set_attributes(self, panda_id: int, attributes: dict[str, Any]) -> None:
        seen = self.attributes_seen.setdefault(panda_id, [])
        if seen and seen[-1] == attributes:
            return
        seen.append(dict(attributes))
        self.job_attributes.setdefault(panda_id, {}).update(attributes)  # Harvester merges key by key
        owner = attributes.get("jobId")
        if owner is not None and str(owner) != str(panda_id):
            self._note(f"attributes of job {owner} applied to job {panda_id}")

    def _stage(self, panda_id: int, staged: StagedFile) -> None:
        self.staged.setdefault(panda_id, [])
        if staged in self.staged[panda_id]:
            return  # read again in this cycle, for another PandaID of the worker
        self.staged[panda_id].append(staged)
        self.problems.extend(f"cycle {self.cycles}: job {panda_id}: {p}" for p in verify(staged))

    def _range_update(self, panda_id: int, status: Any) -> None:
        if not isinstance(status, dict) or "eventRangeID" not in status:
            self._note(f"job {panda_id}: range update {status!r} unusable")
            return
        range_id, value = str(status["eventRangeID"]), str(status.get("eventStatus"))
        if range_id not in self.ranges_fed.get(panda_id, []):
            self._note(f"job {panda_id}: update of unknown range {range_id}")
        history = self.range_updates.setdefault(panda_id, {}).setdefault(range_id, [])
        if value in history:
            self.duplicate_updates += 1
        history.append(value)
        kept = self.range_status.setdefault(panda_id, {})
        if kept.get(range_id, "running") == "running":  # a range once done is never changed again
            kept[range_id] = value

    def _acknowledge(self) -> None:
        for _ in self.jobs_fed:
            for name in (self.names.events_update, self.names.event_status):
                taken = self.path(name + ".read")
                if not taken.exists():
                    continue
                stamp = datetime.fromtimestamp(self.clock.seconds(), UTC)
                target = taken.with_name(f"{taken.name}.{stamp.strftime(ACK_FORMAT)}")
                while target.exists():  # Harvester's stamps are wall time; a test clock may stand still
                    stamp = datetime.fromtimestamp(stamp.timestamp() + 1e-6, UTC)
                    target = taken.with_name(f"{taken.name}.{stamp.strftime(ACK_FORMAT)}")
                os.rename(taken, target)
                self.acknowledged.append(target.name)

    # -- the submitter and the event feeder ----------------------------------------------

    async def _feed_jobs(self) -> None:
        request = self._job_request
        if request is None or self.cycles - request.cycle < self.feed_delay or not self._queue:
            return  # no jobs for the worker: the request stays where it is
        self._job_request = None
        job = self._queue.pop(0)  # MT_OneToOne: one job per feed, whatever nJobs asked for
        await self._write_torn(self.path(self.names.job_spec), json.dumps({str(_panda_id(job)): job}))
        self._feed_job_files(job, None)

    def _feed_job_files(self, job: Mapping[str, Any], spec: str | None) -> None:
        """The rest of Harvester's feed: the catalogue, the input links, the PandaIDs, the request gone."""
        panda_id = _panda_id(job)
        if spec is not None:
            self.path(self.names.job_spec).write_text(spec)
        self.path(self.names.pool_catalog).write_text(pool_file_catalog(job))
        fed = [panda_id]
        try:
            for source in self._inputs.get(panda_id, []):
                link = self.path(source.name)
                if str(source) != str(link):
                    if link.exists():
                        link.unlink()
                    os.symlink(source, link)
        except OSError as exc:
            self.problems.append(f"job {panda_id}: input links failed ({exc}); not in {self.names.panda_ids}")
            fed = []
        self.path(self.names.panda_ids).write_text(json.dumps(fed))
        self.path(self.names.job_request).unlink(missing_ok=True)
        self.jobs_fed.append(panda_id)
        if any(key in job for key in EVENT_KEYS):
            self._uses_events = True

    async def _feed_events(self) -> None:
        request = self._events_request
        if request is None or self.cycles - request.cycle < self.feed_delay:
            return
        self._events_request = None
        answer: dict[str, list[dict[str, Any]]] = {}
        for key, params in request.body.items():
            try:
                wanted = int(params.get("nRanges", 1))
                pool = self._ranges.get(int(key), [])
            except (AttributeError, TypeError, ValueError):
                self._note(f"event request {key}: {params!r} unusable")
                continue
            given, self._ranges[int(key)] = pool[:wanted], pool[wanted:]
            self.ranges_fed.setdefault(int(key), []).extend(str(r.get("eventRangeID")) for r in given)
            answer[key] = given
        if not answer:
            return  # PanDA answered nothing usable: Harvester feeds nothing, the request stays
        await self._write_torn(self.path(self.names.events_feed), json.dumps(answer))
        self.path(self.names.events_request).unlink(missing_ok=True)

    async def _write_torn(self, path: Path, text: str) -> None:
        """A plain write in place; with ``torn_writes``, half of it first and the rest after a pause."""
        if not self.torn_writes:
            path.write_text(text)
            return
        half = len(text) // 2
        with open(path, "w") as handle:
            handle.write(text[:half])
            handle.flush()
            await deferLater(self.clock, self.tear_pause, lambda: None)
            handle.write(text[half:])

    # -- checks ---------------------------------------------------------------------------

    def verify_staged(self) -> list[str]:
        """Every staged file checked again now (the stager copies it later); the problems found."""
        found = [f"job {p}: {e}" for p, files in self.staged.items() for s in files for e in verify(s)]
        self.problems.extend(found)
        return found


def verify(staged: StagedFile) -> list[str]:
    """What would go wrong staging ``staged`` out: missing, another size, another adler32."""
    problems = []
    if not isinstance(staged.guid, str) or not staged.guid:
        problems.append(f"{staged.lfn}: no guid ({staged.guid!r})")
    try:
        size = os.stat(staged.path).st_size
    except OSError as exc:
        return [*problems, f"{staged.lfn}: {staged.path} missing ({exc.strerror})"]
    if staged.fsize != size:
        problems.append(f"{staged.lfn}: declared {staged.fsize!r} bytes, the file has {size}")
    actual = adler32(Path(staged.path))
    if staged.chksum != actual:
        problems.append(f"{staged.lfn}: declared adler32 {staged.chksum!r}, the file has {actual}")
    return problems


def adler32(path: Path) -> str:
    """Eight lower-case hex digits, as Harvester computes and PanDA stores them."""
    value = 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


def pool_file_catalog(job: Mapping[str, Any]) -> str:
    """A POOL file catalogue of the job's inputs (LFN and GUID), as Harvester writes it."""
    pairs = zip(_split(job.get("inFiles")), _split(job.get("GUID")), strict=False)
    entries = [
        f'  <File ID="{g}">\n    <physical>\n      <pfn filetype="ROOT_All" name="{f}"/>\n'
        "    </physical>\n    <logical/>\n  </File>\n"
        for f, g in pairs
    ]
    head = '<?xml version="1.0" ?>\n<!DOCTYPE POOLFILECATALOG  SYSTEM "InMemory">\n<POOLFILECATALOG>\n'
    return head + "".join(entries) + "</POOLFILECATALOG>"


_UNREADABLE = object()


def _read_json(path: Path) -> Any:
    """The document, or ``_UNREADABLE`` (missing, being written, not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return _UNREADABLE


def _split(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value not in ("", "NULL"):
        return value.split(",")
    return []


def _panda_id(job: Mapping[str, Any]) -> int:
    return int(job["PandaID"])
