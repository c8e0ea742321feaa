"""The job states PanDA's server knows (``jobStatus``), as the pilot reports them.

The pilot's own, finer view of a job (``pilot.job.states.JobPhase``) maps onto these
through one transition table; job sources and reporters speak only these.
"""

from __future__ import annotations

from enum import Enum


class ServerState(Enum):
    """The ``state`` / ``job_status`` values PanDA's update call accepts."""

    STARTING = "starting"
    RUNNING = "running"
    TRANSFERRING = "transferring"
    HOLDING = "holding"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (ServerState.FINISHED, ServerState.FAILED, ServerState.HOLDING)
