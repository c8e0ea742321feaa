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
takes a report in one ``updateEventRanges`` call, which answers reliably.  On the v1 API
panda-server 1.0.4's ``update_event_ranges`` answers HTTP 500 after every report, both
when it committed it and when it rolled it back, so: version-0 reports (statuses
without archives) go range by range through ``update_single_event_range``, which
answers reliably (``how="single"``); a version-1 report answered with that 500 is read
back at once with ``get_event_range_statuses`` (``how="confirmed-after-500"``): ranges
recorded as reported are accepted, ranges the server holds with another final status
(or not for this job) are refused, and if some are still not final there,
``RangesNotRecorded`` carries the settled ones so that the caller sends only the others
again.  When the read-back fails (or the report's call failed some other way after it
may have reached the server), the report counts as not delivered, and before any of its
ranges goes out again the source reads them back, so a range the server took is not
reported twice.  Sending one again would be harmless anyway: the server never changes a
final range (a second report of it changes nothing there).  Until a read-back succeeds
such ranges do not go out again.  Each workaround is logged once per source.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from pilot.server.event_calls import (
    FINAL_STATES,
    CommittedThenFailed,
    check_recorded,
    merge_results,
    range_job,
)
from pilot.server.events import (
    EventRangeRequest,
    EventRangeUpdate,
    EventUpdateResult,
    RangesNotRecorded,
    RangeStatus,
)
from pilot.server.widths import fit_request, fit_update, fitted_fields

T = TypeVar("T")
log = Logger(observer=pilot_observer)

#: One attempt: the caller owns the retries of a final update.
_ONE_ATTEMPT = RetryPolicy(attempts=1)

#: ``how`` of a version-1 report whose outcome was read back from the server.
CONFIRMED = "confirmed-after-500"


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
        # ids of version-1 ranges sent in a report whose outcome is not known yet: they
        # are read back from the server before they are sent again
        self._doubtful: set[str] = set()

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
        return await self._archives(update)

    async def _archives(self, update: EventRangeUpdate) -> EventUpdateResult:
        """A version-1 report on the v1 API, its outcome read back when the reply does not say.

        Ranges of an earlier report whose outcome is unknown are read back first, and
        only the ones the server did not record are sent.  A report is doubtful from
        the moment it is sent until a reply or a read-back settles it.  Raises
        ``RangesNotRecorded`` (which carries the settled ranges) when some ranges were
        not recorded, or when a call failed after others were settled; any other
        ``ServerError`` when nothing was settled.
        """
        settled: dict[str, bool | None] = {}
        command: str | None = None
        how = "bulk"
        try:
            doubtful = [r for r in update.ranges if r.range_id in self._doubtful]
            if doubtful:
                how = CONFIRMED
                settled.update(await self._read_back(doubtful))
            rest = update.only([i for i in update.range_ids if i not in settled])
            if rest.range_ids:
                self._doubtful.update(rest.range_ids)
                try:
                    result = await self.client.update_event_ranges(rest)
                except CommittedThenFailed:
                    self._workaround(
                        CONFIRMED,
                        "the server answers HTTP 500 after a report whether it committed it or "
                        "rolled it back (panda-server 1.0.4): its outcome is read back with "
                        "get_event_range_statuses",
                    )
                    how = CONFIRMED
                    settled.update(await self._read_back(rest.ranges))
                else:
                    self._doubtful.difference_update(rest.range_ids)
                    settled.update(result.accepted)
                    command = result.command
        except ServerError as error:
            if not settled:
                raise
            unsettled = len(update.range_ids) - len(settled)
            raise RangesNotRecorded(
                f"{unsettled} of {len(update.range_ids)} range(s) not reported: {error}",
                EventUpdateResult(settled, command, how),
            ) from error
        unrecorded = [i for i in update.range_ids if i not in settled]
        if unrecorded:
            log.warn(
                "event ranges: the server did not record {n} of {total} range(s) of a report "
                "(it rolled the report back), e.g. {example}; they go again",
                n=len(unrecorded),
                total=len(update.range_ids),
                example=unrecorded[0],
                event="server.es_not_recorded",
            )
            raise RangesNotRecorded(
                f"{len(unrecorded)} of {len(update.range_ids)} range(s) not recorded by the server",
                EventUpdateResult(settled, command, how),
            )
        return EventUpdateResult(settled, command, how)

    async def _read_back(self, statuses: Sequence[RangeStatus]) -> dict[str, bool | None]:
        """The outcomes of ``statuses`` as the server recorded them; the ranges it did not record left out.

        A failing query raises ``ServerError`` and the ranges stay doubtful.
        """
        jobs = sorted(
            {job for s in statuses if s.status in FINAL_STATES and (job := range_job(s.range_id)) is not None}
        )
        recorded = await self.client.get_event_range_statuses(jobs) if jobs else {}
        settled, _unrecorded = check_recorded(statuses, recorded)
        self._doubtful.difference_update(s.range_id for s in statuses)
        return settled

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
