"""The PanDA server as a job source and reporter (``IJobSource``, ``IJobReporter``).

Jobs come from ``acquire_jobs``/``getJob`` and updates go to ``update_job``/``updateJob``
through one ``PandaClient`` (both API generations, its transport retries).  A final
update is one attempt here: the job retries it on its own clock until its deadline
(``pilot.job.updates``), so a slow server never holds a retry loop hidden in the client.

Every string goes out fitted to the server's column for it (``pilot.server.widths``):
the real server drops a debug tail longer than its column, and rolls back a whole
update with an over-long ``pilotTiming``, so a value that does not fit is never sent.
Redaction happens before, where the text is made.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from pilot.interfaces import IJobReporter, IJobSource
from pilot.logs import pilot_observer
from pilot.server.client import AcquireResult, JobRequest, JobUpdate, PandaClient, RetryPolicy, UpdateResult
from pilot.server.widths import fit_request, fit_update, fitted_fields

T = TypeVar("T")
log = Logger(observer=pilot_observer)

#: One attempt: the caller owns the retries of a final update.
_ONE_ATTEMPT = RetryPolicy(attempts=1)


@implementer(IJobSource, IJobReporter)
class PandaServerSource:
    """Jobs from, and updates to, a PanDA server."""

    name = "panda"

    def __init__(self, client: PandaClient) -> None:
        self.client = client

    @property
    def calls(self) -> int:
        return self.client.calls

    def acquire_jobs(self, request: JobRequest) -> Deferred[AcquireResult]:
        return Deferred.fromCoroutine(self.client.acquire_job(self._fitted(request, fit_request(request))))

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        retry = _ONE_ATTEMPT if final else None
        fitted = self._fitted(update, fit_update(update))
        return Deferred.fromCoroutine(self.client.update_job(fitted, retry=retry, timeout=timeout))

    def _fitted(self, original: T, fitted: T) -> T:
        if fitted is not original:
            log.info(
                "shortened to fit the server's columns: {fields}",
                fields=", ".join(fitted_fields(original, fitted)),
                event="server.fitted",
            )
        return fitted
