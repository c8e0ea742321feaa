"""The PanDA server as a job source and reporter (``IJobSource``, ``IJobReporter``).

Jobs come from ``acquire_jobs``/``getJob`` and updates go to ``update_job``/``updateJob``
through one ``PandaClient`` (both API generations, its transport retries).  A final
update is one attempt here: the job retries it on its own clock until its deadline
(``pilot.job.updates``), so a slow server never holds a retry loop hidden in the client.

Every string goes out fitted to the server's column for it (``pilot.server.widths``):
the real server drops a debug tail longer than its column, and rolls back a whole
update with an over-long ``pilotTiming``, so a value that does not fit is never sent.
Redaction happens before, where the text is made.

As ``IEventSource`` it hands out event ranges and takes their statuses.  The legacy API
takes a report in one ``updateEventRanges`` call.  On the v1 API panda-server 1.0.4's
``update_event_ranges`` commits a report and then answers HTTP 500, so: version-0
reports (statuses without archives) go range by range through
``update_single_event_range``, which answers reliably (``how="single"``), and a
version-1 report whose 500 carries 1.0.4's known texts counts as committed
(``how="confirmed-after-500"``, every range's outcome unknown) and is never sent again.
Each workaround is logged once per source.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from pilot.interfaces import IEventSource, IJobReporter, IJobSource
from pilot.logs import pilot_observer
from pilot.server.api import ApiMode
from pilot.server.client import (
    AcquireResult,
    JobRequest,
    JobUpdate,
    PandaClient,
    RetryPolicy,
    ServerError,
    UpdateResult,
)
from pilot.server.event_calls import CommittedThenFailed, merge_results
from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult
from pilot.server.widths import fit_request, fit_update, fitted_fields

T = TypeVar("T")
log = Logger(observer=pilot_observer)

#: One attempt: the caller owns the retries of a final update.
_ONE_ATTEMPT = RetryPolicy(attempts=1)


@implementer(IJobSource, IJobReporter, IEventSource)
class PandaServerSource:
    """Jobs and event ranges from, and updates to, a PanDA server."""

    name = "panda"

    def __init__(self, client: PandaClient) -> None:
        self.client = client
        self._workarounds: set[str] = set()
        # range id -> (status, outcome) of statuses that went through in a report whose
        # later calls failed: when the report comes again, they are not sent twice
        self._delivered: dict[str, tuple[str, bool | None]] = {}

    @property
    def calls(self) -> int:
        return self.client.calls

    def acquire_jobs(self, request: JobRequest) -> Deferred[AcquireResult]:
        return Deferred.fromCoroutine(self.client.acquire_job(self._fitted(request, fit_request(request))))

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        retry = _ONE_ATTEMPT if final else None
        fitted = self._fitted(update, fit_update(update))
        return Deferred.fromCoroutine(self.client.update_job(fitted, retry=retry, timeout=timeout))

    # -- IEventSource -------------------------------------------------------------------

    def acquire_event_ranges(self, request: EventRangeRequest) -> Deferred[list[dict[str, object]]]:
        return Deferred.fromCoroutine(self._acquire_ranges(request))

    async def _acquire_ranges(self, request: EventRangeRequest) -> list[dict[str, object]]:
        return list(await self.client.acquire_event_ranges(request))

    def update_event_ranges(self, update: EventRangeUpdate) -> Deferred[EventUpdateResult]:
        return Deferred.fromCoroutine(self._update_ranges(update))

    async def _update_ranges(self, update: EventRangeUpdate) -> EventUpdateResult:
        if not update.range_ids:
            return EventUpdateResult({})
        if self.client.api is ApiMode.LEGACY:
            return await self.client.update_event_ranges(update)
        if update.version == 0:
            return await self._range_by_range(update)
        try:
            return await self.client.update_event_ranges(update)
        except CommittedThenFailed:
            self._workaround(
                "confirmed-after-500",
                "the server answers HTTP 500 after committing a report (panda-server 1.0.4); "
                "such a report counts as delivered and is not sent again",
            )
            return EventUpdateResult(
                {range_id: None for range_id in update.range_ids}, None, "confirmed-after-500"
            )

    async def _range_by_range(self, update: EventRangeUpdate) -> EventUpdateResult:
        self._workaround(
            "single",
            "range statuses go one by one (update_single_event_range): the bulk call of "
            "panda-server 1.0.4 answers HTTP 500 after committing",
        )
        results: list[EventUpdateResult] = []
        for status in update.statuses:
            earlier = self._delivered.pop(status.range_id, None)
            if earlier is not None and earlier[0] == status.status:
                results.append(EventUpdateResult({status.range_id: earlier[1]}, None, "single"))
                continue
            try:
                results.append(await self.client.update_single_event_range(status, update.panda_id))
            except ServerError:
                for result in results:
                    for range_id, outcome in result.accepted.items():
                        self._delivered[range_id] = (_status_of(update, range_id), outcome)
                raise
        return merge_results(results, "single")

    def _workaround(self, how: str, why: str) -> None:
        if how in self._workarounds:
            return
        self._workarounds.add(how)
        log.info("event ranges: {why}", why=why, how=how, event="server.es_workaround")

    def _fitted(self, original: T, fitted: T) -> T:
        if fitted is not original:
            log.info(
                "shortened to fit the server's columns: {fields}",
                fields=", ".join(fitted_fields(original, fitted)),
                event="server.fitted",
            )
        return fitted


def _status_of(update: EventRangeUpdate, range_id: str) -> str:
    return next(status.status for status in update.statuses if status.range_id == range_id)
