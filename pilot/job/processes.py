"""The processes of one job besides the payload: pre-, co- and post-process, utilities.

See ``pilot.job.composition`` for how they are run.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

#: In a utility's argv, replaced by the payload's pid (a plain token, never a shell).
PAYLOAD_PID = "{payload_pid}"


@dataclass(frozen=True)
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
