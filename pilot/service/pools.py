"""The pilot's own thread pools as services: started before the job loop, stopped after it.

Blocking helpers (file-system walks, ``disk_usage``, writes of summaries and status
files, ``/proc`` scans) run in a bounded pool of the pilot's, and checksums of arriving
inputs in a small one of their own, so that neither can starve the other and neither
holds the reactor's default pool (``pilot.util.threads.WorkerPool``).  A pool that is
never stopped would keep the process alive at exit: stopping waits for the work
already submitted, then for the threads.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from pilot.util.threads import WorkerPool

#: Threads for short blocking calls, and for checksums of inputs while they arrive.
BLOCKING_THREADS = 10
CHECKSUM_THREADS = 2


class PoolService(Service):
    """One ``WorkerPool`` with the service's life."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.name = f"pool {pool.name}"

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.pool.stop()
