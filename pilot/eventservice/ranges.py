"""Event ranges as the server hands them out, checked before a payload sees them.

The server's range object is ``{"eventRangeID": "<jediTaskID>-<PandaID>-<fileID>-
<processID>-<attemptNr>", "startEvent": int, "lastEvent": int, "LFN", "GUID", "scope"}``;
the legacy API sends the list as a JSON *string* inside its form reply, the v1 API as a
list.  The payload gets each range's dictionary as the server sent it, so nothing is
lost that a newer server adds; the pilot keeps the fields it needs, checked:

* the id is text without white space or commas, since the channel's grammar
  (``<path>,ID:<id>,CPU:...``, ``ERR_<CODE> <id>: ...``) could not carry it back;
* the event numbers are integers with ``0 <= startEvent <= lastEvent``;
* the LFN is a safe file name (``pilot.model.names``): the payload opens it in the
  work directory, and a name like ``../../etc/passwd`` must never reach it;
* the scope is a Rucio scope.

A range that fails is an ``EventRangeError`` with ``ESFATAL``: asking again would give
the same range.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.model.fields import JobDefinitionError
from pilot.model.names import check_lfn, valid_scope
from pilot.util.records import record

#: Longest range id accepted (real ids are about 40 characters).
MAX_RANGE_ID = 256

_RANGE_ID = re.compile(rf"[^\s,]{{1,{MAX_RANGE_ID}}}")


class EventRangeError(ValueError):
    """A range (or list of ranges) from the server that the pilot cannot hand out."""

    code = ErrorCode.ESFATAL


@record(frozen=True)
class EventRange:
    """One range: what the pilot needs of it, and the server's dictionary for the payload."""

    range_id: str
    start_event: int
    last_event: int
    lfn: str
    guid: str
    scope: str
    raw: Mapping[str, Any]

    @property
    def events(self) -> int:
        return self.last_event - self.start_event + 1


def _text(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise EventRangeError(f"{where}: {key} must be text, not {type(value).__name__}")
    return value


def _event_number(item: Mapping[str, Any], key: str, where: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventRangeError(f"{where}: {key} must be an integer >= 0, not {value!r:.40}")
    return value


def parse_event_range(item: Any, where: str = "event range") -> EventRange:
    """One range dictionary, checked (see the module's docstring)."""
    if not isinstance(item, Mapping):
        raise EventRangeError(f"{where} is not an object")
    range_id = _text(item, "eventRangeID", where)
    if not _RANGE_ID.fullmatch(range_id):
        raise EventRangeError(
            f"{where}: eventRangeID {range_id[:60]!r} is empty, too long, or has spaces or commas"
        )
    where = f"event range {range_id}"
    start, last = _event_number(item, "startEvent", where), _event_number(item, "lastEvent", where)
    if start > last:
        raise EventRangeError(f"{where}: startEvent {start} is after lastEvent {last}")
    lfn = _text(item, "LFN", where)
    try:
        check_lfn(lfn, "LFN", ErrorCode.ESFATAL)
    except JobDefinitionError as exc:
        raise EventRangeError(f"{where}: {exc}") from None
    scope = _text(item, "scope", where)
    if not valid_scope(scope):
        raise EventRangeError(f"{where}: {scope[:60]!r} is not a Rucio scope")
    return EventRange(
        range_id=range_id,
        start_event=start,
        last_event=last,
        lfn=lfn,
        guid=_text(item, "GUID", where),
        scope=scope,
        raw=dict(item),
    )


def parse_event_ranges(value: Any) -> tuple[EventRange, ...]:
    """The server's ``eventRanges``: a list, or (legacy form reply) a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise EventRangeError("eventRanges is not JSON") from None
    if not isinstance(value, list):
        raise EventRangeError(f"eventRanges must be a list, not {type(value).__name__}")
    ranges = tuple(parse_event_range(item, f"event range #{i}") for i, item in enumerate(value))
    ids = [r.range_id for r in ranges]
    if len(set(ids)) != len(ids):
        raise EventRangeError("eventRanges names one range twice")
    return ranges
