"""The job logic behind getJob/acquire_jobs and updateJob/update_job.

This follows the real server's behaviour (``JobDispatcher``, ``TaskBuffer`` and
``job_complex_module.getJobs/updateJobStatus``, ``adder_gen``) as far as a single
development server can:

* dispatch: the oldest ``activated`` job of the queue that matches the pilot's
  label, resource type, memory, disk and wall-time limits becomes ``sent``;
* updates are matched on PandaID (and attemptNr when given) among jobs the
  server still holds as active; a job that is gone, or a wrong attempt number,
  gets ``command=tobekilled``; an update for a ``failed`` job gets ``alreadydone``;
  the other special transitions of ``updateJobStatus`` are kept as well;
* ``finished``/``failed`` are stored as ``holding`` with the job output report,
  then an in-process stand-in for the Adder daemon parses the report and sets the
  final state.

The decisions themselves are pure functions (``updates`` for ``updateJobStatus``,
``adder`` for the Adder) that run inside the store's transaction; this module feeds
them and logs what they decided.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pilot.devserver.adder import decide_adder
from pilot.devserver.auth import clean_user_id
from pilot.devserver.columns import DISPATCH_COLUMNS, PILOT_LOG_COLUMN, PILOT_LOG_WIDTH, refused
from pilot.devserver.events import check_event_service_job, insert_event_ranges
from pilot.devserver.jobdef import JobDefinition, JobDefinitionError, normalise_job, render_job
from pilot.devserver.queues import QueueRegistry
from pilot.devserver.store import JobRecord, JobSelector, JobStore, UpdateRecord
from pilot.devserver.updates import VALID_UPDATE_STATES, PilotUpdate, UpdateOutcome, decide_update

log = Logger()

#: What ``TaskBuffer.updateJobStatus`` finds as pilot secrets in debug mode on the reference server.
PILOT_SECRETS = "{}"


# -- requests as the dispatcher sees them -----------------------------------------------------------


@dataclass(frozen=True)
class AcquireRequest:
    """A getJob/acquire_jobs call after parameter conversion and role checks."""

    site: str
    n_jobs: int = 1
    prod_source_label: str | None = None
    memory: int = 0
    disk_space: int = 0
    remaining_time: int = 0
    resource_type: str | None = None
    prod_user_id: str | None = None
    task_id: object = None
    computing_element: str | None = None
    node: str | None = None
    scheduler_id: str | None = None
    background: bool = False
    job_type: str | None = None
    get_proxy_key: bool = False


@dataclass(frozen=True)
class UpdateResult:
    """What the API layer puts in the reply.

    ``database_error``: the database refused the update (a value wider than its column);
    the server answers ``StatusCode`` 30 and the pilot's update is lost.
    """

    status_code: int
    command: str | None = None
    secrets: str | None = None
    metadata_failed: bool = False
    database_error: bool = False


# -- the dispatcher ------------------------------------------------------------------------------


class Dispatcher:
    """Job submission, dispatch and updates on top of a ``JobStore``."""

    def __init__(self, store: JobStore, clock: IReactorTime, queues: QueueRegistry) -> None:
        self._store = store
        self._clock = clock
        self._queues = queues

    @property
    def default_site(self) -> str | None:
        return next(iter(self._queues)) if len(self._queues) == 1 else None

    # -- submission ---------------------------------------------------------------------------

    def definitions(self, submission: object, submitter_dn: str) -> list[JobDefinition]:
        """Validate a submission (a job dict, a list of them, or ``{PandaID: dict}``)."""
        definitions = []
        for index, (panda_id, job) in enumerate(split_submission(submission)):
            try:
                definition = normalise_job(job, submitter_dn=submitter_dn, default_site=self.default_site)
                check_event_service_job(definition)
            except JobDefinitionError as exc:
                raise JobDefinitionError(f"job {index}: {exc}") from None
            if panda_id is not None:
                if definition.panda_id not in (None, panda_id):
                    raise JobDefinitionError(f"job {index}: key {panda_id} differs from its PandaID")
                definition = _with_panda_id(definition, panda_id)
            definitions.append(definition)
        return definitions

    async def submit(self, submission: object, *, submitter_dn: str) -> list[int]:
        """Store new ``activated`` jobs; returns their PandaIDs."""
        definitions = self.definitions(submission, submitter_dn)
        ids = await self._store.insert_jobs(definitions, self._clock.seconds(), insert_event_ranges)
        log.info("submitted jobs {pandaids}", pandaids=ids)
        return ids

    async def submit_file(self, content: bytes, source: str, *, submitter_dn: str) -> list[int] | None:
        """Submit a job file's jobs unless the same content was submitted before (then None)."""
        try:
            submission = json.loads(content)
        except ValueError as exc:
            raise JobDefinitionError(f"{source}: not JSON: {exc}") from None
        definitions = self.definitions(submission, submitter_dn)
        digest = hashlib.sha256(content).hexdigest()
        ids = await self._store.submit_once(
            digest, source, definitions, self._clock.seconds(), insert_event_ranges
        )
        if ids is None:
            log.info("job file {source} was submitted before; skipped", source=source)
        else:
            log.info("submitted jobs {pandaids} from {source}", pandaids=ids, source=source)
        return ids

    # -- dispatch -------------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> tuple[list[dict[str, object]], int]:
        """Claim jobs for a pilot: their job dicts (``appendJob`` order) and ``nSent``."""
        label = request.prod_source_label
        if self._queues.status(request.site) == "test" and label in ("user", "managed", "unified"):
            label = "test"
        selector = self._selector(request, label)
        refusals = dispatch_refusals(request)
        for column, reason in refusals.items():
            log.error(
                "acquire for {site}: the database refused jobsActive4.{column} ({reason}); "
                "the dispatch is rolled back and the pilot gets no job",
                site=request.site,
                column=column,
                reason=reason,
                event="devserver.value_refused",
            )
        if refusals:
            return [], 0
        records, n_sent = await self._store.claim(selector, request.n_jobs, self._clock.seconds())
        for record in records:
            log.info(
                "job {pandaid} activated -> sent to {site} {node}",
                pandaid=record.PandaID,
                site=request.site,
                node=request.node,
            )
        return [_render(record) for record in records], n_sent

    def _selector(self, request: AcquireRequest, label: str | None) -> JobSelector:
        labels: tuple[str, ...] | None
        processing_type = None
        if label == "user":
            labels = ("user", "panda", "install")
        elif label in (None, "managed"):
            labels = ("managed", "test", "prod_test", "install")
        elif label == "test" and request.computing_element is not None:
            processing_type = "gangarobot"
            if self._queues.is_unified(request.site) and request.job_type == "user":
                labels = None
            else:
                labels = ("prod_test", "install", "test")
        elif label == "unified":
            labels = ("managed", "test", "prod_test", "install", "user", "panda")
        else:
            labels = (label,)
        prod_user_name = None
        if request.prod_user_id is not None:
            prod_user_name = _clean(request.prod_user_id)
        return JobSelector(
            site=request.site,
            labels=labels,
            processing_type=processing_type,
            resource_type=request.resource_type,
            memory=request.memory,
            disk_space=request.disk_space,
            remaining_time=request.remaining_time,
            background=request.background,
            prod_user_name=prod_user_name,
            task_id=request.task_id,
            count_sent=label in (None, "managed"),
            node=request.node,
            computing_element=request.computing_element,
            scheduler_id=request.scheduler_id,
        )

    # -- updates --------------------------------------------------------------------------------

    async def update(self, update: PilotUpdate) -> UpdateResult:
        """Apply a pilot's update; runs the Adder when a job reaches its final heartbeat."""
        record = UpdateRecord(
            PandaID=update.panda_id,
            state=update.state,
            time=self._clock.seconds(),
            api=update.api,
            params=dict(update.raw),
        )
        if update.state not in VALID_UPDATE_STATES:
            await self._store.apply_update(update.panda_id, lambda job: UpdateOutcome({}, None), record)
            return UpdateResult(status_code=50)
        if update.pilot_log:  # storePilotLog, first and on its own (the dev server keeps no pilot logs)
            reason = refused(update.pilot_log[:PILOT_LOG_WIDTH], PILOT_LOG_WIDTH)
            _log_refusals(update.panda_id, {PILOT_LOG_COLUMN: reason} if reason else {}, rolled_back=False)
        now = self._clock.seconds()
        outcome = await self._store.apply_update(
            update.panda_id, lambda job: decide_update(job, update, now), record
        )
        if outcome.metadata_failed:
            return UpdateResult(status_code=30, metadata_failed=True)
        _log_refusals(update.panda_id, outcome.refused, rolled_back=outcome.database_error)
        if outcome.database_error:
            return UpdateResult(status_code=30, database_error=True)
        if outcome.new_status is not None and outcome.new_status != outcome.old_status:
            log.info(
                "job {pandaid} {old} -> {new} (pilot reported {state})",
                pandaid=update.panda_id,
                old=outcome.old_status,
                new=outcome.new_status,
                state=update.state,
            )
        if outcome.run_adder:
            await self._run_adder(update.panda_id, update.state)
        command = outcome.command
        secrets = PILOT_SECRETS if command is not None and "debug" in command else None
        return UpdateResult(status_code=0, command=command, secrets=secrets)

    async def _run_adder(self, panda_id: int, reported: str) -> None:
        now = self._clock.seconds()
        outcome = await self._store.modify(panda_id, lambda job: decide_adder(job, reported, now))
        if outcome.status is not None:
            log.info(
                "job {pandaid} holding -> {status} (Adder{diag})",
                pandaid=panda_id,
                status=outcome.status,
                diag=f": {outcome.diag}" if outcome.diag else "",
            )

    # -- queries and development commands ---------------------------------------------------------

    async def job_status(self, panda_ids: Sequence[int]) -> list[tuple[int, str | None, int]]:
        """(PandaID, status or None if unknown, attemptNr) per requested ID."""
        result = []
        for panda_id in panda_ids:
            job = await self._store.get(panda_id)
            result.append((panda_id, job.jobStatus if job else None, job.attemptNr if job else 0))
        return result

    async def job_view(self, panda_id: int) -> dict[str, object] | None:
        """Everything about one job, with its updates (for tests, tools and ``GET /dev/jobs/<id>``)."""
        job = await self._store.get(panda_id)
        if job is None:
            return None
        updates = await self._store.updates(panda_id)
        view = job_summary(job)
        view.update(
            {
                "job": _render(job),
                "jobOutputReport": job.jobOutputReport,
                "transExitCode": job.transExitCode,
                "pilotErrorCode": job.pilotErrorCode,
                "pilotErrorDiag": job.pilotErrorDiag,
                "exeErrorCode": job.exeErrorCode,
                "exeErrorDiag": job.exeErrorDiag,
                "ddmErrorCode": job.ddmErrorCode,
                "ddmErrorDiag": job.ddmErrorDiag,
                "adderDiag": job.adderDiag,
                "jobDispatcherErrorDiag": job.jobDispatcherErrorDiag,
                "batchID": job.batchID,
                "modificationHost": job.modificationHost,
                "computingElement": job.computingElement,
                "schedulerID": job.schedulerID,
                "metaData": job.metaData,
                "pilotFields": job.pilotFields,
                "creationTime": _iso(job.creationTime),
                "modificationTime": _iso(job.modificationTime),
                "stateChangeTime": _iso(job.stateChangeTime),
                "startTime": _iso(job.startTime),
                "endTime": _iso(job.endTime),
                "updates": [
                    {
                        "state": update.state,
                        "time": _iso(update.time),
                        "api": update.api,
                        "params": update.params,
                        "command": update.command,
                    }
                    for update in updates
                ],
            }
        )
        return view

    async def list_jobs(self, status: str | None = None, site: str | None = None) -> list[dict[str, object]]:
        return [job_summary(job) for job in await self._store.list_jobs(status, site)]

    async def set_command(self, panda_id: int, command: str | None) -> bool:
        """Set (or clear, with None/"") the command the pilot gets with its next update."""

        def decide(job: JobRecord | None) -> tuple[Mapping[str, object], bool]:
            if job is None:
                return {}, False
            return {"commandToPilot": command or None, "modificationTime": self._clock.seconds()}, True

        found = await self._store.modify(panda_id, decide)
        if found:
            log.info("job {pandaid}: commandToPilot={command}", pandaid=panda_id, command=command)
        return found

    async def set_debug(self, panda_id: int, on: bool) -> bool:
        """Switch a job's debug mode (``command=debug`` and ``pilotSecrets`` in update replies)."""

        def decide(job: JobRecord | None) -> tuple[Mapping[str, object], bool]:
            if job is None:
                return {}, False
            return {"debug": on, "modificationTime": self._clock.seconds()}, True

        found = await self._store.modify(panda_id, decide)
        if found:
            log.info("job {pandaid}: debug mode {mode}", pandaid=panda_id, mode="on" if on else "off")
        return found


def _log_refusals(panda_id: int, refusals: Mapping[str, str], *, rolled_back: bool) -> None:
    """An error per value the database refused (the value itself stays out: it may be a payload's output)."""
    for column, reason in refusals.items():
        log.error(
            "job {pandaid}: the database refused {column} ({reason}); {lost}",
            pandaid=panda_id,
            column=column,
            reason=reason,
            lost="the whole update is rolled back" if rolled_back else "the value is not stored",
            event="devserver.value_refused",
        )


def dispatch_refusals(request: AcquireRequest) -> dict[str, str]:
    """The columns ``getJobs`` writes unsliced when it dispatches, that the database would refuse.

    The real server finds out only when it has a job to hand out; either way the pilot
    is told there is no job.
    """
    reasons = {}
    for name, (column, width) in DISPATCH_COLUMNS.items():
        reason = refused(getattr(request, name), width)
        if reason is not None:
            reasons[column] = reason
    return reasons


# -- submissions -----------------------------------------------------------------------------------


def split_submission(submission: object) -> list[tuple[int | None, Mapping[str, object]]]:
    """A job dict, a list of job dicts, or ``{"<PandaID>": job dict, ...}`` as (PandaID, job) pairs."""
    if isinstance(submission, list):
        if not submission:
            raise JobDefinitionError("no jobs given")
        if not all(isinstance(job, dict) for job in submission):
            raise JobDefinitionError("a job list must hold JSON objects")
        return [(None, job) for job in submission]
    if isinstance(submission, dict):
        if submission and all(
            re.fullmatch(r"\d+", str(key)) and isinstance(v, dict) for key, v in submission.items()
        ):
            return [(int(key), job) for key, job in submission.items()]
        return [(None, submission)]
    raise JobDefinitionError("a submission is a job object, a list of them, or {PandaID: job}")


def _with_panda_id(definition: JobDefinition, panda_id: int) -> JobDefinition:
    return replace(definition, panda_id=panda_id)


# -- views ---------------------------------------------------------------------------------------


def _render(job: JobRecord) -> dict[str, object]:
    return render_job(job.definition, panda_id=job.PandaID, attempt_nr=job.attemptNr, debug=job.debug)


def job_summary(job: JobRecord) -> dict[str, object]:
    return {
        "PandaID": job.PandaID,
        "jobStatus": job.jobStatus,
        "attemptNr": job.attemptNr,
        "computingSite": job.computingSite,
        "prodSourceLabel": job.prodSourceLabel,
        "prodUserID": job.prodUserID,
        "jobName": job.definition.get("jobName"),
        "commandToPilot": job.commandToPilot,
        "debug": job.debug,
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _clean(dn: str) -> str:
    return clean_user_id(dn) or dn
