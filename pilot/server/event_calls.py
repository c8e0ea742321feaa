"""The event-service calls on the wire: requests for both API generations, replies parsed.

Calls (``panda-server-protocol.md`` §7; panda-server 0.8.1 legacy, 1.0.4 v1):

* ranges: legacy ``getEventRanges`` (``pandaID``, ``jobsetID``, ``taskID``, ``nRanges``)
  answers ``{"StatusCode": 0, "eventRanges": [...]}`` (a JSON *string* in a urlencoded
  reply); v1 ``event/acquire_event_ranges`` (``job_id``, ``jobset_id``, ``task_id``,
  ``n_ranges``) answers ``{"success", "message", "data": [...]}``;
* reports: legacy ``updateEventRanges`` and v1 ``event/update_event_ranges`` take the
  list as a JSON *string* (``eventRanges``/``event_ranges``) and a ``version``; legacy
  answers ``StatusCode``, ``Returns`` (one true/false/null per range) and ``Command``
  (``{"<PandaID>": command}``), both JSON strings for version 0;
* one range: v1 ``event/update_single_event_range`` (``event_range_id``,
  ``event_range_status``, ``core_count``, ``cpu_consumption_time`` as a float) answers
  ``success`` true, or null for a non-final status, and ``data.Command`` as a JSON
  string.  ``object_store_id`` is never sent: 1.0.4 annotates it with the builtin
  ``id``, so any value breaks its type check.  The legacy ``updateEventRange`` answers
  urlencoded, ``StatusCode=30`` for anything but a recorded final status;
* what was recorded: v1 ``GET event/get_event_range_statuses?job_task_ids=<JSON>`` (a
  list of ``{"task_id", "panda_id"}``; a range id's first two fields) answers ``data``
  = ``{"<PandaID>": {"<range id>": {"status", "error", "dialog"}}}``, a fatal range
  listed as ``failed`` under attempt number 1.  The legacy API has no such call.

panda-server 1.0.4's ``update_event_ranges`` commits the report and then fails to encode
its reply (a Python set): HTTP 500 ``Type not serializable for {...} (<class 'set'>)``
(version 0) or ``unhashable type: 'list'`` (version 1).  ``check_update_status`` turns
that into ``CommittedThenFailed`` and any other HTTP 500 of that call into a refusal,
so the transport never repeats it.  Beware: the same 500 comes whatever the database
did, so it proves only that the server read the report (a version-1 chunk without
``objstoreID`` is rolled back there, and answered the same way): the outcome is read
back with ``get_event_range_statuses`` and matched by ``check_recorded``.

Logical refusals (a ``StatusCode`` other than 0, ``success: false``) are
``EventCallFailed``; replies of the wrong shape are ``ServerProtocolError``.  No
message quotes a reply body, only the v1 ``message`` (cut, printable).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.server.api import ApiMode
from pilot.server.errors import ServerError, ServerProtocolError, ServerRefused
from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult, RangeStatus
from pilot.server.messages import StatusCode
from pilot.server.replies import printable

log = Logger(observer=pilot_observer)

#: (legacy method, v1 path) of each call.
ACQUIRE = ("getEventRanges", "event/acquire_event_ranges")
UPDATE = ("updateEventRanges", "event/update_event_ranges")
UPDATE_SINGLE = ("updateEventRange", "event/update_single_event_range")
#: The v1 path of the status query (no legacy method).
STATUSES = "event/get_event_range_statuses"

#: What 1.0.4's ``update_event_ranges`` says in the HTTP 500 it sends after committing.
POST_COMMIT_FAILURES = ("Type not serializable", "unhashable type")

#: The v1 message of a database call that returned False (for one range: a refusal).
MESSAGE_DATABASE = "database error in the PanDA server"

#: Statuses the server records (the others are acknowledged with null and dropped).
FINAL_STATES = ("finished", "failed", "fatal")

#: Commands that mean "nothing to do".
_NO_COMMAND = (None, "", "NULL", "None")


class EventCallFailed(ServerError):
    """The server answered but did not do the call (``StatusCode`` not 0, ``success: false``).

    ``status`` is the legacy ``StatusCode`` (None for a v1 refusal), ``message`` the
    server's explanation when it gave one (v1 ``message``, legacy ``errorDialog``).
    """

    def __init__(self, message: str, status: StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class CommittedThenFailed(ServerRefused):
    """1.0.4's ``update_event_ranges``: the report was read and processed, then the reply failed.

    Usually committed, but the same 500 comes after a rollback: never repeat the call
    blindly, read the ranges back (``get_event_range_statuses``, ``check_recorded``).
    """


# -- requests ---------------------------------------------------------------------------------


def encode_acquire(request: EventRangeRequest, api: ApiMode) -> dict[str, Any]:
    """The parameters of ``getEventRanges`` / ``acquire_event_ranges`` (task id left out if unknown)."""
    if api is ApiMode.LEGACY:
        params: dict[str, Any] = {"pandaID": request.job_id, "jobsetID": request.jobset_id}
        names = ("taskID", "nRanges")
    else:
        params = {"job_id": request.job_id, "jobset_id": request.jobset_id}
        names = ("task_id", "n_ranges")
    if request.task_id is not None:
        params[names[0]] = request.task_id
    params[names[1]] = request.n_ranges
    return params


def encode_update(update: EventRangeUpdate, api: ApiMode) -> dict[str, Any]:
    """The parameters of ``updateEventRanges`` / ``update_event_ranges``: the list as a JSON string."""
    ranges = json.dumps(update.wire(), separators=(",", ":"))
    if api is ApiMode.LEGACY:
        return {"eventRanges": ranges, "version": update.version}
    return {"event_ranges": ranges, "version": update.version}


def encode_single(status: RangeStatus, api: ApiMode) -> dict[str, Any]:
    """The parameters of ``updateEventRange`` / ``update_single_event_range`` (never an object store id)."""
    if api is ApiMode.LEGACY:
        params: dict[str, Any] = {"eventRangeID": status.range_id, "eventStatus": status.status}
        names = ("coreCount", "cpuConsumptionTime")
    else:
        params = {"event_range_id": status.range_id, "event_range_status": status.status}
        names = ("core_count", "cpu_consumption_time")
    if status.core_count is not None:
        params[names[0]] = int(status.core_count)
    if status.cpu_seconds is not None:
        params[names[1]] = float(status.cpu_seconds)  # 1.0.4 refuses an int here
    return params


def encode_statuses(jobs: Sequence[tuple[int, int]]) -> dict[str, str]:
    """The query of ``get_event_range_statuses`` for ``(jediTaskID, PandaID)`` pairs."""
    pairs = [{"task_id": task_id, "panda_id": panda_id} for task_id, panda_id in jobs]
    return {"job_task_ids": json.dumps(pairs, separators=(",", ":"))}


def range_job(range_id: str) -> tuple[int, int] | None:
    """``(jediTaskID, PandaID)`` of ``<jediTaskID>-<PandaID>-<fileID>-<processID>-<attemptNr>``.

    None for an id of another form: the server refuses to record such a range.
    """
    parts = range_id.split("-")
    if len(parts) != 5 or not all(part.isascii() and part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


def check_recorded(
    statuses: Sequence[RangeStatus], recorded: Mapping[str, str]
) -> tuple[dict[str, bool | None], tuple[str, ...]]:
    """Match reported ``statuses`` with what the server holds (``get_event_range_statuses``).

    Returns the settled outcomes and the ids of the ranges the server did not record:

    * recorded as reported: True (a ``fatal`` range is held as ``failed`` under
      attempt number 1, as the server lists it);
    * still not final there (``ready``, ``sent``, ``running``): not recorded, to be
      sent again;
    * another final status, or not listed for its job (not handed out to it, an id of
      another form): False, since the server never changes a final range nor records
      one it did not hand out, so sending it again changes nothing;
    * a status the server does not record (``running``): None, as its ``Returns`` say.
    """
    settled: dict[str, bool | None] = {}
    unrecorded: list[str] = []
    for status in statuses:
        if status.status not in FINAL_STATES:
            settled[status.range_id] = None
            continue
        held = recorded.get(status.range_id)
        expected = status.status
        if status.status == "fatal":
            expected = "failed"
            if held is None:
                held = recorded.get(status.range_id.rsplit("-", 1)[0] + "-1")
        if held == expected:
            settled[status.range_id] = True
        elif held is None or held in FINAL_STATES:
            settled[status.range_id] = False
        else:
            unrecorded.append(status.range_id)
    return settled, tuple(unrecorded)


def check_update_status(api: ApiMode, code: int, body: bytes, url: str) -> None:
    """Classify an error status of ``update_event_ranges`` before the transport's retry policy does.

    For the v1 call an HTTP 500 may come after the commit, so it is never repeated: the
    known texts raise ``CommittedThenFailed``, any other 500 a plain refusal.  Other
    statuses (and the legacy call) are left to the transport.
    """
    if api is ApiMode.LEGACY or code != 500:
        return
    text = body[:4096].decode("utf-8", errors="replace")
    if any(needle in text for needle in POST_COMMIT_FAILURES):
        raise CommittedThenFailed(
            f"{url}: HTTP 500 after the report was processed (panda-server 1.0.4)", code
        )
    raise ServerRefused(f"{url}: HTTP 500 (not repeated: the report may have been committed)", code)


# -- replies ----------------------------------------------------------------------------------------


def _status(document: Mapping[str, Any], what: str) -> StatusCode:
    value = document.get("StatusCode")
    try:
        if isinstance(value, bool):
            raise ValueError
        return StatusCode(int(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ServerProtocolError(f"{what}: StatusCode is {value!r:.40}") from None


def _envelope(
    document: Mapping[str, Any], what: str, *, null_success: bool = False
) -> tuple[bool | None, str, Any]:
    """A v1 reply's (success, message, data); ``null_success`` allows ``success: null``."""
    success, message = document.get("success"), document.get("message", "")
    if not (isinstance(success, bool) or (null_success and success is None)) or "data" not in document:
        raise ServerProtocolError(f"{what}: reply is not a v1 {{success, message, data}} object")
    if not isinstance(message, str | type(None)):
        raise ServerProtocolError(f"{what}: 'message' is not text")
    return success, message or "", document["data"]


def _refused(what: str, message: str, status: StatusCode | None = None) -> EventCallFailed:
    reason = printable(message) if message else (f"StatusCode {status.value}" if status is not None else "")
    return EventCallFailed(
        f"{what}: the server refused the call" + (f" ({reason})" if reason else ""), status, reason
    )


def _json_value(value: object, name: str, what: str) -> object:
    """A value that a reply may carry as JSON text (legacy version 0, urlencoded replies)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise ServerProtocolError(f"{what}: '{name}' is not valid JSON") from None


def _range_list(value: object, what: str) -> list[dict[str, Any]]:
    ranges = _json_value(value, "eventRanges", what)
    if not isinstance(ranges, list) or not all(isinstance(item, dict) for item in ranges):
        raise ServerProtocolError(f"{what}: the event ranges are not a list of objects")
    return ranges


def parse_acquire_reply(document: Mapping[str, Any], api: ApiMode, what: str) -> list[dict[str, Any]]:
    """The range objects of a ``getEventRanges`` / ``acquire_event_ranges`` reply ([]: no more)."""
    if api is ApiMode.LEGACY:
        status = _status(document, what)
        if status is not StatusCode.SUCCESS:
            raise _refused(what, str(document.get("errorDialog") or ""), status)
        if "eventRanges" not in document:
            raise ServerProtocolError(f"{what}: StatusCode 0 but no eventRanges")
        return _range_list(document["eventRanges"], what)
    success, message, data = _envelope(document, what)
    if not success:
        raise _refused(what, message)
    return _range_list(data, what)


def _returns(value: object, what: str) -> list[bool | None]:
    returns = _json_value(value, "Returns", what)
    if not isinstance(returns, list) or not all(item is None or isinstance(item, bool) for item in returns):
        raise ServerProtocolError(f"{what}: 'Returns' is not a list of true/false/null")
    return returns


def _command(value: object, panda_id: int, what: str, name: str = "Command") -> str | None:
    """The job's command from ``{"<PandaID>": command}`` (given as JSON text or an object)."""
    commands = _json_value(value, name, what)
    if commands is None:
        return None
    if not isinstance(commands, dict) or not all(v is None or isinstance(v, str) for v in commands.values()):
        raise ServerProtocolError(f"{what}: '{name}' is not an object of commands")
    command = commands.get(str(panda_id))
    return None if command in _NO_COMMAND else command


def parse_update_reply(
    document: Mapping[str, Any], api: ApiMode, update: EventRangeUpdate, what: str
) -> EventUpdateResult:
    """The outcome of an ``updateEventRanges`` reply (or of a v1 server that answers 200).

    ``Returns`` is matched to the ranges by position, in the order they were sent; a
    longer list (a failure after the commit appends ``false``) is logged, not an error.
    """
    if api is ApiMode.LEGACY:
        status = _status(document, what)
        if status is not StatusCode.SUCCESS:
            raise _refused(what, str(document.get("errorDialog") or ""), status)
        data: Mapping[str, Any] = document
        command_key = "Command"
    else:
        success, message, payload = _envelope(document, what)
        if not success:
            raise _refused(what, message)
        if not isinstance(payload, dict):
            raise ServerProtocolError(f"{what}: 'data' is not an object")
        data, command_key = payload, "Commands"
    if "Returns" not in data:
        raise ServerProtocolError(f"{what}: no 'Returns' in the reply")
    returns = _returns(data["Returns"], what)
    ids = update.range_ids
    if len(returns) > len(ids):
        log.info(
            "{what}: the server answered {extra} more Returns than ranges sent ({values})",
            what=what,
            extra=len(returns) - len(ids),
            values=returns[len(ids) :][:10],
            event="server.es_returns_extra",
        )
    accepted = {range_id: returns[i] if i < len(returns) else None for i, range_id in enumerate(ids)}
    return EventUpdateResult(accepted, _command(data.get(command_key), update.panda_id, what, command_key))


def parse_single_reply(
    document: Mapping[str, Any], api: ApiMode, status: RangeStatus, panda_id: int, what: str
) -> EventUpdateResult:
    """One range's outcome: true (recorded), null (not a final status), false (refused)."""
    final = status.status in FINAL_STATES
    if api is ApiMode.LEGACY:
        code = _status(document, what)
        if code is StatusCode.FAILED:  # what the legacy call answers for anything not recorded
            return EventUpdateResult({status.range_id: False if final else None}, None, "single")
        if code is not StatusCode.SUCCESS:
            raise _refused(what, "", code)
        command = _command(document.get("Command"), panda_id, what)
        return EventUpdateResult({status.range_id: True}, command, "single")
    success, message, data = _envelope(document, what, null_success=True)
    if success is False:
        if message == MESSAGE_DATABASE:  # the update returned False for the range
            return EventUpdateResult({status.range_id: False}, None, "single")
        raise _refused(what, message)
    if not isinstance(data, dict) or "Command" not in data:
        raise ServerProtocolError(f"{what}: 'data' has no Command")
    return EventUpdateResult({status.range_id: success}, _command(data["Command"], panda_id, what), "single")


def parse_statuses_reply(
    document: Mapping[str, Any], jobs: Sequence[tuple[int, int]], what: str
) -> dict[str, str]:
    """The status of every range of ``jobs`` from a ``get_event_range_statuses`` reply, by range id."""
    success, message, data = _envelope(document, what)
    if not success:
        raise _refused(what, message)
    if not isinstance(data, dict):
        raise ServerProtocolError(f"{what}: 'data' is not an object")
    recorded: dict[str, str] = {}
    for _task_id, panda_id in jobs:
        ranges = data.get(str(panda_id))
        if not isinstance(ranges, dict):
            raise ServerProtocolError(f"{what}: no range statuses for job {panda_id}")
        for range_id, fields in ranges.items():
            status = fields.get("status") if isinstance(fields, dict) else None
            if not isinstance(status, str):
                raise ServerProtocolError(f"{what}: a range of job {panda_id} has no status")
            recorded[range_id] = status
    return recorded


def merge_results(results: Sequence[EventUpdateResult], how: str) -> EventUpdateResult:
    """One result for several calls: every range's outcome, the last command given."""
    accepted: dict[str, bool | None] = {}
    command = None
    for result in results:
        accepted.update(result.accepted)
        command = result.command or command
    return EventUpdateResult(accepted, command, how)
