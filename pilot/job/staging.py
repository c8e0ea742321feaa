"""A job's data movement: its inputs before the payload, its outputs and log after.

``JobStaging`` joins the job, the queue's configuration and the staging engine:
it checks that the inputs fit (``maxinputsize``, free disk), stages them in (or
writes their TURLs into ``PoolFileCatalog.xml`` for direct access), and stages
outputs and the log tarball out, giving each file of the job output report its
destination (``surl``, ``endpoint``).  Without a stage-out configuration (no
``astorages`` — a development queue) outputs are reported as produced locally.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.logs import pilot_observer
from pilot.model.files import ReportedFile
from pilot.model.job import Checksum, Job, OutputFile
from pilot.process.runner import OS_PROCESS_CONTROL, ProcessControl
from pilot.queuedata import QueueData
from pilot.staging.credentials import Credentials
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.storage import StorageData
from pilot.util.disk import is_full
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

if TYPE_CHECKING:
    from pilot.staging.engine import StagingEngine
    from pilot.staging.plan import FileTransfer
    from pilot.staging.tools.base import CommandWrapper

_MB = 1024 * 1024

#: Where event-service archives go, best first (the failover, then ordinary outputs' storage).
ES_ACTIVITIES = ("es_events", "es_failover", "pw", "write_lan")
#: The scope of event-service archives (pre-merge outputs live until the merge).
ES_SCOPE = "transient"
#: Without stage-out (a development queue), archives are kept here in the work directory.
ES_LOCAL_ARCHIVES = "es_archives"


#: The ``objstoreID`` of archives kept in the work directory (no object store has id 0).
LOCAL_OBJSTORE_ID = 0


def _resource_id(storage: StorageData, endpoint: str) -> int | None:
    found = storage.get(endpoint)
    return found.resource_id if found is not None else None


def _keep_locally(path: Path, directory: Path) -> None:
    directory.mkdir(mode=0o755, exist_ok=True)
    path.replace(directory / path.name)


def _endpoint(transfer: FileTransfer) -> str:
    return transfer.used.endpoint if transfer.used is not None else ""


@record(frozen=True)
class StagingSetup:
    """What the pilot provides for staging (built once, in ``pilot.tap``)."""

    registry: CopytoolRegistry = field(default_factory=CopytoolRegistry)
    storage: StorageData = field(default_factory=StorageData)
    http: HTTPClient | None = None
    credentials: Credentials = field(default_factory=lambda: Credentials({}))
    tool_env: Mapping[str, str] = field(default_factory=dict)
    parallel: int = 4
    progress_interval: float = 60.0
    records_dir: Path | None = None
    #: Where checksums are computed while inputs arrive (a small pool of their own, so that
    #: they never hold up the short blocking calls); None: the staging tools' runner.
    checksum_runner: ThreadRunner | None = None


@record
class StagingMetrics:
    files_in: int = 0
    bytes_in: int = 0
    seconds_in: float = 0.0
    files_out: int = 0
    bytes_out: int = 0
    seconds_out: float = 0.0
    direct: int = 0
    transfers: list[dict[str, object]] = field(default_factory=list)

    def job_metrics(self) -> str:
        """``key=value`` pairs for the update's ``jobMetrics``."""
        parts = []
        if self.files_in or self.direct:
            parts += [
                f"nInputs={self.files_in}",
                f"stageinBytes={self.bytes_in}",
                f"stageinTime={self.seconds_in:.1f}",
            ]
        if self.direct:
            parts.append(f"directAccessFiles={self.direct}")
        if self.files_out:
            parts += [
                f"nOutputs={self.files_out}",
                f"stageoutBytes={self.bytes_out}",
                f"stageoutTime={self.seconds_out:.1f}",
            ]
        return " ".join(parts)


class JobStaging:
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        job: Job,
        workdir: Path,
        setup: StagingSetup,
        queuedata: QueueData,
        *,
        spawner: IReactorProcess,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        control: ProcessControl = OS_PROCESS_CONTROL,
        catalog_name: str = "PoolFileCatalog.xml",
        wrap_in: CommandWrapper | None = None,
        wrap_out: CommandWrapper | None = None,
    ) -> None:
        self.catalog_name = catalog_name
        self.job = job
        self.workdir = workdir
        self.setup = setup
        self.queuedata = queuedata
        self.metrics = StagingMetrics()
        self.staged_in: list[str] = []
        self.catalog: Path | None = None
        self.turls: dict[str, str] = {}
        self._spawner = spawner
        self._clock = clock
        self._control = control
        self._wrap_in = wrap_in
        self._wrap_out = wrap_out
        self._engine: StagingEngine | None = None
        self._in_thread = in_thread

    #: Called with each copytool process started (pid, tool, lfn) and ended (pid): the journal.
    tool_started: Callable[[int, str, str], None] | None = None
    tool_ended: Callable[[int], None] | None = None
    #: Called with each transfer the record keeps (the journal's ``transfer.done``).
    transfer_done: Callable[[Any], object] | None = None

    @property
    def engine(self) -> StagingEngine:
        """The staging engine, made (and its modules imported) when a job first moves a file.

        A job that moves none (no inputs, a queue without stage-out) never pays for it.
        """
        if self._engine is None:
            from pilot.staging.engine import StagingEngine
            from pilot.staging.record import TransferRecord
            from pilot.staging.tools.base import ToolContext

            job, setup, queuedata = self.job, self.setup, self.queuedata
            context = ToolContext(
                spawner=self._spawner,
                clock=self._clock,
                in_thread=self._in_thread,
                env=setup.tool_env,
                logdir=self.workdir / "pilot_transfer_logs",
                http=setup.http,
                credentials=setup.credentials,
                control=self._control,
                wrap_in=self._wrap_in,
                wrap_out=self._wrap_out,
                on_started=self.tool_started,
                on_ended=self.tool_ended,
                setup={
                    "trace": {
                        "pq": queuedata.name,
                        "taskid": str(job.task_id or ""),
                        "localSite": queuedata.site,
                    }
                },
            )
            record = (
                TransferRecord.for_job(setup.records_dir, job.panda_id, job.attempt_nr, self._in_thread)
                if setup.records_dir is not None
                else None
            )
            if record is not None:
                record.on_append = self.transfer_done
            self._engine = StagingEngine(
                setup.registry,
                context,
                parallel=setup.parallel,
                progress_interval=setup.progress_interval,
                record=record,
                checksum_runner=setup.checksum_runner,
            )
        return self._engine

    # -- stage-in ------------------------------------------------------------------

    async def stage_in(self) -> None:
        if not self.job.inputs:
            return
        from pilot.staging.catalog import write_catalog
        from pilot.staging.plan import plan_stage_in

        plan = plan_stage_in(self.job, self.workdir, self.queuedata, self.setup.storage, self.setup.registry)
        await self._check_space(plan.transfers)
        await self.engine.run(plan.transfers, stop_on_failure=True)
        self._account(plan.transfers, inbound=True)
        failed = next((t for t in plan.transfers if t.error is not None), None)
        if failed is not None:
            assert failed.error is not None
            raise await self._blame_full_disk(failed.error, failed.size)
        self.staged_in = [t.lfn for t in plan.transfers]
        self.metrics.direct = len(plan.direct)
        self.turls = {d.lfn: d.turl for d in plan.direct}
        copied = [(t.guid, t.lfn) for t in plan.transfers]
        self.catalog = await self._in_thread(
            write_catalog, self.workdir, plan.direct, copied, self.catalog_name
        )

    async def _check_space(self, transfers: Sequence[FileTransfer]) -> None:
        total = sum(t.size or 0 for t in transfers)
        limit_mb = self.queuedata.maxinputsize
        if limit_mb > 0 and total > limit_mb * _MB:
            raise PilotError(
                ErrorCode.SIZETOOLARGE, f"inputs need {total // _MB} MB, the queue allows {limit_mb} MB"
            )
        free = (await self._in_thread(shutil.disk_usage, self.workdir)).free
        if total > free:
            raise PilotError(ErrorCode.NOLOCALSPACE, f"inputs need {total // _MB} MB, {free // _MB} MB free")

    async def _blame_full_disk(self, error: PilotError, needed: int | None) -> PilotError:
        """NOLOCALSPACE for a generic copy failure when the file no longer fits.

        A copytool that hits a full disk often says so only in its log, which sits on
        that same disk and is lost; the free space after the failure is the witness.
        """
        if error.code is not ErrorCode.STAGEINFAILED:
            return error
        if not await self._in_thread(is_full, self.workdir, needed or 0):
            return error
        return PilotError(ErrorCode.NOLOCALSPACE, f"{error.detail} (the work directory's disk is full)")

    # -- stage-out -----------------------------------------------------------------

    @property
    def stage_out_configured(self) -> bool:
        return self.queuedata.stores_outputs

    async def stage_out(self, files: Sequence[ReportedFile]) -> list[ReportedFile]:
        """Store ``files`` (outputs and/or the log); returns them with their destinations."""
        if not files or not self.stage_out_configured:
            return list(files)
        from pilot.staging.plan import plan_stage_out

        specs = self._specs()
        items = [(specs[f.lfn], f.path, Checksum("adler32", f.facts.adler32), f.facts.size) for f in files]
        transfers = plan_stage_out(self.job, items, self.queuedata, self.setup.storage, self.setup.registry)
        await self.engine.run(transfers)
        self._account(transfers, inbound=False)
        failure = next((t.error for t in transfers if t.error is not None), None)
        if failure is not None:
            raise failure
        by_lfn = {t.lfn: t for t in transfers}
        return [replace(f, surl=by_lfn[f.lfn].remote_url, endpoint=_endpoint(by_lfn[f.lfn])) for f in files]

    async def store_archive(self, path: Path, lfn: str, size: int, adler32: str) -> tuple[str, int]:
        """Store an event-service archive where the queue sends ES outputs; (URL, objstore id).

        ``es_events`` storage first, then ``es_failover``, then where ordinary outputs go,
        with the queue's copytools, verified like every output.  Only storage with a
        numeric id (CRIC's ``id``) can take an archive: the server records the archive by
        that id (``objstoreID``, which the merge job resolves), and a report without it is
        rolled back whole.  A queue without stage-out (a development queue) keeps the
        archive in ``es_archives/`` of the work directory and reports id 0.
        """
        if not self.stage_out_configured:
            kept = self.workdir / ES_LOCAL_ARCHIVES
            await self._in_thread(_keep_locally, path, kept)
            return (kept / path.name).as_uri(), LOCAL_OBJSTORE_ID
        from pilot.staging.plan import plan_stage_out

        spec = OutputFile(lfn=lfn, scope=ES_SCOPE)
        transfers = plan_stage_out(
            self.job,
            [(spec, path, Checksum("adler32", adler32), size)],
            self.queuedata,
            self.setup.storage,
            self.setup.registry,
            activities=ES_ACTIVITIES,
        )
        transfer = transfers[0]
        storage = self.setup.storage
        with_id = [a for a in transfer.attempts if _resource_id(storage, a.endpoint) is not None]
        if not with_id:
            names = sorted({a.endpoint for a in transfer.attempts})
            raise PilotError(
                ErrorCode.NOSTORAGE, f"no storage with a numeric id for event-service archives among {names}"
            )
        transfer.attempts[:] = with_id
        await self.engine.run(transfers)
        self._account(transfers, inbound=False)
        if transfer.error is not None:
            raise transfer.error
        assert transfer.used is not None
        objstore_id = _resource_id(storage, transfer.used.endpoint)
        assert objstore_id is not None
        return transfer.remote_url, objstore_id

    def _specs(self) -> dict[str, OutputFile]:
        specs = {o.lfn: o for o in self.job.outputs}
        if self.job.log is not None:
            specs[self.job.log.lfn] = self.job.log
        return specs

    def _account(self, transfers: Sequence[FileTransfer], *, inbound: bool) -> None:
        for t in transfers:
            self.metrics.transfers.append(
                {
                    "lfn": t.lfn,
                    "direction": t.direction.value,
                    "tool": t.used.tool if t.used else None,
                    "endpoint": t.used.endpoint if t.used else None,
                    "size": t.size,
                    "seconds": round(t.duration, 3),
                    "tries": t.tries,
                    "outcome": "done" if t.done else (t.error.code.name if t.error else "not run"),
                    "from_record": t.from_record,
                }
            )
            if not t.done:
                continue
            if inbound:
                self.metrics.files_in += 1
                self.metrics.bytes_in += t.size or 0
                self.metrics.seconds_in += t.duration
            else:
                self.metrics.files_out += 1
                self.metrics.bytes_out += t.size or 0
                self.metrics.seconds_out += t.duration
