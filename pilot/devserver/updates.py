"""``updateJobStatus`` as a pure decision: what one pilot update changes in a job's row.

The real server (``job_complex_module.updateJobStatus`` with ``addMetadata`` before it)
matches an update on PandaID (and attemptNr when given) among the jobs it still holds as
active; a job that is gone, or a wrong attempt number, gets ``command=tobekilled``; an
update for a ``failed`` job gets ``alreadydone``; the other special transitions are kept
as well.  ``finished``/``failed`` are stored as ``holding`` and hand over to the Adder.
Values wider than their columns are refused the way the database refuses them
(``columns``): a refused debug tail is lost alone, a refused job column loses the
whole update.

The functions here run inside the store's transaction: pure, no reactor, no logging.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pilot.devserver.columns import (
    STDOUT_COLUMN,
    STDOUT_WIDTH,
    refused,
    refused_columns,
    truncate_string_attrs,
)
from pilot.devserver.store import JobRecord

VALID_UPDATE_STATES = ("running", "failed", "finished", "holding", "starting", "transferring")
#: States of jobs still in the server's active table (``failed`` included so that late updates
#: for a failed job get ``alreadydone``).
ACTIVE_STATES = ("activated", "sent", "starting", "running", "holding", "transferring", "failed")
FINAL_STATES = ("finished", "failed", "cancelled", "closed")


@dataclass(frozen=True)
class PilotUpdate:
    """An updateJob/update_job call.

    ``raw`` is what the pilot sent (recorded in the updates table); ``params`` is the
    server's canonical ``param`` map built from it (stored on the job).
    """

    panda_id: int
    state: str
    api: str
    raw: Mapping[str, object]
    params: Mapping[str, object] = field(default_factory=dict)
    attempt_nr: int | None = None
    report: str = ""
    metadata: str = ""
    stdout: str = ""
    pilot_log: str = ""


@dataclass(frozen=True)
class UpdateOutcome:
    """The decision about one update (a ``store.Decision``).

    ``refused`` names the values the database would not store (``"table.column"`` ->
    reason); ``database_error`` means the job's own row was among them, so the update
    failed as a whole (the server answers ``StatusCode`` 30).
    """

    changes: Mapping[str, object]
    command: str | None
    metadata_failed: bool = False
    old_status: str | None = None
    new_status: str | None = None
    run_adder: bool = False
    refused: Mapping[str, str] = field(default_factory=dict)
    database_error: bool = False


def pilot_command(job: JobRecord) -> str:
    """The ``command`` for an update reply: ``debug`` first, then ``commandToPilot``, or ``NULL``."""
    parts = []
    if job.debug:
        parts.append("debug")
    if job.commandToPilot not in (None, ""):
        parts.append(str(job.commandToPilot))
    return ",".join(parts) or "NULL"


def decide_update(job: JobRecord | None, update: PilotUpdate, now: float) -> UpdateOutcome:
    """``updateJobStatus`` (plus ``addMetadata`` and ``addStdOut``) for one update, as column changes.

    ``addMetadata`` and ``addStdOut`` run first, each in its own transaction, so what
    they store stays whatever ``updateJobStatus`` decides (``side``).
    """
    side: dict[str, object] = {}
    if update.metadata != "" and update.state != "failed":
        if job is None:
            return UpdateOutcome({}, None, metadata_failed=True)
        if job.jobStatus not in FINAL_STATES and job.metaData is None:
            side["metaData"] = update.metadata
    refusals: dict[str, str] = {}
    if update.stdout and job is not None and job.jobStatus in ACTIVE_STATES:
        reason = refused(update.stdout, STDOUT_WIDTH)
        if reason is None:
            side["pilotFields"] = {**job.pilotFields, "stdout": update.stdout}
        else:
            refusals[STDOUT_COLUMN] = reason

    def unchanged(command: str | None, status: str | None = None) -> UpdateOutcome:
        return UpdateOutcome(side, command, old_status=status, new_status=status, refused=refusals)

    if (
        job is None
        or job.jobStatus not in ACTIVE_STATES
        or (update.attempt_nr is not None and job.attemptNr != update.attempt_nr)
    ):
        return unchanged("tobekilled")

    old = job.jobStatus
    new = "holding" if update.state in ("finished", "failed") else update.state
    param = truncate_string_attrs(update.params)
    if update.state in ("finished", "failed"):
        param["jobDispatcherErrorDiag"] = None
    elif update.state in ("holding", "transferring"):
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        param["jobDispatcherErrorDiag"] = f"set to {update.state} by the pilot at {stamp}"
    command = pilot_command(job)

    if old == "failed" and new in ("holding", "transferring", "starting", "running"):
        return unchanged("alreadydone", old)
    if old == "transferring" and new == "holding" and job.jobDispatcherErrorDiag in (None, ""):
        return unchanged("alreadydone", old)
    if old == "holding" and new == "holding" and param.get("jobDispatcherErrorDiag") not in (None, ""):
        return unchanged(command, old)  # heartbeats of a pilot recovering a holding job are ignored
    if old == "holding" and new == "holding" and job.jobDispatcherErrorDiag in (None, ""):
        return unchanged("alreadydone", old)
    if old in ("holding", "transferring") and new in ("running", "starting"):
        return unchanged(command, old)
    new_batch = param.get("batchID")
    if (
        job.batchID not in ("", None)
        and new_batch not in ("", None)
        and job.batchID != new_batch
        and not _numeric(job.batchID)
        and not _numeric(new_batch)
    ):
        return unchanged("tobekilled", old)
    if old == "running" and new == "starting":
        new = "running"
    if new == "transferring" and old == "holding":
        return unchanged(command, old)  # the server's UPDATE excludes holding -> transferring
    too_long = refused_columns(param)
    if too_long:  # the UPDATE fails and the transaction is rolled back: nothing of it is stored
        refusals.update({f"jobsActive4.{column}": reason for column, reason in too_long.items()})
        return UpdateOutcome(
            side, None, old_status=old, new_status=old, refused=refusals, database_error=True
        )

    changes = dict(side)
    pilot_fields = side.get("pilotFields", job.pilotFields)
    assert isinstance(pilot_fields, dict)
    changes.update(_param_columns(param, pilot_fields))
    changes.update({"jobStatus": new, "modificationTime": now})
    if update.state in ("finished", "failed") or new != old:
        changes["stateChangeTime"] = now
    if (new == "holding" or (new == "transferring" and old == "running")) and job.endTime is None:
        changes.setdefault("endTime", now)
    if old in ("sent", "starting") and new == "running" and "startTime" not in param:
        changes["startTime"] = now
    if update.state in ("finished", "failed"):
        changes["jobOutputReport"] = update.report
    return UpdateOutcome(
        changes,
        command,
        old_status=old,
        new_status=new,
        run_adder=update.state in ("finished", "failed"),
        refused=refusals,
    )


#: Canonical update parameters stored in their own columns (the rest go to ``pilotFields``).
_INT_COLUMNS = ("transExitCode", "pilotErrorCode", "exeErrorCode")
_TEXT_COLUMNS = ("pilotErrorDiag", "exeErrorDiag", "batchID", "modificationHost", "jobDispatcherErrorDiag")


def _param_columns(param: Mapping[str, object], pilot_fields: Mapping[str, object]) -> dict[str, object]:
    changes: dict[str, object] = {}
    fields = dict(pilot_fields)
    for key, value in param.items():
        if value is None and key != "jobDispatcherErrorDiag":
            continue
        if key in _INT_COLUMNS:
            changes[key] = _as_int(value)
        elif key in _TEXT_COLUMNS:
            changes[key] = None if value is None else str(value)
        elif key in ("startTime", "endTime") and isinstance(value, datetime.datetime):
            changes[key] = value.replace(tzinfo=datetime.UTC).timestamp()
        if key not in ("jobDispatcherErrorDiag",):
            fields[key] = value.isoformat(" ") if isinstance(value, datetime.datetime) else value
    changes["pilotFields"] = fields
    return changes


def _as_int(value: object) -> int | None:
    """Error codes as the database stores them (a leading '-' of a pilot error code is dropped)."""
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return abs(number)


def _numeric(value: object) -> bool:
    return re.search(r"^\d+\.*\d+$", str(value)) is not None
