"""Event-service ranges: JEDI's event table as the real server uses it, in SQLite.

The real server keeps ranges in ``JEDI_Events`` (made by JEDI when it splits a task) and
takes their LFN/GUID/scope from ``JEDI_Dataset_Contents``; ``task_event_module`` hands
them out and records their statuses.  Here an event-service job's submission creates
them (the dev-only ``esRanges`` field, ``jobdef.EventRangeSpec``) over the job's first
input file, and the functions below do what ``getEventRanges``, ``updateEventRanges``,
``checkEventsAvailability`` and ``get_events_status`` do (panda-server 0.8.1 and 1.0.4
share that code): ranges go out only while the job is ``sent``/``starting``/``running``
and not being killed (an ``activated`` job gets ``[]``), in (file, event) order, and a
range's id carries the consumer's PandaID: ``<jediTaskID>-<PandaID>-<fileID>-<processID>-
<attemptNr>``.  Status reports are ``pilot.devserver.eventreports``'s business.

Tables: ``event_files`` (the input files, as ``JEDI_Dataset_Contents``), ``event_ranges``
(``JEDI_Events``: the pool key ``jobsetID``, the consumer ``PandaID`` once handed out,
the status as a word), ``event_archives`` (version-1 archives, as the server's
``zipoutput`` file rows) and ``event_updates`` (every reported item and its fate).
Everything here runs in the store's database thread: no reactor, no logging.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from pilot.devserver.eventreports import active_job, update_ranges
from pilot.devserver.jobdef import JobDefinition, JobDefinitionError, split_list
from pilot.devserver.store import JobStore

EVENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_files (
    fileID INTEGER PRIMARY KEY AUTOINCREMENT,
    jediTaskID INTEGER NOT NULL,
    jobsetID INTEGER NOT NULL,
    creatorID INTEGER NOT NULL,
    lfn TEXT NOT NULL,
    guid TEXT NOT NULL,
    scope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_ranges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    jediTaskID INTEGER NOT NULL,
    jobsetID INTEGER NOT NULL,
    fileID INTEGER NOT NULL,
    processID INTEGER NOT NULL,
    attemptNr INTEGER NOT NULL,
    PandaID INTEGER,
    status TEXT NOT NULL,
    startEvent INTEGER NOT NULL,
    lastEvent INTEGER NOT NULL,
    objstoreID TEXT,
    errorCode TEXT,
    errorDiag TEXT,
    pathConvention TEXT,
    archiveID INTEGER,
    UNIQUE (jediTaskID, fileID, processID, attemptNr)
);
CREATE INDEX IF NOT EXISTS event_ranges_pool ON event_ranges (jediTaskID, jobsetID, status, fileID, processID);
CREATE INDEX IF NOT EXISTS event_ranges_job ON event_ranges (PandaID);
CREATE TABLE IF NOT EXISTS event_archives (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    PandaID INTEGER NOT NULL,
    jediTaskID INTEGER NOT NULL,
    lfn TEXT NOT NULL,
    fsize INTEGER NOT NULL,
    adler32 TEXT,
    numEvents TEXT,
    objstoreID TEXT,
    pathConvention TEXT,
    time REAL NOT NULL,
    UNIQUE (PandaID, lfn)
);
CREATE TABLE IF NOT EXISTS event_updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    eventRangeID TEXT NOT NULL,
    PandaID INTEGER,
    status TEXT,
    version INTEGER NOT NULL,
    api TEXT NOT NULL,
    method TEXT NOT NULL,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS event_updates_range ON event_updates (eventRangeID, id);
CREATE INDEX IF NOT EXISTS event_updates_job ON event_updates (PandaID, id);
"""

#: Job states in which ranges are handed out (``getEventRanges``).
DISPATCH_STATES = ("sent", "running", "starting")


def check_event_service_job(definition: JobDefinition) -> None:
    """At submission: an event-service job needs what JEDI would have given it.

    That is a jediTaskID and a jobsetID (the ranges' pool), an input file with a scope
    (the ranges' LFN/GUID/scope) and ``esRanges`` (the ranges).  Raises JobDefinitionError.
    """
    wire = definition.wire
    if "eventService" not in wire:
        return
    if definition.jedi_task_id is None:
        raise JobDefinitionError("an eventService job needs a jediTaskID (taskID)")
    if not isinstance(wire.get("jobsetID"), int):
        raise JobDefinitionError("an eventService job needs a jobsetID")
    lfns = split_list(wire.get("inFiles"))
    if not lfns:
        raise JobDefinitionError("an eventService job needs an input file (its ranges' LFN)")
    if split_list(wire.get("scopeIn"))[0] == "NULL":
        raise JobDefinitionError("an eventService job's first input file needs a scope (scopeIn)")
    if definition.es_ranges is None:
        raise JobDefinitionError("an eventService job needs esRanges (its event ranges)")


def insert_event_ranges(cursor: sqlite3.Cursor, panda_id: int, definition: JobDefinition) -> None:
    """The ranges of a newly inserted event-service job (``JobStore.insert_jobs``'s ``on_insert``)."""
    spec = definition.es_ranges
    if spec is None:
        return
    wire = definition.wire
    task_id, jobset_id = definition.jedi_task_id, wire["jobsetID"]
    lfn, guid, scope = (split_list(wire[key])[0] for key in ("inFiles", "GUID", "scopeIn"))
    cursor.execute(
        "INSERT INTO event_files (jediTaskID, jobsetID, creatorID, lfn, guid, scope) VALUES (?, ?, ?, ?, ?, ?)",
        (task_id, jobset_id, panda_id, lfn, guid, scope),
    )
    file_id = cursor.lastrowid
    rows = []
    for index in range(spec.count):
        start = spec.first_event + index * spec.events_per_range
        last = start + spec.events_per_range - 1
        rows.append((task_id, jobset_id, file_id, start, spec.attempt_nr, start, last))
    cursor.executemany(
        """INSERT INTO event_ranges (jediTaskID, jobsetID, fileID, processID, attemptNr, status,
            startEvent, lastEvent) VALUES (?, ?, ?, ?, ?, 'ready', ?, ?)""",
        rows,
    )


def range_id(task_id: object, panda_id: object, file_id: object, process_id: object, attempt: object) -> str:
    """``makeEventRangeID``."""
    return f"{task_id}-{panda_id}-{file_id}-{process_id}-{attempt}"


def _int_or(value: object, default: Any) -> Any:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


# -- getEventRanges ----------------------------------------------------------------------------------


def acquire_ranges(
    cursor: sqlite3.Cursor,
    panda_id: object,
    jobset_id: object,
    task_id: object,
    n_ranges: object,
    segment_id: object,
) -> list[dict[str, object]]:
    """Hand out up to ``n_ranges`` ready ranges of the job's jobset (``getEventRanges``).

    Values arrive as the API gave them (strings from the legacy API) and are converted
    as there: a bad count means 8, a bad task id means "the job's".  The development
    server has no datasets, so a ``segment_id`` selects nothing.
    """
    count = max(0, _int_or(n_ranges, 8))
    consumer = _int_or(panda_id, panda_id)
    job = active_job(cursor, consumer)
    if job is None or job["jobStatus"] not in DISPATCH_STATES or job["commandToPilot"] == "tobekilled":
        return []
    task = _int_or(task_id, None)
    if task is None:
        task = job["jediTaskID"]
    if task is None or segment_id is not None or count == 0:
        return []
    cursor.execute(
        """SELECT r.id, r.jediTaskID, r.fileID, r.processID, r.attemptNr, r.startEvent, r.lastEvent,
            f.lfn, f.guid, f.scope
        FROM event_ranges r JOIN event_files f ON f.fileID = r.fileID
        WHERE r.jediTaskID = ? AND r.jobsetID = ? AND r.status = 'ready' AND r.attemptNr > 0
            AND r.PandaID IS NULL
        ORDER BY r.fileID, r.processID LIMIT ?""",
        (task, _int_or(jobset_id, jobset_id), count),
    )
    rows = cursor.fetchall()
    cursor.executemany(
        "UPDATE event_ranges SET PandaID = ?, status = 'sent' WHERE id = ?",
        [(job["PandaID"], row["id"]) for row in rows],
    )
    return [
        {
            "eventRangeID": range_id(
                row["jediTaskID"], job["PandaID"], row["fileID"], row["processID"], row["attemptNr"]
            ),
            "startEvent": row["startEvent"],
            "lastEvent": row["lastEvent"],
            "LFN": row["lfn"],
            "GUID": row["guid"],
            "scope": row["scope"],
        }
        for row in rows
    ]


def available_ranges(cursor: sqlite3.Cursor, jobset_id: object, task_id: object) -> int:
    """``checkEventsAvailability``: ready ranges left in the jobset's pool."""
    cursor.execute(
        """SELECT COUNT(*) FROM event_ranges WHERE jediTaskID = ? AND jobsetID = ? AND status = 'ready'
            AND attemptNr > 0 AND PandaID IS NULL""",
        (_int_or(task_id, task_id), _int_or(jobset_id, jobset_id)),
    )
    return int(cursor.fetchone()[0])


def range_statuses(cursor: sqlite3.Cursor, text: str) -> dict[object, dict[str, dict[str, object]]]:
    """``get_events_status``: ``[{"task_id", "panda_id"}, ...]`` as JSON -> statuses per job.

    A fatal range shows as the real table holds it: ``failed``, its attempt number set
    to 1 (so its id changes).  Bad input raises (the caller answers "database error").
    """
    result: dict[object, dict[str, dict[str, object]]] = {}
    for pair in json.loads(text):
        task_id, panda_id = pair["task_id"], pair["panda_id"]
        cursor.execute(
            """SELECT jediTaskID, fileID, processID, attemptNr, status, errorCode, errorDiag
            FROM event_ranges WHERE jediTaskID = ? AND PandaID = ? ORDER BY fileID, processID""",
            (task_id, panda_id),
        )
        ranges: dict[str, dict[str, object]] = {}
        for row in cursor.fetchall():
            fatal = row["status"] == "fatal"
            attempt = 1 if fatal else row["attemptNr"]
            key = range_id(row["jediTaskID"], panda_id, row["fileID"], row["processID"], attempt)
            ranges[key] = {
                "status": "failed" if fatal else row["status"],
                "error": _int_or(row["errorCode"], row["errorCode"]),
                "dialog": row["errorDiag"],
            }
        result[panda_id] = ranges
    return result


# -- the development view ----------------------------------------------------------------------------


def job_events(cursor: sqlite3.Cursor, panda_id: int) -> dict[str, object] | None:
    """A job's ranges (made by its submission, or handed out to it), archives and report log."""
    cursor.execute("SELECT jediTaskID, definition FROM jobs WHERE PandaID = ?", (panda_id,))
    job = cursor.fetchone()
    if job is None:
        return None
    cursor.execute(
        """SELECT eventRangeID, status, COUNT(*) FROM event_updates WHERE PandaID = ?
        GROUP BY eventRangeID, status""",
        (panda_id,),
    )
    reported: dict[str, dict[str, int]] = {}
    for key, status, count in cursor.fetchall():
        reported.setdefault(key, {})[str(status)] = int(count)
    cursor.execute(
        """SELECT r.*, f.lfn, f.guid, f.scope, a.lfn AS archive FROM event_ranges r
            JOIN event_files f ON f.fileID = r.fileID
            LEFT JOIN event_archives a ON a.id = r.archiveID
        WHERE f.creatorID = ? OR r.PandaID = ? ORDER BY r.fileID, r.processID""",
        (panda_id, panda_id),
    )
    ranges: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    for row in cursor.fetchall():
        key = None
        if row["PandaID"] is not None:
            key = range_id(
                row["jediTaskID"], row["PandaID"], row["fileID"], row["processID"], row["attemptNr"]
            )
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        ranges.append(
            {
                "eventRangeID": key,
                "status": row["status"],
                "PandaID": row["PandaID"],
                "jobsetID": row["jobsetID"],
                "startEvent": row["startEvent"],
                "lastEvent": row["lastEvent"],
                "LFN": row["lfn"],
                "GUID": row["guid"],
                "scope": row["scope"],
                "errorCode": row["errorCode"],
                "errorDiag": row["errorDiag"],
                "objstoreID": row["objstoreID"],
                "pathConvention": row["pathConvention"],
                "archive": row["archive"],
                "reported": reported.get(key, {}) if key else {},
            }
        )
    cursor.execute("SELECT * FROM event_archives WHERE PandaID = ? ORDER BY id", (panda_id,))
    archives = [
        {key: row[key] for key in row.keys() if key not in ("id", "PandaID")} for row in cursor.fetchall()
    ]
    for archive in archives:
        cursor.execute(
            """SELECT r.jediTaskID, r.PandaID, r.fileID, r.processID, r.attemptNr FROM event_ranges r
            JOIN event_archives a ON a.id = r.archiveID WHERE a.PandaID = ? AND a.lfn = ?
            ORDER BY r.fileID, r.processID""",
            (panda_id, archive["lfn"]),
        )
        archive["eventRangeIDs"] = [range_id(*row) for row in cursor.fetchall()]
    cursor.execute(
        """SELECT eventRangeID, status, version, api, method, time, outcome FROM event_updates
        WHERE PandaID = ? ORDER BY id""",
        (panda_id,),
    )
    updates = [dict(zip(row.keys(), tuple(row), strict=True)) for row in cursor.fetchall()]
    definition = json.loads(job["definition"])
    return {
        "PandaID": panda_id,
        "jediTaskID": job["jediTaskID"],
        "jobsetID": definition.get("jobsetID"),
        "counts": counts,
        "ranges": ranges,
        "archives": archives,
        "updates": updates,
    }


def _create_schema(cursor: sqlite3.Cursor) -> None:
    for statement in EVENT_SCHEMA.split(";"):
        if statement.strip():
            cursor.execute(statement)


class EventStore:
    """The event tables, through the job store's database thread."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def start(self) -> None:
        await self._store.run(_create_schema)

    async def acquire(
        self, panda_id: object, jobset_id: object, task_id: object, n_ranges: object, segment_id: object
    ) -> list[dict[str, object]]:
        return await self._store.run(acquire_ranges, panda_id, jobset_id, task_id, n_ranges, segment_id)

    async def update(
        self, ranges: object, version: int, api: str, method: str, now: float
    ) -> tuple[list[bool | None], dict[int, str | None]]:
        return await self._store.run(update_ranges, ranges, version, api, method, now)

    async def available(self, jobset_id: object, task_id: object) -> int:
        return await self._store.run(available_ranges, jobset_id, task_id)

    async def statuses(self, text: str) -> dict[object, dict[str, dict[str, object]]]:
        return await self._store.run(range_statuses, text)

    async def job_events(self, panda_id: int) -> dict[str, object] | None:
        return await self._store.run(job_events, panda_id)
