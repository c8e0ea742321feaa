"""Job state in SQLite, so that restarting the development server loses nothing.

All SQL runs in ``adbapi``'s single worker thread (one connection, ``cp_max=1``),
which keeps SQLite I/O off the reactor thread and serialises transactions: a
dispatch (select + mark ``sent``) or an update (read + decide + write + record)
is atomic without further locking.  The decisions themselves belong to
``pilot.devserver.dispatcher``; they are passed in as pure functions and run
inside the transaction.  Nothing in those functions may touch the reactor.

Tables: ``jobs`` (one row per job: the columns the dispatcher selects on, the
definition as JSON, the state and what the pilot reported), ``updates`` (every
update received, with all its parameters), ``submissions`` (job files already
submitted, by content digest), ``worker_nodes``/``worker_node_gpus``.  The event
service's tables and SQL live in ``pilot.devserver.events``, which runs in the same
thread through ``run``; a job's ranges are made in its insert transaction (``on_insert``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore

from pilot.devserver.jobdef import JobDefinition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    PandaID INTEGER PRIMARY KEY AUTOINCREMENT,
    submitOrder INTEGER NOT NULL,
    computingSite TEXT NOT NULL,
    prodSourceLabel TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    processingType TEXT NOT NULL,
    minRamCount INTEGER NOT NULL,
    maxDiskCount INTEGER NOT NULL,
    maxWalltime INTEGER,
    coreCount INTEGER NOT NULL,
    currentPriority INTEGER NOT NULL,
    jobExecutionID INTEGER NOT NULL,
    jediTaskID INTEGER,
    prodUserID TEXT NOT NULL,
    prodUserName TEXT NOT NULL,
    jobStatus TEXT NOT NULL,
    attemptNr INTEGER NOT NULL,
    definition TEXT NOT NULL,
    commandToPilot TEXT,
    debug INTEGER NOT NULL DEFAULT 0,
    jobOutputReport TEXT,
    transExitCode INTEGER,
    pilotErrorCode INTEGER,
    pilotErrorDiag TEXT,
    exeErrorCode INTEGER,
    exeErrorDiag TEXT,
    ddmErrorCode INTEGER,
    ddmErrorDiag TEXT,
    adderDiag TEXT,
    jobDispatcherErrorDiag TEXT,
    batchID TEXT,
    modificationHost TEXT,
    computingElement TEXT,
    schedulerID TEXT,
    metaData TEXT,
    pilotFields TEXT NOT NULL DEFAULT '{}',
    creationTime REAL NOT NULL,
    modificationTime REAL NOT NULL,
    stateChangeTime REAL NOT NULL,
    startTime REAL,
    endTime REAL
);
CREATE INDEX IF NOT EXISTS jobs_dispatch ON jobs (jobStatus, computingSite, submitOrder);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    PandaID INTEGER NOT NULL,
    state TEXT NOT NULL,
    time REAL NOT NULL,
    api TEXT NOT NULL,
    params TEXT NOT NULL,
    command TEXT
);
CREATE INDEX IF NOT EXISTS updates_job ON updates (PandaID, id);
CREATE TABLE IF NOT EXISTS submissions (
    digest TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    time REAL NOT NULL,
    pandaIDs TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS worker_nodes (
    site TEXT NOT NULL,
    host_name TEXT NOT NULL,
    cpu_model TEXT NOT NULL,
    params TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (site, host_name, cpu_model)
);
CREATE TABLE IF NOT EXISTS worker_node_gpus (
    site TEXT NOT NULL,
    host_name TEXT NOT NULL,
    vendor TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (site, host_name, vendor, model)
);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs`` (column names as in PanDA's ``jobsActive4`` where there is one)."""

    PandaID: int
    submitOrder: int
    computingSite: str
    prodSourceLabel: str
    resource_type: str
    processingType: str
    minRamCount: int
    maxDiskCount: int
    maxWalltime: int | None
    coreCount: int
    currentPriority: int
    jobExecutionID: int
    jediTaskID: int | None
    prodUserID: str
    prodUserName: str
    jobStatus: str
    attemptNr: int
    definition: dict[str, object]
    commandToPilot: str | None
    debug: bool
    jobOutputReport: str | None
    transExitCode: int | None
    pilotErrorCode: int | None
    pilotErrorDiag: str | None
    exeErrorCode: int | None
    exeErrorDiag: str | None
    ddmErrorCode: int | None
    ddmErrorDiag: str | None
    adderDiag: str | None
    jobDispatcherErrorDiag: str | None
    batchID: str | None
    modificationHost: str | None
    computingElement: str | None
    schedulerID: str | None
    metaData: str | None
    pilotFields: dict[str, object]
    creationTime: float
    modificationTime: float
    stateChangeTime: float
    startTime: float | None
    endTime: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        values: dict[str, Any] = dict(zip(row.keys(), tuple(row), strict=True))
        values["definition"] = json.loads(values["definition"])
        values["pilotFields"] = json.loads(values["pilotFields"])
        values["debug"] = bool(values["debug"])
        return cls(**values)


_COLUMNS = tuple(f.name for f in fields(JobRecord))
#: Columns a decision may change (identity and selection columns are fixed at submission).
_MUTABLE = frozenset(_COLUMNS) - {"PandaID", "submitOrder", "creationTime"}
_JSON_COLUMNS = frozenset({"definition", "pilotFields"})


@dataclass(frozen=True)
class UpdateRecord:
    """One update a pilot sent (``params`` exactly as decoded from the request)."""

    PandaID: int
    state: str
    time: float
    api: str
    params: dict[str, object]
    command: str | None = None


@dataclass(frozen=True)
class JobSelector:
    """What a pilot asks for; the dispatcher turns request parameters into this.

    ``labels`` None means any label; with ``processing_type`` set a job matches on
    that processing type *or* (when ``labels`` is given) on its label.
    """

    site: str
    labels: tuple[str, ...] | None = None
    processing_type: str | None = None
    resource_type: str | None = None
    memory: int = 0
    disk_space: int = 0
    remaining_time: int = 0
    background: bool = False
    prod_user_name: str | None = None
    task_id: object = None
    count_sent: bool = False
    node: str | None = None
    computing_element: str | None = None
    scheduler_id: str | None = None


class Decision(Protocol):
    """What a decision function returns for ``apply_update``."""

    @property
    def changes(self) -> Mapping[str, object]: ...

    @property
    def command(self) -> str | None: ...


D = TypeVar("D", bound=Decision)
T = TypeVar("T")

#: Called in the insert transaction after each job's row: (cursor, PandaID, definition).
OnInsert = Callable[[sqlite3.Cursor, int, JobDefinition], None]


class DuplicatePandaID(ValueError):
    """A submitted job carries a PandaID that is already in use."""


class JobStore:
    """The SQLite database behind the development server."""

    def __init__(self, reactor: IReactorCore, path: Path) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3",
            str(path),
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_reactor=reactor,
            cp_openfun=_configure,
        )

    def _run(self, function: Callable[..., T], *args: object) -> Deferred[T]:
        return cast("Deferred[T]", self._pool.runInteraction(function, *args))  # type: ignore[no-untyped-call]

    def run(self, function: Callable[..., T], *args: object) -> Deferred[T]:
        """Run ``function(cursor, *args)`` as one transaction in the database thread."""
        return self._run(function, *args)

    async def start(self) -> None:
        """Create the tables if needed."""
        await self._run(_create_schema)

    def close(self) -> None:
        """Stop the worker thread and close the connection (waits for the running query)."""
        self._pool.close()  # type: ignore[no-untyped-call]

    # -- jobs ---------------------------------------------------------------------------------

    async def insert_jobs(
        self, jobs: Sequence[JobDefinition], now: float, on_insert: OnInsert | None = None
    ) -> list[int]:
        return await self._run(_insert_jobs, jobs, now, on_insert)

    async def submit_once(
        self,
        digest: str,
        source: str,
        jobs: Sequence[JobDefinition],
        now: float,
        on_insert: OnInsert | None = None,
    ) -> list[int] | None:
        """Insert ``jobs`` unless content with this digest was submitted before (then None)."""
        return await self._run(_submit_once, digest, source, jobs, now, on_insert)

    async def claim(self, selector: JobSelector, count: int, now: float) -> tuple[list[JobRecord], int]:
        """Mark up to ``count`` matching activated jobs ``sent``; also the server's ``nSent``."""
        return await self._run(_claim, selector, count, now)

    async def apply_update(
        self, panda_id: int, decide: Callable[[JobRecord | None], D], update: UpdateRecord
    ) -> D:
        """Decide about a pilot's update with the current row, apply it and record the update."""
        return await self._run(_apply_update, panda_id, decide, update)

    async def modify(
        self, panda_id: int, decide: Callable[[JobRecord | None], tuple[Mapping[str, object], T]]
    ) -> T:
        """Read-decide-write on one job in one transaction."""
        return await self._run(_modify, panda_id, decide)

    async def get(self, panda_id: int) -> JobRecord | None:
        return await self._run(_get, panda_id)

    async def list_jobs(self, status: str | None = None, site: str | None = None) -> list[JobRecord]:
        return await self._run(_list_jobs, status, site)

    async def updates(self, panda_id: int) -> list[UpdateRecord]:
        return await self._run(_updates, panda_id)

    # -- worker nodes -------------------------------------------------------------------------

    async def worker_node(
        self, site: str, host_name: str, cpu_model: str, params: Mapping[str, object], now: float
    ) -> bool:
        """Insert or refresh a worker node; True if it was known."""
        return await self._run(
            _upsert,
            "worker_nodes",
            ("site", "host_name", "cpu_model"),
            (site, host_name, cpu_model),
            params,
            now,
        )

    async def worker_node_gpu(
        self, site: str, host_name: str, vendor: str, model: str, params: Mapping[str, object], now: float
    ) -> bool:
        """Insert or refresh a worker node GPU; True if it was known."""
        keys = ("site", "host_name", "vendor", "model")
        return await self._run(
            _upsert, "worker_node_gpus", keys, (site, host_name, vendor, model), params, now
        )

    async def worker_nodes(self, table: str = "worker_nodes") -> list[dict[str, object]]:
        """Every worker node (or, with ``table="worker_node_gpus"``, GPU) row, oldest report first."""
        if table not in ("worker_nodes", "worker_node_gpus"):
            raise ValueError(f"not a worker node table: {table}")
        return await self._run(_worker_node_rows, table)


# -- functions run in the database thread -----------------------------------------------------------


def _configure(connection: sqlite3.Connection) -> None:
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


def _create_schema(cursor: sqlite3.Cursor) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            cursor.execute(statement)


def _insert_jobs(
    cursor: sqlite3.Cursor, jobs: Sequence[JobDefinition], now: float, on_insert: OnInsert | None = None
) -> list[int]:
    cursor.execute("SELECT COALESCE(MAX(submitOrder), 0) FROM jobs")
    order = int(cursor.fetchone()[0])
    ids: list[int] = []
    for job in jobs:
        order += 1
        if job.panda_id is not None:
            cursor.execute("SELECT 1 FROM jobs WHERE PandaID = ?", (job.panda_id,))
            if cursor.fetchone() is not None:
                raise DuplicatePandaID(f"PandaID {job.panda_id} already exists")
        cursor.execute(
            """INSERT INTO jobs (PandaID, submitOrder, computingSite, prodSourceLabel, resource_type,
                processingType, minRamCount, maxDiskCount, maxWalltime, coreCount, currentPriority,
                jobExecutionID, jediTaskID, prodUserID, prodUserName, jobStatus, attemptNr, definition,
                debug, creationTime, modificationTime, stateChangeTime)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'activated', ?, ?, ?, ?, ?, ?)""",
            (
                job.panda_id,
                order,
                job.computing_site,
                job.prod_source_label,
                job.resource_type,
                job.processing_type,
                job.min_ram_count,
                job.max_disk_count,
                job.max_walltime,
                job.core_count,
                job.current_priority,
                job.job_execution_id,
                job.jedi_task_id,
                job.prod_user_id,
                job.prod_user_name,
                job.attempt_nr,
                json.dumps(job.wire),
                int(job.debug),
                now,
                now,
                now,
            ),
        )
        assert cursor.lastrowid is not None
        ids.append(cursor.lastrowid)
        if on_insert is not None:
            on_insert(cursor, cursor.lastrowid, job)
    return ids


def _submit_once(
    cursor: sqlite3.Cursor,
    digest: str,
    source: str,
    jobs: Sequence[JobDefinition],
    now: float,
    on_insert: OnInsert | None,
) -> list[int] | None:
    cursor.execute("SELECT 1 FROM submissions WHERE digest = ?", (digest,))
    if cursor.fetchone() is not None:
        return None
    ids = _insert_jobs(cursor, jobs, now, on_insert)
    cursor.execute("INSERT INTO submissions VALUES (?, ?, ?, ?)", (digest, source, now, json.dumps(ids)))
    return ids


def _claim(
    cursor: sqlite3.Cursor, selector: JobSelector, count: int, now: float
) -> tuple[list[JobRecord], int]:
    where = ["jobStatus = 'activated'", "computingSite = ?"]
    values: list[object] = [selector.site]
    if selector.memory not in (0, "0"):
        where.append("(minRamCount <= ? OR minRamCount = 0)")
        values.append(selector.memory)
    if selector.disk_space not in (0, "0"):
        where.append("(maxDiskCount <= ? OR maxDiskCount = 0)")
        values.append(selector.disk_space)
    if selector.remaining_time > 0:
        where.append("(maxWalltime IS NULL OR maxWalltime <= ?)")
        values.append(selector.remaining_time)
    if selector.background:
        where.append("jobExecutionID = 1")
    if selector.resource_type is not None:
        where.append("resource_type = ?")
        values.append(selector.resource_type)
    labels = selector.labels
    label_clause = f"prodSourceLabel IN ({', '.join('?' * len(labels))})" if labels else None
    if selector.processing_type is not None:
        alternatives = ["processingType = ?", *([label_clause] if label_clause else [])]
        where.append(f"({' OR '.join(alternatives)})")
        values.append(selector.processing_type)
        values.extend(labels or ())
    elif label_clause and labels:
        where.append(label_clause)
        values.extend(labels)
    if selector.prod_user_name is not None:
        where.append("prodUserName = ?")
        values.append(selector.prod_user_name)
    if selector.task_id not in (None, "NULL"):
        where.append("jediTaskID = ?")
        values.append(selector.task_id)
    query = f"SELECT PandaID FROM jobs WHERE {' AND '.join(where)} ORDER BY submitOrder LIMIT 1"

    claimed: list[JobRecord] = []
    n_sent = 0
    for _ in range(count):
        cursor.execute(query, values)
        row = cursor.fetchone()
        if row is None:
            break
        panda_id = int(row[0])
        cursor.execute(
            """UPDATE jobs SET jobStatus = 'sent', modificationTime = ?, startTime = ?, modificationHost = ?,
                computingElement = COALESCE(?, computingElement), schedulerID = COALESCE(?, schedulerID)
            WHERE PandaID = ? AND jobStatus = 'activated'""",
            (now, now, selector.node, selector.computing_element, selector.scheduler_id, panda_id),
        )
        if selector.count_sent:
            cursor.execute(
                """SELECT count(*) FROM jobs WHERE jobStatus = 'sent' AND prodSourceLabel IN ('managed', 'test')
                AND computingSite = ? AND modificationTime > ?""",
                (selector.site, now - 60),
            )
            n_sent = int(cursor.fetchone()[0])
        record = _get(cursor, panda_id)
        assert record is not None
        claimed.append(record)
    return claimed, n_sent


def _get(cursor: sqlite3.Cursor, panda_id: int) -> JobRecord | None:
    cursor.execute("SELECT * FROM jobs WHERE PandaID = ?", (panda_id,))
    row = cursor.fetchone()
    return None if row is None else JobRecord.from_row(row)


def _write(cursor: sqlite3.Cursor, panda_id: int, changes: Mapping[str, object]) -> None:
    if not changes:
        return
    unknown = set(changes) - _MUTABLE
    if unknown:
        raise ValueError(f"cannot change job column(s) {sorted(unknown)}")
    columns = sorted(changes)
    values = [json.dumps(changes[c]) if c in _JSON_COLUMNS else changes[c] for c in columns]
    assignments = ", ".join(f"{column} = ?" for column in columns)
    cursor.execute(f"UPDATE jobs SET {assignments} WHERE PandaID = ?", (*values, panda_id))


def _apply_update(
    cursor: sqlite3.Cursor, panda_id: int, decide: Callable[[JobRecord | None], D], update: UpdateRecord
) -> D:
    decision = decide(_get(cursor, panda_id))
    if decision.changes:
        _write(cursor, panda_id, decision.changes)
    cursor.execute(
        "INSERT INTO updates (PandaID, state, time, api, params, command) VALUES (?, ?, ?, ?, ?, ?)",
        (
            update.PandaID,
            update.state,
            update.time,
            update.api,
            json.dumps(update.params, default=str),
            decision.command,
        ),
    )
    return decision


def _modify(
    cursor: sqlite3.Cursor,
    panda_id: int,
    decide: Callable[[JobRecord | None], tuple[Mapping[str, object], T]],
) -> T:
    changes, result = decide(_get(cursor, panda_id))
    _write(cursor, panda_id, changes)
    return result


def _list_jobs(cursor: sqlite3.Cursor, status: str | None, site: str | None) -> list[JobRecord]:
    where, values = [], []
    if status is not None:
        where.append("jobStatus = ?")
        values.append(status)
    if site is not None:
        where.append("computingSite = ?")
        values.append(site)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    cursor.execute(f"SELECT * FROM jobs{clause} ORDER BY submitOrder", values)
    return [JobRecord.from_row(row) for row in cursor.fetchall()]


def _updates(cursor: sqlite3.Cursor, panda_id: int) -> list[UpdateRecord]:
    cursor.execute(
        "SELECT PandaID, state, time, api, params, command FROM updates WHERE PandaID = ? ORDER BY id",
        (panda_id,),
    )
    return [
        UpdateRecord(
            PandaID=row[0], state=row[1], time=row[2], api=row[3], params=json.loads(row[4]), command=row[5]
        )
        for row in cursor.fetchall()
    ]


def _upsert(
    cursor: sqlite3.Cursor,
    table: str,
    key_columns: Sequence[str],
    key: Sequence[str],
    params: Mapping[str, object],
    now: float,
) -> bool:
    match = " AND ".join(f"{column} = ?" for column in key_columns)
    cursor.execute(f"SELECT 1 FROM {table} WHERE {match}", tuple(key))
    known = cursor.fetchone() is not None
    cursor.execute(
        f"INSERT OR REPLACE INTO {table} ({', '.join(key_columns)}, params, last_seen) "
        f"VALUES ({', '.join('?' * (len(key_columns) + 2))})",
        (*key, json.dumps(params, default=str), now),
    )
    return known


def _worker_node_rows(cursor: sqlite3.Cursor, table: str) -> list[dict[str, object]]:
    cursor.execute(f"SELECT * FROM {table} ORDER BY last_seen, rowid")
    rows = []
    for row in cursor.fetchall():
        record = {key: row[key] for key in row.keys() if key != "params"}
        record["params"] = json.loads(row["params"])
        rows.append(record)
    return rows
