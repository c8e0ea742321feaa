"""The PanDA server as a job source and reporter (``IJobSource``, ``IJobReporter``).

Jobs come from ``acquire_jobs``/``getJob`` and updates go to ``update_job``/``updateJob``
through one ``PandaClient`` (both API generations, its transport retries).  A final
update is one attempt here: the job retries it on its own clock until its deadline
(``pilot.job.updates``), so a slow server never holds a retry loop hidden in the client.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.interfaces import IJobReporter, IJobSource
from pilot.server.client import AcquireResult, JobRequest, JobUpdate, PandaClient, RetryPolicy, UpdateResult

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
        return Deferred.fromCoroutine(self.client.acquire_job(request))

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        retry = _ONE_ATTEMPT if final else None
        return Deferred.fromCoroutine(self.client.update_job(update, retry=retry, timeout=timeout))
