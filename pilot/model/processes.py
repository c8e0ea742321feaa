"""Value types of a job's processes: how one ended, what the summary says of it, utilities.

See ``pilot.process.runner`` for how processes run and ``pilot.job.composition`` for
the pre-, co- and post-processes and utilities around the payload.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

from pilot.util.records import record

#: In a utility's argv, replaced by the payload's pid (a plain token, never a shell).
PAYLOAD_PID = "{payload_pid}"


@record(frozen=True)
class UtilitySpec:
    """A utility process an experiment or the queue wants beside the payload.

    ``when``: ``before`` (started before the payload, stopped after it), ``with``
    (started once the payload runs; ``{payload_pid}`` in ``argv`` is its pid) or
    ``after`` (run to completion after the payload).  A ``before``/``with`` utility that
    crashes (non-zero exit or a signal) is restarted up to ``max_restarts`` times; one that
    exits with 0 has finished its work and is left alone.  It is stopped with ``stop_signal``
    (then SIGKILL) when the payload has ended.
    """

    name: str
    argv: Sequence[str]
    when: Literal["before", "with", "after"] = "with"
    max_restarts: int = 3
    stop_signal: int = signal.SIGTERM


@record(frozen=True)
class ProcessOutcome:
    """How a managed process ended."""

    pid: int
    exit_code: int | None
    signal: int | None
    started: float
    ended: float
    terminated_by_pilot: bool = False
    lost: bool = False  # never confirmed dead, even after SIGKILL (backstop fired)

    @property
    def wall_time(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def shell_status(self) -> int:
        """The status a shell would show: the exit code, or 128 + signal number."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or signal.SIGKILL)


@record
class ProcessRecord:
    """What the job summary says about one process."""

    name: str
    role: str
    exit_code: int | None = None
    signal: int | None = None
    started: float | None = None
    ended: float | None = None
    restarts: int = 0
    stopped_by_pilot: bool = False
    runtime: str | None = None
    stdout: str = ""
    stderr: str = ""

    def finish(self, outcome: ProcessOutcome) -> None:
        self.exit_code = outcome.exit_code
        self.signal = outcome.signal
        self.started = outcome.started if self.started is None else self.started
        self.ended = outcome.ended
        self.stopped_by_pilot = outcome.terminated_by_pilot

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
