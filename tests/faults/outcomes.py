"""Recording what each fault scenario observed, for ``docs/reliability.md``.

With ``TXPILOT_FAULT_RESULTS=<file>`` in the environment, every scenario appends one
JSON line to that file at its end (``record``); without it nothing is written.  The
recorder never decides a test's result: it writes what the test saw, including a
failure, and a write that fails is ignored.  ``tools/reliability_table.py`` turns the
file into the table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

#: The environment variable naming the JSON-lines file.
RESULTS_VARIABLE = "TXPILOT_FAULT_RESULTS"


@dataclass
class Outcome:
    """One scenario: the fault, where it struck, what should happen and what did."""

    scenario: str
    fault: str
    phase: str
    expected: str
    #: The family of faults, a section of the table ("server", "disk", "signal" ...).
    group: str = ""
    #: The job's final state on the server (None: never observed, the test broke first).
    state: str | None = None
    #: The pilot error code's name on the server ("" when there is none).
    error: str = ""
    #: Final-state updates the server accepted for the job (exactly 1 is right) ...
    final_updates: int = 0
    #: ... and final-state updates it received in all (repeats answered "alreadydone").
    final_updates_received: int = 0
    files_lost: int | None = None
    files_duplicated: int | None = None
    passed: bool = False
    #: Set when the test is marked ``todo`` for a known pilot bug (its reason).
    known_bug: str = ""
    notes: str = ""


def record(outcome: Outcome) -> None:
    """Append ``outcome`` as one JSON line to ``$TXPILOT_FAULT_RESULTS`` (if set)."""
    path = os.environ.get(RESULTS_VARIABLE)
    if not path:
        return
    line = json.dumps(asdict(outcome), sort_keys=True) + "\n"
    try:
        # one write of one line with O_APPEND: parallel trial workers never interleave
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError:
        pass  # the table misses a line; the test's result stands
