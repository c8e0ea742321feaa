"""What a dead pilot's journal says about each of its jobs, and what its successor must do.

``journaled_jobs`` folds a journal's entries (``pilot.job.journal``) into one
``JournaledJob`` per PanDA ID; ``decide`` says what is left to do, guided by three
rules: a payload never runs twice, a file is never stored twice without checking
(the staging engine checks what the transfer entries say is already there), and a
final update the server acknowledged is never sent again.

=========================================  ==========================================
what the journal shows                     what the successor does
=========================================  ==========================================
``final.acked``                            nothing
``final.sent``, not acknowledged           sends the recorded final update again
``payload.ended``                          stages out, sends the final update
``payload.started``, process still there   adopts it (same pid, start time, boot):
  (same identity)                          heartbeats, waits, then as above
``payload.started``, process gone,         takes the recorded status, then as above
  status file written
``copytool.started``, not ended             stops it first (its process group, if it is
                                           still that process), whatever else follows
``payload.starting``/``started``, no       reports the job failed (PREEMPTION): the
  process, no status (a reboot)            payload's end is unknown, it is not rerun
before the payload                         reports the job failed (PREEMPTION): the
                                           server gives it to another pilot afresh
=========================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import field
from enum import Enum
from pathlib import Path
from typing import Any

from pilot.util.records import record


class Resumption(Enum):
    """What a successor does for one job of a dead pilot."""

    NOTHING = "nothing"
    RESEND_FINAL = "resend-final"
    FINISH = "finish"  # the payload's end is known: stage out, final update
    ADOPT = "adopt"  # the payload still runs: watch it, then finish
    LOST = "lost"  # report failed: the payload's end cannot be known, or it never started


@record
class JournaledJob:
    """One job as a journal shows it (the last entry of each kind wins)."""

    panda_id: int
    attempt_nr: int | None = None
    definition: Path | None = None
    workdir: Path | None = None
    #: The environment marker of the job's processes (``job.scope``).
    marker: str | None = None
    phases: list[str] = field(default_factory=list)
    payload_starting: dict[str, Any] | None = None
    payload_started: dict[str, Any] | None = None
    payload_ended: dict[str, Any] | None = None
    final_sent: dict[str, Any] | None = None
    final_acked: bool = False
    #: Copytool processes started and not known to have ended, by pid (``copytool.started``).
    copytools: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def status_file(self) -> Path | None:
        for entry in (self.payload_started, self.payload_starting):
            if entry is not None and isinstance(entry.get("status_file"), str):
                return Path(entry["status_file"])
        return None


def journaled_jobs(entries: Iterable[Mapping[str, Any]]) -> list[JournaledJob]:
    """The jobs of a journal, in the order they were acquired."""
    jobs: dict[int, JournaledJob] = {}
    for entry in entries:
        panda_id = entry.get("panda_id")
        if not isinstance(panda_id, int) or isinstance(panda_id, bool):
            continue
        kind = entry["kind"]
        job = jobs.get(panda_id)
        if job is None:
            if kind != "job.acquired":
                continue  # a job is known from its acquisition on
            job = jobs[panda_id] = JournaledJob(panda_id)
        if kind == "job.acquired":
            job.attempt_nr = _int(entry.get("attempt_nr"))
            job.definition = _path(entry.get("definition"))
            job.workdir = _path(entry.get("workdir")) or job.workdir
        elif kind == "job.workdir":
            job.workdir = _path(entry.get("workdir"))
        elif kind == "job.scope" and isinstance(entry.get("marker"), str):
            job.marker = entry["marker"]
        elif kind == "job.phase" and isinstance(entry.get("phase"), str):
            job.phases.append(entry["phase"])
        elif kind == "payload.starting":
            job.payload_starting = dict(entry)
        elif kind == "payload.started":
            job.payload_started = dict(entry)
        elif kind == "payload.ended":
            job.payload_ended = dict(entry)
        elif kind == "final.sent":
            job.final_sent = dict(entry)
        elif kind == "final.acked":
            job.final_acked = True
        elif kind == "copytool.started" and isinstance(entry.get("pid"), int):
            job.copytools[entry["pid"]] = dict(entry)
        elif kind == "copytool.ended":
            job.copytools.pop(entry.get("pid"), None)  # type: ignore[arg-type]
    return list(jobs.values())


def decide(job: JournaledJob, *, payload_alive: bool, status_recorded: bool) -> Resumption:
    """What to do for ``job``; the caller has looked at the payload's process and status file."""
    if job.final_acked:
        return Resumption.NOTHING
    if job.final_sent is not None:
        return Resumption.RESEND_FINAL
    if job.payload_ended is not None:
        return Resumption.FINISH
    if job.payload_started is not None and payload_alive:
        return Resumption.ADOPT
    if (job.payload_started is not None or job.payload_starting is not None) and status_recorded:
        return Resumption.FINISH
    return Resumption.LOST


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None
