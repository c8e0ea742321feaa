"""Queue configuration ("queuedata"): the CRIC/PanDA description of a PanDA queue.

Sites and PanDA publish one JSON object per queue (CRIC ``schedconfig``).  The pilot
reads it once at start-up, from a file or a URL, and takes from it the values that
shape its work: the timefloor (minutes in CRIC, seconds here), the queue's
``maxtime``, memory and disk limits, the environment for payloads, copytools and
storages.  Values are validated here, so a malformed queuedata stops the pilot at
start-up with QUEUEDATANOTOK instead of surfacing as a crash halfway through a job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.util.records import record


def _as_int(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise PilotError(
            ErrorCode.QUEUEDATANOTOK, f"queuedata field {key!r}: expected a number, got {value!r}"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            pass
    raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queuedata field {key!r}: expected a number, got {value!r}")


def _as_str(raw: Mapping[str, Any], key: str, default: str = "") -> str:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queuedata field {key!r}: expected a string, got {value!r}")


def _as_bool(raw: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = raw.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queuedata field {key!r}: expected a boolean, got {value!r}")


def _storage_names(value: object) -> list[str]:
    """``astorages`` values come as lists or comma-separated strings."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v]
    return []


def _as_dict(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queuedata field {key!r}: expected an object, got {value!r}")


def catchall_setting(catchall: str, names: tuple[str, ...]) -> str:
    """The first ``name='value'`` (or ``name="value"``, or unquoted to the next space) of
    ``names`` in a CRIC catchall string; "" if none.  pilot3 reads container options this way."""
    for name in names:
        match = re.search(rf"(?:^|\s){re.escape(name)}=(?:'([^']*)'|\"([^\"]*)\"|(\S+))", catchall)
        if match:
            return next(group for group in match.groups() if group is not None)
    return ""


def parse_environ(text: str) -> dict[str, str]:
    """CRIC ``environ``: whitespace-separated ``KEY=value`` pairs for payloads."""
    result: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep and key.isidentifier():
            result[key] = value
    return result


@record(frozen=True)
class QueueData:
    """The subset of a CRIC queue description the pilot acts on (all times in seconds)."""

    name: str
    resource: str
    site: str = ""
    state: str = "ACTIVE"
    status: str = "online"
    timefloor: int = 0
    maxtime: int = 0
    corecount: int = 1
    maxrss: int = 0
    maxwdir: int = 0
    maxinputsize: int = 14336
    catchall: str = ""
    environ: Mapping[str, str] = field(default_factory=dict)
    container_type: str = ""
    container_options: str = ""
    resource_type: str = ""
    queue_type: str = ""
    pledgedcpu: int = 0
    direct_access_lan: bool = False
    direct_access_wan: bool = False
    copytools: Mapping[str, Any] = field(default_factory=dict)
    acopytools: Mapping[str, Any] = field(default_factory=dict)
    astorages: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def default(cls, queue: str) -> QueueData:
        """What the pilot assumes without ``--queuedata``: one job, no queue limits."""
        return cls(name=queue, resource=queue)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], queue: str) -> QueueData:
        """Validate one queue's CRIC JSON object; raises PilotError(QUEUEDATANOTOK)."""
        name = _as_str(raw, "nickname", queue) or queue
        timefloor_minutes = _as_int(raw, "timefloor", 0)
        if timefloor_minutes < 0:
            raise PilotError(
                ErrorCode.QUEUEDATANOTOK, f"queuedata field 'timefloor' is negative: {timefloor_minutes}"
            )
        return cls(
            name=name,
            resource=_as_str(raw, "panda_resource", name) or name,
            site=_as_str(raw, "atlas_site") or _as_str(raw, "gstat"),
            state=_as_str(raw, "state", "ACTIVE") or "ACTIVE",
            status=_as_str(raw, "status", "online") or "online",
            timefloor=timefloor_minutes * 60,
            maxtime=max(0, _as_int(raw, "maxtime", 0)),
            corecount=max(1, _as_int(raw, "corecount", 1)),
            maxrss=_as_int(raw, "maxrss", 0),
            maxwdir=_as_int(raw, "maxwdir", 0),
            maxinputsize=_as_int(raw, "maxinputsize", 14336),
            catchall=_as_str(raw, "catchall"),
            environ=parse_environ(_as_str(raw, "environ")),
            container_type=_as_str(raw, "container_type"),
            container_options=_as_str(raw, "container_options")
            or catchall_setting(_as_str(raw, "catchall"), ("apptainer_options", "singularity_options")),
            resource_type=_as_str(raw, "resource_type"),
            queue_type=_as_str(raw, "type"),
            pledgedcpu=_as_int(raw, "pledgedcpu", 0),
            direct_access_lan=_as_bool(raw, "direct_access_lan"),
            direct_access_wan=_as_bool(raw, "direct_access_wan"),
            copytools=_as_dict(raw, "copytools"),
            acopytools=_as_dict(raw, "acopytools"),
            astorages=_as_dict(raw, "astorages"),
            params=_as_dict(raw, "params"),
            raw=dict(raw),
        )

    @property
    def stores_outputs(self) -> bool:
        """Whether the queue says where outputs go (``astorages`` for ``pw``, ``pl`` or
        ``write_lan``); without it outputs stay local, as in development runs."""
        return any(_storage_names(self.astorages.get(a)) for a in ("pw", "pl", "write_lan"))

    def state_error(self) -> PilotError | None:
        """Why this queue must not run jobs now, if it must not (checked at start-up)."""
        if self.status.lower() == "offline":
            return PilotError(ErrorCode.PANDAQUEUENOTONLINE, f"queue {self.name} status is {self.status}")
        if self.state.upper() != "ACTIVE":
            return PilotError(ErrorCode.PANDAQUEUENOTACTIVE, f"queue {self.name} state is {self.state}")
        return None

    @property
    def is_test(self) -> bool:
        """A queue in ``test`` status only takes test jobs; the job label is forced to ``test``."""
        return self.status.lower() == "test"


def select_queue(document: object, queue: str) -> Mapping[str, Any]:
    """Find ``queue`` in a queuedata document.

    Accepts the single-queue form (``{"nickname": ..., ...}``, as served at
    ``/cache/schedconfig/<queue>.all.json``) and the all-queues form
    (``{"<queue>": {...}, ...}``, as in CRIC's ``pandaqueues.json``).
    """
    if not isinstance(document, dict):
        raise PilotError(ErrorCode.QUEUEDATANOTOK, "queuedata is not a JSON object")
    if "nickname" in document or "panda_resource" in document:
        return document
    entry = document.get(queue)
    if isinstance(entry, dict):
        return entry
    raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queue {queue!r} is not described in the queuedata")


def parse_queuedata(data: bytes, queue: str) -> QueueData:
    """Parse queuedata bytes (from a file or a download) for ``queue``."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queuedata is not valid JSON: {exc}") from None
    return QueueData.from_dict(select_queue(document, queue), queue)


def load_queuedata_file(path: Path, queue: str) -> QueueData:
    """Read queuedata from a local file: QUEUEDATA if unreadable, QUEUEDATANOTOK if invalid."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PilotError(ErrorCode.QUEUEDATA, f"cannot read queuedata file {path}: {exc.strerror}") from None
    return parse_queuedata(data, queue)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))
