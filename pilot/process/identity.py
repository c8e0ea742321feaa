"""Which process a pid names: pid, start time and boot, so that a recycled pid is never taken for it.

A pid alone does not name a process: once a process has been reaped its pid is free
for the next one.  ``ProcessIdentity`` adds the two things that tell processes with
the same pid apart:

* the start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), which
  differs between any two processes that held the same pid during one boot;
* the boot id (``/proc/sys/kernel/random/boot_id``), a random UUID drawn at every
  boot: after a reboot the same pid may well come with the same start ticks.

``/proc/<pid>/stat`` is parsed from the *last* ``)``: the command name in field 2 is
chosen by the process itself (``prctl(PR_SET_NAME)``, the executable's name) and may
hold spaces and parentheses, while no later field holds a ``)``.

How the pilot uses this
-----------------------
Right after starting the payload (its supervisor, ``pilot.process.supervisor``, whose
pid is also its process group id), the pilot journals ``process_identity(pid).to_json()``.
A successor that finds the journal rebuilds it with ``ProcessIdentity.from_json`` and
adopts the payload (``pilot.process.adopt``) only if ``same_process`` holds; a
supervisor's status file names the supervisor's identity too, so a status left by an
earlier run in the same directory is never taken for this one's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pilot.util.records import record

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@record(frozen=True)
class ProcessIdentity:
    """One process, told apart from any other that had or will have its pid."""

    pid: int
    #: start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)
    start_ticks: int
    #: ``/proc/sys/kernel/random/boot_id`` when the identity was taken ("" if unreadable)
    boot_id: str

    def to_json(self) -> dict[str, Any]:
        """The journal's form: ``{"pid": …, "start_ticks": …, "boot_id": "…"}``."""
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ProcessIdentity:
        """Back from ``to_json``; ``ValueError`` for anything else (a damaged journal entry)."""
        pid, ticks, boot = document.get("pid"), document.get("start_ticks"), document.get("boot_id")
        if not _count(pid) or not _count(ticks) or not isinstance(boot, str):
            raise ValueError(f"not a process identity: {dict(document)!r}")
        assert isinstance(pid, int) and isinstance(ticks, int)
        if pid <= 0:
            raise ValueError(f"not a process identity: {dict(document)!r}")
        return cls(pid, ticks, boot)

    def started_at(self) -> float | None:
        """The start as seconds since the epoch; None if taken in another boot (or unknown)."""
        if self.boot_id != boot_id():
            return None
        boot_time = _boot_time()
        if boot_time is None:
            return None
        return boot_time + self.start_ticks / os.sysconf("SC_CLK_TCK")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def boot_id() -> str:
    """This boot's id ("" where ``/proc`` does not offer it)."""
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as source:
            return source.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as source:
            for line in source:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@record(frozen=True)
class StatFields:
    """The fields of ``/proc/<pid>/stat`` the pilot needs."""

    state: str
    pgid: int
    start_ticks: int


def parse_stat(text: bytes) -> StatFields | None:
    """State, process group and start ticks from a ``/proc/<pid>/stat`` line; None if malformed."""
    end_of_name = text.rfind(b")")
    if end_of_name < 0:
        return None
    fields = text[end_of_name + 1 :].split()
    # fields[0] is field 3 (state): field N is fields[N - 3]
    if len(fields) < 20:
        return None
    try:
        return StatFields(fields[0].decode("ascii"), int(fields[2]), int(fields[19]))
    except (UnicodeDecodeError, ValueError):
        return None


def read_stat(pid: int) -> StatFields | None:
    """``/proc/<pid>/stat`` of a live or zombie process; None if there is no such process."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as source:
            text = source.read()
    except OSError:  # gone (ENOENT, ESRCH), or /proc unreadable
        return None
    return parse_stat(text)


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the process that has ``pid`` now; None if there is none.

    A zombie (ended, not yet reaped) still has its identity: it is the same process.
    """
    fields = read_stat(pid)
    if fields is None:
        return None
    return ProcessIdentity(pid, fields.start_ticks, boot_id())


def same_process(identity: ProcessIdentity) -> bool:
    """Whether ``identity``'s process still exists (a zombie counts) and has not been replaced."""
    return process_identity(identity.pid) == identity


def still_running(identity: ProcessIdentity) -> bool:
    """Whether ``identity``'s process exists and has not ended (not a zombie)."""
    fields = read_stat(identity.pid)
    return (
        fields is not None
        and fields.start_ticks == identity.start_ticks
        and boot_id() == identity.boot_id
        and fields.state not in ("Z", "X", "x")
    )
