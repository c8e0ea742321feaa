"""``updateEventRanges`` in the development server: what a range-status report changes.

The real server (``task_event_module.updateEventRanges``, the same in panda-server 0.8.1
and 1.0.4) walks the report item by item and answers one ``Returns`` entry per item and
a command per job; this module does the same on the tables of ``pilot.devserver.events``:

* only final statuses (``finished``/``failed``/``fatal``) are recorded; a ``running``
  report gets ``None``; a range id that does not parse, an unknown status, or a job not
  (any more) active gets ``False`` (an unknown job also ``tobekilled``);
* a final status changes only a range handed out to that job and not yet final; the
  real server still answers ``True`` for a range it did not change (it never counts the
  updated rows), so this one answers the same and says in its log what happened;
* a version-1 chunk's archive is inserted once per (PandaID, lfn), before the ranges;
  a ``zipFile`` without ``lfn`` or ``objstoreID`` fails the whole report (rolled back,
  ``False`` appended), as it does there;
* after a report that finished ranges, setting the job's ``nEvents`` fails on the
  PostgreSQL servers we checked (``KeyError ':PandaID is missing'``): the statuses stay,
  ``nEvents`` is not set and ``Returns`` gets one more ``False``.

Every item received goes to the ``event_updates`` log with what became of it, so a
test can assert that each range was reported finished exactly once.  Runs in the
store's database thread: no reactor, no logging.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from pilot.devserver.updates import ACTIVE_STATES

#: Job states in which range statuses are recorded (version 2 adds ``activated``).
REPORT_STATES = ("sent", "running", "starting", "transferring")
#: Reported status -> stored status; ``transferring`` counts as ``running`` there too.
STORED_STATUS = {
    "running": "running",
    "transferring": "running",
    "finished": "finished",
    "failed": "failed",
    "fatal": "fatal",
}
FINAL_REPORTS = ("finished", "failed", "fatal")
#: The most items one report may hold; the rest get ``None`` (``updateEventRanges``'s maxEvents).
MAX_ITEMS = 100_000

#: Applied: what the event_updates log says about an item.
APPLIED = "applied"
UNCHANGED = "unchanged: not handed out to this job, or already final"


def active_job(cursor: sqlite3.Cursor, panda_id: object) -> sqlite3.Row | None:
    """The job's row if the server still holds it as active (its ``jobsActive4``)."""
    marks = ", ".join("?" * len(ACTIVE_STATES))
    cursor.execute(
        f"SELECT PandaID, jobStatus, commandToPilot, jediTaskID FROM jobs WHERE PandaID = ? AND jobStatus IN ({marks})",
        (panda_id, *ACTIVE_STATES),
    )
    row: sqlite3.Row | None = cursor.fetchone()
    return row


def _flatten(ranges: object, version: int) -> list[object]:
    """Version 0: the list itself; otherwise each chunk's items, each carrying its ``zipFile``."""
    if not isinstance(ranges, list):
        raise TypeError(f"expected a list of event ranges, got {type(ranges).__name__}")
    if version == 0:
        return list(ranges)
    items: list[object] = []
    for chunk in ranges:
        if not isinstance(chunk, dict):
            raise TypeError(f"expected a chunk object, got {type(chunk).__name__}")
        if "eventRanges" not in chunk:
            items.append(chunk)
            continue
        for item in chunk["eventRanges"]:
            item["zipFile"] = chunk.get("zipFile")
            items.append(item)
    return items


def _archive(
    cursor: sqlite3.Cursor, panda_id: int, task_id: int, zip_file: Mapping[str, Any], now: float
) -> int:
    """The archive's row (inserted the first time this job reports it); bad fields raise."""
    lfn = zip_file["lfn"]
    cursor.execute("SELECT id FROM event_archives WHERE PandaID = ? AND lfn = ?", (panda_id, lfn))
    row = cursor.fetchone()
    if row is not None:
        return int(row[0])
    fsize = int(zip_file["fsize"]) if "fsize" in zip_file else 0
    objstore = zip_file["objstoreID"]  # required there (KeyError), unlike the other fields
    cursor.execute(
        """INSERT INTO event_archives (PandaID, jediTaskID, lfn, fsize, adler32, numEvents, objstoreID,
            pathConvention, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            panda_id,
            task_id,
            str(lfn),
            fsize,
            _text_or_none(zip_file.get("adler32")),
            _text_or_none(zip_file.get("numEvents")),
            _text_or_none(objstore),
            _text_or_none(zip_file.get("pathConvention")),
            now,
        ),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class _Report:
    """One ``updateEventRanges`` call being decided: Returns, Commands and the log rows."""

    def __init__(self, version: int, api: str, method: str, now: float) -> None:
        self.version, self.api, self.method, self.now = version, api, method, now
        self.returns: list[bool | None] = []
        self.commands: dict[int, str | None] = {}
        self.log: list[list[object]] = []

    def note(self, item: object, returned: bool | None, outcome: str, panda_id: int | None = None) -> int:
        """The item's ``Returns`` entry and its log row (whose index is returned)."""
        self.returns.append(returned)
        return self.record(item, outcome, panda_id)

    def record(self, item: object, outcome: str, panda_id: int | None = None) -> int:
        """A log row only (an item of a report that was rolled back before its turn)."""
        fields = item if isinstance(item, Mapping) else {}
        text = (
            json.dumps(item, default=str) if isinstance(item, dict | list | str | int | float) else repr(item)
        )
        status = fields.get("eventStatus")
        self.log.append(
            [
                str(fields.get("eventRangeID", "")),
                panda_id,
                None if status is None else str(status),
                self.version,
                self.api,
                self.method,
                self.now,
                outcome,
                text,
            ]
        )
        return len(self.log) - 1


def update_ranges(
    cursor: sqlite3.Cursor, ranges: object, version: int, api: str, method: str, now: float
) -> tuple[list[bool | None], dict[int, str | None]]:
    """``updateEventRanges`` for decoded ``ranges``: (Returns, {PandaID: command})."""
    report = _Report(version, api, method, now)
    items: list[object] = []
    cursor.execute("SAVEPOINT event_report")
    try:
        items = _flatten(ranges, version)
        finished = _decide(cursor, report, items)
    except (KeyError, TypeError, ValueError, AttributeError, sqlite3.Error) as exc:
        cursor.execute("ROLLBACK TO SAVEPOINT event_report")
        cursor.execute("RELEASE SAVEPOINT event_report")
        for item in items[len(report.log) :] or ([] if items else [ranges]):
            report.record(item, "", _panda_of(item))
        for row in report.log:
            row[7] = f"rolled back: {type(exc).__name__}: {exc}"
        report.returns.append(False)
    else:
        cursor.execute("RELEASE SAVEPOINT event_report")
        if finished:
            report.returns.append(False)  # the nEvents update that fails after the commit
    cursor.executemany(
        """INSERT INTO event_updates (eventRangeID, PandaID, status, version, api, method, time, outcome, item)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        report.log,
    )
    return report.returns, report.commands


def _panda_of(item: object) -> int | None:
    """The PandaID in an item's range id, if it has one."""
    parts = str(item.get("eventRangeID", "")).split("-") if isinstance(item, Mapping) else []
    return int(parts[1]) if len(parts) == 5 and parts[1].isdigit() else None


def _decide(cursor: sqlite3.Cursor, report: _Report, items: list[object]) -> bool:
    """Record each item's fate; apply the final statuses.  True if a range was reported finished."""
    ok_states = REPORT_STATES + (("activated",) if report.version == 2 else ())
    range_states = ("sent", "running") + (("ready",) if report.version == 2 else ())
    jobs: dict[int, sqlite3.Row | None] = {}
    pending: list[tuple[int, tuple[object, ...]]] = []
    finished = False
    for index, item in enumerate(items):
        if index >= MAX_ITEMS:
            report.note(item, None, "skipped: too many items in one report")
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"an event range must be an object, not {type(item).__name__}")
        if "eventRangeID" not in item:
            report.note(item, False, "refused: eventRangeID is missing")
            continue
        try:
            task_id, panda_id, file_id, process_id, attempt = (
                int(part) for part in str(item["eventRangeID"]).split("-")
            )
        except ValueError:
            report.note(item, False, "refused: wrongly formatted eventRangeID")
            continue
        if "eventStatus" not in item:
            report.note(item, False, "refused: eventStatus is missing", panda_id)
            continue
        status = item["eventStatus"]
        if not isinstance(status, str) or status not in STORED_STATUS:
            report.note(item, False, f"refused: unknown status {status!r:.40}", panda_id)
            continue
        if status not in FINAL_REPORTS:
            report.note(item, None, "skipped: not a final status", panda_id)
            continue
        if panda_id not in jobs:
            jobs[panda_id] = active_job(cursor, panda_id)
        job = jobs[panda_id]
        if job is None:
            report.note(item, False, "refused: unknown PandaID", panda_id)
            command: str | None = "tobekilled"
        elif job["jobStatus"] not in ok_states:
            report.note(item, False, f"refused: job is {job['jobStatus']}", panda_id)
            command = job["commandToPilot"]
        else:
            archive = None
            if item.get("zipFile") is not None:  # inserted whatever the version; linked from version 1
                archive = _archive(cursor, panda_id, task_id, item["zipFile"], report.now)
            row = report.note(item, True, APPLIED, panda_id)
            values = (
                STORED_STATUS[status],
                _text_or_none(item.get("objstoreID")),
                _text_or_none(item.get("errorCode")),
                _text_or_none(item.get("pathConvention")),
                _text_or_none(item.get("errorDiag")),
                *((archive,) if report.version != 0 else ()),
                task_id,
                panda_id,
                file_id,
                process_id,
                attempt,
                *range_states,
            )
            pending.append((row, values))
            finished = finished or status == "finished"
            command = job["commandToPilot"]
        report.commands.setdefault(panda_id, command)
    marks = ", ".join("?" * len(range_states))
    link = ", archiveID = ?" if report.version != 0 else ""
    for row, values in pending:
        cursor.execute(
            f"""UPDATE event_ranges SET status = ?, objstoreID = ?, errorCode = ?, pathConvention = ?,
                errorDiag = ?{link}
            WHERE jediTaskID = ? AND PandaID = ? AND fileID = ? AND processID = ? AND attemptNr = ?
                AND status IN ({marks})""",
            values,
        )
        if cursor.rowcount == 0:
            report.log[row][7] = UNCHANGED
    return finished
