"""The event-service methods of both API generations, as the real servers answer them.

Legacy (panda-server 0.8.1 ``JobDispatcher.py``): ``getEventRanges``,
``updateEventRange``, ``updateEventRanges`` and ``checkEventsAvailability``, with the
pilot-permission check (a DN and the production or pilot role) that answers a refusal
as a bare text line, string parameters converted where the server converts them (an
unguarded ``int(timeout)`` is an HTTP 500), and replies urlencoded or JSON as each
method encodes them.  ``updateEventRanges`` answers version 0 with ``Returns`` and
``Command`` as JSON *strings*, version 1 with a list and an object.

v1 (panda-server 1.0.4 ``api/v1/event_api.py``; its parameters are checked before, in
``signatures``): ``acquire_event_ranges``, ``update_single_event_range`` (``success`` is
``null`` for a non-final status, ``Command`` is a JSON string),
``update_event_ranges`` (commits, then builds its reply as a Python *set* and fails:
an HTTP 500 ``Type not serializable for {...} (<class 'set'>)`` for version 0, whose
values are strings, and ``unhashable type: 'list'`` for version 1),
``get_event_range_statuses`` and ``get_available_event_range_count``.

Every event call can be made to answer late (``delay``, on the reactor clock): a
benchmark needs "a server answering in 200 ms".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from pilot.devserver import protocol
from pilot.devserver.auth import Authenticator, Identity
from pilot.devserver.events import EventStore
from pilot.devserver.protocol import SC_FAILED, SC_SUCCESS, Params, Reply

#: ``api/v1/common.py``'s message for a failed database call.
MESSAGE_DATABASE = "database error in the PanDA server"

#: The legacy methods this module answers.
LEGACY_EVENT_METHODS = frozenset(
    {"getEventRanges", "updateEventRange", "updateEventRanges", "checkEventsAvailability"}
)

#: What ``TaskBuffer.updateEventRanges`` returns for a report that is not JSON (a *string*,
#: which the callers then index as if it were the usual pair).
_NOT_JSON = json.dumps("ERROR : failed to convert eventRanges with json")


class EventAPI:
    """Event ranges for pilots, over an ``EventStore``."""

    def __init__(
        self, events: EventStore, authenticator: Authenticator, clock: IReactorTime, delay: float = 0.0
    ) -> None:
        if delay < 0:
            raise ValueError("the event calls' delay must not be negative")
        self._events = events
        self._auth = authenticator
        self._clock = clock
        self.delay = delay

    async def _late(self) -> None:
        if self.delay > 0:
            await deferLater(self._clock, self.delay, lambda: None)

    # -- legacy -------------------------------------------------------------------------------

    async def legacy(self, method: str, identity: Identity, args: Params, accept_json: bool) -> Reply:
        """A legacy event method with its bound arguments (exceptions are the server's HTTP 500s)."""
        await self._late()
        refusal = self._permission(identity)
        if method == "checkEventsAvailability":  # the refusal is only logged there
            count = await self._events.available(args["jobsetID"], args["taskID"])
            body = json.dumps(protocol.legacy_response(SC_SUCCESS) | {"nEventRanges": count})
            return Reply(200, "application/json", body.encode())
        if refusal is not None:
            return Reply(200, "text/plain", refusal.encode())
        if method == "getEventRanges":
            return await self._get_event_ranges(args, accept_json)
        if method == "updateEventRange":
            return await self._update_event_range(args)
        return await self._update_event_ranges(args, accept_json)

    def _permission(self, identity: Identity) -> str | None:
        """``checkPilotPermission``: the refusal text, or None."""
        if identity.dn is None:
            return "failed to retrieve DN"
        if not self._auth.production_legacy(identity):
            return "production or pilot role is required"
        return None

    async def _get_event_ranges(self, args: Params, accept_json: bool) -> Reply:
        segment = args["segment_id"]
        segment_id = None if segment is None else int(segment)  # type: ignore[call-overload]
        int(args["timeout"])  # type: ignore[call-overload]  # unguarded there: an HTTP 500
        ranges = await self._events.acquire(
            args["pandaID"], args["jobsetID"], args["taskID"], args["nRanges"], segment_id
        )
        data = protocol.legacy_response(SC_SUCCESS)
        data["eventRanges"] = ranges if accept_json else json.dumps(ranges)
        return protocol.encode_legacy(data, accept_json)

    async def _update_event_range(self, args: Params) -> Reply:
        int(args["timeout"])  # type: ignore[call-overload]
        accepted, command = await self._single(
            args["eventRangeID"], args["eventStatus"], args["objstoreID"], "legacy", "updateEventRange"
        )
        if accepted is True:
            data = protocol.legacy_response(SC_SUCCESS)
            data["Command"] = command
        else:
            data = protocol.legacy_response(SC_FAILED)
        return protocol.encode_legacy(data, False)  # always urlencoded there

    async def _update_event_ranges(self, args: Params, accept_json: bool) -> Reply:
        try:
            version = int(args["version"])  # type: ignore[call-overload]
        except (TypeError, ValueError):
            version = 0
        int(args["timeout"])  # type: ignore[call-overload]
        result = await self._task_buffer_update(args["eventRanges"], version, "legacy", "updateEventRanges")
        data = protocol.legacy_response(SC_SUCCESS)
        data["Returns"] = result[0]
        data["Command"] = result[1]
        return protocol.encode_legacy(data, accept_json)

    # -- v1 -----------------------------------------------------------------------------------

    async def v1(self, method: str, args: Params) -> dict[str, object]:
        """A v1 event endpoint with its validated arguments; the response before encoding."""
        await self._late()
        if method == "acquire_event_ranges":
            try:
                ranges = await self._events.acquire(
                    args["job_id"], args["jobset_id"], args["task_id"], args["n_ranges"], args["segment_id"]
                )
            except sqlite3.Error:
                return protocol.v1_response(False, MESSAGE_DATABASE)
            return protocol.v1_response(True, data=ranges)
        if method == "update_single_event_range":
            accepted, command = await self._single(
                args["event_range_id"],
                args["event_range_status"],
                args["object_store_id"],
                "v1",
                method,
            )
            if accepted is False:
                return protocol.v1_response(False, MESSAGE_DATABASE)
            return {"success": accepted, "message": "", "data": {"Command": command}}
        if method == "update_event_ranges":
            version = args["version"]
            assert isinstance(version, int)
            result = await self._task_buffer_update(args["event_ranges"], version, "v1", method)
            # the server's own line, a set display where a dict was meant: for version 0 (two
            # JSON strings) it fails later, when the reply is encoded; for version 1 right here
            data: set[object] = {"Returns", result[0], "Commands", result[1]}
            return protocol.v1_response(True, data=data)
        if method == "get_available_event_range_count":
            count = await self._events.available(args["jobset_id"], args["task_id"])
            return protocol.v1_response(True, data=count)
        try:  # get_event_range_statuses
            statuses = await self._events.statuses(str(args["job_task_ids"]))
        except (ValueError, KeyError, TypeError, sqlite3.Error):
            return protocol.v1_response(False, MESSAGE_DATABASE)
        return protocol.v1_response(True, data=statuses)

    # -- TaskBuffer ---------------------------------------------------------------------------

    async def _single(
        self, range_id: object, status: object, objstore_id: object, api: str, method: str
    ) -> tuple[bool | None, str]:
        """``TaskBuffer.updateEventRange``: the first ``Returns`` entry and the commands as JSON."""
        item = {"eventRangeID": range_id, "eventStatus": status, "objstoreID": objstore_id}
        returns, commands = await self._events.update([item], 0, api, method, self._clock.seconds())
        return (returns[0] if returns else False), json.dumps(commands)

    async def _task_buffer_update(
        self, text: object, version: int, api: str, method: str
    ) -> Sequence[object]:
        """``TaskBuffer.updateEventRanges``: (Returns, Commands), JSON-encoded for version 0.

        A report that is not JSON gives the server's error *string*, which its callers
        index as the pair: ``Returns`` becomes ``'"'`` and the command ``'E'``.
        """
        try:
            decoded = json.loads(text)  # type: ignore[arg-type]
        except (TypeError, ValueError, RecursionError):
            return _NOT_JSON
        returns, commands = await self._events.update(decoded, version, api, method, self._clock.seconds())
        if version != 0:
            return returns, commands
        return json.dumps(returns), json.dumps(commands)
