"""``updateJobStatus`` as a pure decision: what one pilot update changes in a job's row.

The real server (``job_complex_module.updateJobStatus`` with ``addMetadata`` before it)
matches an update on PandaID (and attemptNr when given) among the jobs it still holds as
active; a job that is gone, or a wrong attempt number, gets ``command=tobekilled``; an
update for a ``failed`` job gets ``alreadydone``; the other special transitions are kept
as well.  ``finished``/``failed`` are stored as ``holding`` and hand over to the Adder.

The functions here run inside the store's transaction: pure, no reactor, no logging.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class UpdateOutcome:
    """The decision about one update (a ``store.Decision``)."""

    changes: Mapping[str, object]
    command: str | None
    metadata_failed: bool = False
    old_status: str | None = None
    new_status: str | None = None
    run_adder: bool = False


def pilot_command(job: JobRecord) -> str:
    """The ``command`` for an update reply: ``debug`` first, then ``commandToPilot``, or ``NULL``."""
    parts = []
    if job.debug:
        parts.append("debug")
    if job.commandToPilot not in (None, ""):
        parts.append(str(job.commandToPilot))
    return ",".join(parts) or "NULL"


def decide_update(job: JobRecord | None, update: PilotUpdate, now: float) -> UpdateOutcome:
    """``updateJobStatus`` (plus ``addMetadata``) for one update, as a list of column changes."""
    metadata_changes: dict[str, object] = {}
    if update.metadata != "" and update.state != "failed":
        if job is None:
            return UpdateOutcome({}, None, metadata_failed=True)
        if job.jobStatus not in FINAL_STATES and job.metaData is None:
            metadata_changes["metaData"] = update.metadata

    if (
        job is None
        or job.jobStatus not in ACTIVE_STATES
        or (update.attempt_nr is not None and job.attemptNr != update.attempt_nr)
    ):
        return UpdateOutcome(metadata_changes, "tobekilled")

    old = job.jobStatus
    new = "holding" if update.state in ("finished", "failed") else update.state
    param = dict(update.params)
    if update.state in ("finished", "failed"):
        param["jobDispatcherErrorDiag"] = None
    elif update.state in ("holding", "transferring"):
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        param["jobDispatcherErrorDiag"] = f"set to {update.state} by the pilot at {stamp}"
    command = pilot_command(job)
    unchanged = UpdateOutcome(metadata_changes, command, old_status=old, new_status=old)

    if old == "failed" and new in ("holding", "transferring", "starting", "running"):
        return UpdateOutcome(metadata_changes, "alreadydone", old_status=old, new_status=old)
    if old == "transferring" and new == "holding" and job.jobDispatcherErrorDiag in (None, ""):
        return UpdateOutcome(metadata_changes, "alreadydone", old_status=old, new_status=old)
    if old == "holding" and new == "holding" and param.get("jobDispatcherErrorDiag") not in (None, ""):
        return unchanged  # heartbeats of a pilot recovering a holding job are ignored
    if old == "holding" and new == "holding" and job.jobDispatcherErrorDiag in (None, ""):
        return UpdateOutcome(metadata_changes, "alreadydone", old_status=old, new_status=old)
    if old in ("holding", "transferring") and new in ("running", "starting"):
        return unchanged
    new_batch = param.get("batchID")
    if (
        job.batchID not in ("", None)
        and new_batch not in ("", None)
        and job.batchID != new_batch
        and not _numeric(job.batchID)
        and not _numeric(new_batch)
    ):
        return UpdateOutcome(metadata_changes, "tobekilled", old_status=old, new_status=old)
    if old == "running" and new == "starting":
        new = "running"
    if new == "transferring" and old == "holding":
        return unchanged  # the server's UPDATE excludes holding -> transferring

    changes = dict(metadata_changes)
    changes.update(_param_columns(param, job))
    changes.update({"jobStatus": new, "modificationTime": now})
    if update.state in ("finished", "failed") or new != old:
        changes["stateChangeTime"] = now
    if (new == "holding" or (new == "transferring" and old == "running")) and job.endTime is None:
        changes.setdefault("endTime", now)
    if old in ("sent", "starting") and new == "running" and "startTime" not in param:
        changes["startTime"] = now
    if update.state in ("finished", "failed"):
        changes["jobOutputReport"] = update.report
    if update.stdout:
        fields = changes["pilotFields"]
        assert isinstance(fields, dict)
        fields["stdout"] = update.stdout
    return UpdateOutcome(
        changes,
        command,
        old_status=old,
        new_status=new,
        run_adder=update.state in ("finished", "failed"),
    )


#: Canonical update parameters stored in their own columns (the rest go to ``pilotFields``).
_INT_COLUMNS = ("transExitCode", "pilotErrorCode", "exeErrorCode")
_TEXT_COLUMNS = ("pilotErrorDiag", "exeErrorDiag", "batchID", "modificationHost", "jobDispatcherErrorDiag")


def _param_columns(param: Mapping[str, object], job: JobRecord) -> dict[str, object]:
    changes: dict[str, object] = {}
    fields = dict(job.pilotFields)
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
