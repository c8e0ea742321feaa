"""A job's lifecycle: internal phases, PanDA server states, and one transition table.

The pilot's view of a job (``JobPhase``) is finer than what it tells PanDA
(``ServerState``).  ``TRANSITIONS`` is the single place that says which phase may
follow which, and which server update (if any) a transition sends.  Anything not in
the table is a programming error and raises, so an impossible sequence such as
"finished before it ran" can never reach the server.
"""

from __future__ import annotations

from enum import Enum

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pilot.errors import JobErrors
from pilot.logs import pilot_observer
from pilot.model.states import ServerState


class JobPhase(Enum):
    """Where the pilot is with a job."""

    RECEIVED = "received"  # definition in hand, not yet accepted
    SETUP = "setup"  # work directory, transformation download, checks
    STAGEIN = "stagein"
    RUNNING = "running"  # payload executing
    STAGEOUT = "stageout"  # outputs, log tarball
    FINISHED = "finished"
    FAILED = "failed"


P = JobPhase
S = ServerState

#: (from, to) → the server update sent on that transition (None: nothing sent).
#: A failure may happen in any non-terminal phase; its update is ``failed``, or
#: ``holding`` when the job's first error is recoverable (see ``final_server_state``).
TRANSITIONS: dict[tuple[JobPhase, JobPhase], ServerState | None] = {
    (P.RECEIVED, P.SETUP): S.STARTING,
    (P.SETUP, P.STAGEIN): None,
    (P.STAGEIN, P.RUNNING): S.RUNNING,
    (P.RUNNING, P.STAGEOUT): None,
    (P.STAGEOUT, P.FINISHED): S.FINISHED,
    **{(phase, P.FAILED): S.FAILED for phase in (P.RECEIVED, P.SETUP, P.STAGEIN, P.RUNNING, P.STAGEOUT)},
}

#: The state a heartbeat reports while the job is in a phase.
HEARTBEAT_STATE: dict[JobPhase, ServerState] = {
    P.SETUP: S.STARTING,
    P.STAGEIN: S.STARTING,
    P.RUNNING: S.RUNNING,
    P.STAGEOUT: S.RUNNING,
}

TERMINAL = frozenset({P.FINISHED, P.FAILED})


class InvalidTransition(Exception):
    """A transition that is not in ``TRANSITIONS``: a bug in the pilot, never the job's fault."""


def final_server_state(phase: JobPhase, errors: JobErrors, *, stored_files: bool = False) -> ServerState:
    """The state of a job's final update.

    A recoverable (stage-out) failure is ``holding`` only when the pilot stored nothing:
    the server keeps the job output report of ``finished``/``failed`` updates alone, so
    a ``holding`` update would leave a stored log tarball unregistered on storage.
    With ``stored_files`` the job is ``failed`` with the same (retriable) error code.
    """
    if phase is JobPhase.FINISHED:
        return ServerState.FINISHED
    first = errors.first
    if first is not None and first.recoverable and not stored_files:
        return ServerState.HOLDING
    return ServerState.FAILED


class JobLifecycle:
    """The current phase of one job, with the time each phase was entered."""

    log = Logger(observer=pilot_observer)

    def __init__(self, panda_id: int, clock: IReactorTime) -> None:
        self.panda_id = panda_id
        self._clock = clock
        self.phase = JobPhase.RECEIVED
        self.entered: dict[JobPhase, float] = {JobPhase.RECEIVED: clock.seconds()}

    def advance(self, to: JobPhase) -> ServerState | None:
        """Move to ``to``; returns the server update this transition calls for."""
        key = (self.phase, to)
        if key not in TRANSITIONS:
            raise InvalidTransition(f"job {self.panda_id}: {self.phase.value} -> {to.value} is not allowed")
        previous, self.phase = self.phase, to
        self.entered[to] = self._clock.seconds()
        self.log.info(
            "job {pandaid}: {previous} -> {phase}",
            pandaid=self.panda_id,
            previous=previous.value,
            phase=to.value,
            event="job.phase",
        )
        return TRANSITIONS[key]

    @property
    def is_terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def heartbeat_state(self) -> ServerState | None:
        return HEARTBEAT_STATE.get(self.phase)

    def duration(self, start: JobPhase, end: JobPhase) -> float:
        """Seconds between entering ``start`` and entering ``end`` (0 if either never happened)."""
        if start in self.entered and end in self.entered:
            return max(0.0, self.entered[end] - self.entered[start])
        return 0.0
