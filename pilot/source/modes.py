"""Which job source the pilot uses, and what the file modes change around it.

The job pipeline never branches on the mode: it talks to an ``IJobSource``,
``IJobReporter`` and (for event-service jobs) ``IEventSource``.  This module makes
them from the configuration (``HarvesterFiles.mode``):

* ``server``: the PanDA server (``pilot.source.panda``, made by the service); with
  ``--harvester-workdir`` (Harvester's pull mode) the pilot also keeps Harvester's
  heartbeat file fresh and writes its kill file at the end;
* ``harvester``: Harvester's shared files (``pilot.source.harvester``);
* ``arc``: ARC's job file and ``heartbeat.json`` (``pilot.source.arc``).

In the two file modes the pilot opens no network connection at all: the site (Harvester,
the ARC CE) moves the files.  The pilot's stage-out therefore copies outputs, the log
tarball and event-service archives into an *outbox* directory beside the exchange files
(a ``file://`` storage named ``TXPILOT_OUTBOX`` with the ``cp`` copytool, whatever the
queue's own storage says), and the source declares them from there: Harvester stages
them out from the paths in ``event_status.dump.json``; for ARC they are linked into the
session directory under their LFNs.  Downloads (transformations, documents by URL)
fail at once with a clear error instead of trying the network.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pilot.config import HarvesterFiles
from pilot.interfaces import IJobReporter, IJobSource
from pilot.logs import pilot_observer
from pilot.queuedata import QueueData
from pilot.server.errors import ServerError
from pilot.source.arc import ArcSource
from pilot.source.harvester import HarvesterSource, MessengerFiles
from pilot.staging.storage import StorageData
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)

OUTBOX = "TXPILOT_OUTBOX"
#: Where the site placed the job's inputs, by LFN (Harvester's access point, ARC's session).
INBOX = "TXPILOT_INBOX"
#: The outbox's numeric storage id: event-service archives go only to storage with one.
OUTBOX_ID = 1
#: How often ``worker_heartbeat.json`` is touched (Harvester's default limit is 30 min).
HEARTBEAT_FILE_PERIOD = 60.0
#: The activities whose storage becomes the outbox in a file mode.
_OUTPUT_ACTIVITIES = ("pw", "pl", "write_lan", "es_events", "es_failover")


@record
class FileExchange:
    """What a file mode puts in place of the server (see the module docstring)."""

    mode: str
    source: Any  # IJobSource + IJobReporter (+ IEventSource for Harvester)
    outbox: Path
    inbox: Path
    worker: Service | None = None

    @property
    def storage(self) -> StorageData:
        outbox = [{"endpoint": "file://", "path": str(self.outbox)}]
        inbox = [{"endpoint": "file://", "path": str(self.inbox)}]
        return StorageData.from_document(
            {
                OUTBOX: {"id": OUTBOX_ID, "arprotocols": {"write_lan": outbox, "read_lan": outbox}},
                INBOX: {"is_deterministic": False, "arprotocols": {"read_lan": inbox}},
            }
        )

    def adjust_queuedata(self, queuedata: QueueData) -> QueueData:
        """Inputs are linked from the inbox, outputs copied to the outbox, whatever the queue says."""
        astorages = dict(queuedata.astorages)
        acopytools = dict(queuedata.acopytools)
        for activity in _OUTPUT_ACTIVITIES:
            astorages[activity] = [OUTBOX]
            acopytools[activity] = ["cp"]
        astorages["read_lan"] = [INBOX]
        acopytools["pr"] = ["ln", "cp"]
        copytools = {**queuedata.copytools, "cp": {}, "ln": {}}
        return replace(queuedata, astorages=astorages, acopytools=acopytools, copytools=copytools)


class HarvesterWorker(Service):
    """Harvester's view of the worker: a fresh heartbeat file while running, the kill file at the end."""

    name = "harvester-worker"

    def __init__(self, source: HarvesterSource, clock: IReactorTime, period: float = HEARTBEAT_FILE_PERIOD):
        self._source = source
        self._loop = LoopingCall(self._touch)
        self._loop.clock = clock
        self._period = period

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._source.clean_leftovers().addErrback(lambda f: log.failure("cleaning leftovers", f))
        self._loop.start(self._period, now=True)

    def _touch(self) -> Deferred[None]:
        return self._source.touch_heartbeat().addErrback(
            lambda f: log.warn("heartbeat file not written: {error}", error=f.getErrorMessage())
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        log.info("asking Harvester to end the worker", event="harvester.kill_worker")
        return self._source.kill_worker().addErrback(
            lambda f: log.error("kill file not written: {error}", error=f.getErrorMessage())
        )


def file_exchange(
    harvester: HarvesterFiles,
    workdir: Path,
    *,
    clock: IReactorTime,
    in_thread: ThreadRunner,
    file_mode: int,
) -> FileExchange | None:
    """The file exchange the configuration asks for; None: the server alone."""
    if harvester.workdir is not None:
        files = MessengerFiles(
            harvester.workdir,
            attributes=str(harvester.worker_attributes or "worker_attributes.json"),
            event_status=str(harvester.event_status_dump or "event_status.dump.json"),
            kill_worker=harvester.kill_worker,
        )
        source = HarvesterSource(
            files,
            clock=clock,
            in_thread=in_thread,
            interval=harvester.interval,
            job_wait=harvester.job_wait,
            file_mode=file_mode,
        )
        worker = HarvesterWorker(source, clock)
        if harvester.mode == "harvester":
            outbox = harvester.workdir / "txpilot-outbox"
            return FileExchange("harvester", source, outbox, harvester.workdir, worker)
        return FileExchange("server", None, harvester.workdir, harvester.workdir, worker)
    if harvester.mode == "arc":
        job_file = (harvester.datadir or workdir) / "pandaJobData.out"
        arc = ArcSource(job_file, workdir, in_thread=in_thread, file_mode=file_mode)
        return FileExchange("arc", arc, workdir / ".txpilot-outbox", workdir)
    return None


async def no_network(url: str) -> bytes:
    """The download function of a file mode: nothing is fetched over the network."""
    raise ServerError(f"{url}: not downloaded, the pilot runs without network (file mode)")


async def no_network_file(url: str, destination: Path) -> Path:
    """The file download of a file mode (transformations): refused the same way."""
    raise ServerError(f"{url}: not downloaded, the pilot runs without network (file mode)")


def provides_jobs(source: object) -> bool:
    return IJobSource.providedBy(source) and IJobReporter.providedBy(source)
