"""The final sweep of a job without a cgroup: its process groups and its environment marker.

After a job, nothing it started may remain.  Without a cgroup
(``pilot.process.cgroup``) the pilot finds what is left by two properties only it could
have given a process, and signals nothing else:

* membership of one of the job's process groups (every process the job's launcher
  started leads a group of its own, pgid = pid), which also catches a child that scrubbed
  its environment.  A group id is recycled once the group is empty (with ``pid_max``
  32768 that can take seconds on a busy node), so a group counts only while it is
  provably still the job's: its leader has not been reaped (``anchored``), or one of its
  live members carries the marker (a process cannot join a group of another session,
  so a recycled group never holds one of the job's processes);
* the job's marker in the process's environment, ``TXPILOT_JOB_MARKER=<value>`` as an exact
  entry of ``/proc/<pid>/environ`` (``pilot.process.environment``), which catches what
  double-forked and called ``setsid`` to leave the groups.  That file is readable for the
  pilot's own uid, or for any process when the pilot runs as root.

Never the pilot itself or its own process group, never pid 1, never a zombie (it is
already dead), never by name or by user.

A candidate is opened as a pidfd and checked *again* through it before it is signalled,
so a pid recycled between the scan and the signal is never hit.  The pidfds also tell
when the processes are gone (readable on exit, ``pilot.process.waiting``): ``sweep``
sends SIGTERM, waits up to ``grace`` on the clock, scans again (a process may have forked
meanwhile) and sends SIGKILL, then repeats scan-and-KILL until a scan finds nothing
(at most ``KILL_ROUNDS`` times, each wait bounded by ``backstop``).

The ``/proc`` scan reads one small file per process (~10 µs; ~20-40 ms for 2,000
processes) and runs in the ``ThreadRunner``, as does the signalling.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection

from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.process.waiting import all_readable
from pilot.util.threads import ThreadRunner

#: Scan-and-SIGKILL rounds before the sweep gives up on what still lives.
KILL_ROUNDS = 5

#: Most pidfds waited on at once; the next round's scan finds the rest.
MAX_WATCHED = 512

log = Logger(observer=pilot_observer)


def _state_and_group(pid: int) -> tuple[str, int] | None:
    """The process's state letter and process group, from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()  # after "pid (comm) "
    if len(fields) < 3:
        return None
    return fields[0].decode("ascii", "replace"), int(fields[2])


def _carries(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = file.read()
    except OSError:
        return False
    return entry in environ.split(b"\0")


def _examine(pid: int, entry: bytes | None, own_group: int) -> tuple[int, bool] | None:
    """(process group, carries the marker) of a live process; None for a zombie or the pilot's group."""
    found = _state_and_group(pid)
    if found is None:
        return None
    state, group = found
    if state in ("Z", "X") or group == own_group:
        return None
    return group, entry is not None and _carries(pid, entry)


def belongs(pid: int, entry: bytes | None, owned: Collection[int], own_group: int) -> bool:
    """Whether the live process ``pid`` is the job's: in one of the ``owned`` groups, or marked."""
    found = _examine(pid, entry, own_group)
    return found is not None and (found[1] or found[0] in owned)


def find_and_signal(
    entry: bytes | None, groups: Collection[int], signum: int, anchored: Collection[int] = ()
) -> list[int]:
    """Blocking: ``signum`` to every live process of the job; returns their pidfds (open).

    ``groups``: the job's process groups; ``anchored``: those whose leader is not reaped
    yet.  The caller closes the pidfds (``close_all``) once it has waited on them.
    """
    me, own_group = os.getpid(), os.getpgrp()
    groups = frozenset(groups) - {own_group}
    seen: list[tuple[int, int, bool]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, 1):
            continue
        found = _examine(int(name), entry, own_group)
        if found is not None and (found[1] or found[0] in groups):
            seen.append((int(name), *found))
    owned = {g for g in groups if g in anchored} | {g for _, g, marked in seen if marked and g in groups}
    pidfds: list[int] = []
    for pid, group, marked in seen:
        if not marked and group not in owned:
            continue  # a group of that id, but not provably the job's (a recycled id)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            # the pidfd pins the process: if the pid was recycled since the scan, this
            # checks the new process, which is signalled only if it is the job's too
            if belongs(pid, entry, owned, own_group):
                signal.pidfd_send_signal(pidfd, signum)
                pidfds.append(pidfd)
                continue
        except OSError:
            pass
        os.close(pidfd)
    return pidfds


def close_all(pidfds: list[int]) -> None:
    for pidfd in pidfds:
        os.close(pidfd)


async def sweep(
    entry: bytes | None,
    groups: Collection[int],
    *,
    in_thread: ThreadRunner,
    clock: IReactorTime,
    fdset: IReactorFDSet | None,
    grace: float,
    backstop: float,
    anchored: Collection[int] = (),
    label: str = "",
) -> int:
    """TERM the job's leftovers, KILL them after ``grace``; returns how many there were.

    ``entry``: the marker as it appears in an environment (``NAME=value``, bytes).
    Fires once a scan finds none left, or after ``KILL_ROUNDS`` rounds (logged).
    """
    if entry is None and not groups:
        return 0
    pidfds = await in_thread(find_and_signal, entry, groups, signal.SIGTERM, anchored)
    if not pidfds:
        return 0
    found = len(pidfds)
    try:
        await all_readable(fdset, clock, pidfds[:MAX_WATCHED], grace)
    finally:
        close_all(pidfds)
    for _ in range(KILL_ROUNDS):
        pidfds = await in_thread(find_and_signal, entry, groups, signal.SIGKILL, anchored)
        if not pidfds:
            return found
        try:
            await all_readable(fdset, clock, pidfds[:MAX_WATCHED], backstop)
        finally:
            close_all(pidfds)
    left = await in_thread(_count, entry, groups, anchored)
    if left:
        log.error(
            "{label}{count} processes still alive after {rounds} rounds of SIGKILL",
            label=f"{label}: " if label else "", count=left, rounds=KILL_ROUNDS, event="sweep.unkillable",
        )  # fmt: skip
    return found


def _count(entry: bytes | None, groups: Collection[int], anchored: Collection[int]) -> int:
    """Blocking: how many of the job's processes live (signal 0: nothing is sent)."""
    pidfds = find_and_signal(entry, groups, 0, anchored)
    close_all(pidfds)
    return len(pidfds)
