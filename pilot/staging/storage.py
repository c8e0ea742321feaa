"""Storage endpoints (CRIC "DDM endpoints"): where files live and how to reach them.

The storage description (``--storagedata FILE|URL``) is a JSON object keyed by
endpoint name, as in CRIC's ``ddmendpoints.json``.  For each endpoint the pilot
needs its protocols per activity — an endpoint URL (``root://host:1094``), a path
prefix, and settings some protocols need (S3 credentials, the GCS API address) —
and whether paths are deterministic (Rucio's hashed layout).  Two CRIC layouts of
protocols are read: ``arprotocols`` (``{"read_lan": [{"endpoint", "path", ...}]}``)
and ``aprotocols`` (``{"r": [[endpoint, priority, path], ...], "w": [...]}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.util.records import record

#: Activities as CRIC names them, and the short names used by ``aprotocols``.
READ_ACTIVITIES = ("read_lan", "read_wan", "read_lan_analysis")
WRITE_ACTIVITIES = ("write_lan", "write_wan")
_SHORT = {"r": ("read_lan", "read_wan"), "w": ("write_lan", "write_wan")}


class StorageDataError(PilotError):
    """The storage description is unusable."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.BADQUEUECONFIGURATION, detail)


@record(frozen=True)
class Protocol:
    """One way into an endpoint: ``endpoint`` + ``path`` + the file's relative path is its URL."""

    endpoint: str
    path: str = "/"
    priority: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return self.endpoint.split("://", 1)[0].lower() if "://" in self.endpoint else "file"

    def url(self, relative: str) -> str:
        """The full URL of ``relative`` (no leading slash) under this protocol."""
        scheme, sep, rest = self.endpoint.partition("://")
        endpoint = f"{scheme}{sep}{rest.rstrip('/')}" if sep else self.endpoint.rstrip("/")
        prefix = "/" + self.path.strip("/") if self.path.strip("/") else ""
        if self.scheme == "root":
            # XRootD URLs carry the absolute path after a double slash.
            return f"{endpoint}/{prefix}/{relative}"
        return f"{endpoint}{prefix}/{relative}"


@record(frozen=True)
class Endpoint:
    name: str
    is_deterministic: bool = True
    token: str = ""
    site: str = ""
    kind: str = ""
    protocols: Mapping[str, tuple[Protocol, ...]] = field(default_factory=dict)
    #: The storage's numeric id in the information system (``objstoreID`` of ES archives).
    resource_id: int | None = None

    def protocols_for(self, activity: str) -> tuple[Protocol, ...]:
        """Protocols for ``activity`` (read_lan, write_wan...), best first."""
        return self.protocols.get(activity, ())


def _protocol(entry: Any, where: str) -> Protocol:
    if isinstance(entry, Mapping):
        endpoint = entry.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise StorageDataError(f"{where}: protocol without an endpoint")
        settings = entry.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise StorageDataError(f"{where}: 'settings' must be an object")
        priority = entry.get("priority", entry.get("order", 0))
        return Protocol(endpoint, str(entry.get("path") or "/"), int(priority or 0), dict(settings))
    if isinstance(entry, list | tuple) and len(entry) >= 3 and isinstance(entry[0], str):
        return Protocol(entry[0], str(entry[2] or "/"), int(entry[1] or 0))
    raise StorageDataError(f"{where}: unreadable protocol {entry!r}")


def parse_endpoint(name: str, raw: Mapping[str, Any]) -> Endpoint:
    protocols: dict[str, list[Protocol]] = {}
    arprotocols = raw.get("arprotocols") or {}
    if not isinstance(arprotocols, Mapping):
        raise StorageDataError(f"endpoint {name}: 'arprotocols' must be an object")
    for activity, entries in arprotocols.items():
        if not isinstance(entries, list):
            raise StorageDataError(f"endpoint {name}: arprotocols[{activity}] must be a list")
        protocols.setdefault(activity, []).extend(
            _protocol(e, f"endpoint {name} arprotocols[{activity}]") for e in entries
        )
    aprotocols = raw.get("aprotocols") or {}
    if not isinstance(aprotocols, Mapping):
        raise StorageDataError(f"endpoint {name}: 'aprotocols' must be an object")
    for short, entries in aprotocols.items():
        if not isinstance(entries, list):
            raise StorageDataError(f"endpoint {name}: aprotocols[{short}] must be a list")
        parsed = [_protocol(e, f"endpoint {name} aprotocols[{short}]") for e in entries]
        for activity in _SHORT.get(short, (short,)):
            protocols.setdefault(activity, []).extend(parsed)
    ordered = {a: tuple(sorted(ps, key=lambda p: p.priority)) for a, ps in protocols.items()}
    deterministic = raw.get("is_deterministic", True)
    return Endpoint(
        name=name,
        is_deterministic=bool(deterministic)
        if not isinstance(deterministic, str)
        else deterministic.lower() == "true",
        token=str(raw.get("token") or ""),
        site=str(raw.get("rc_site") or raw.get("site") or ""),
        kind=str(raw.get("type") or ""),
        protocols=ordered,
        resource_id=_resource_id(raw.get("id")),
    )


def _resource_id(value: Any) -> int | None:
    """CRIC's numeric id of the endpoint; anything else (absent, text, bool) is no id."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@record(frozen=True)
class StorageData:
    """All known endpoints, by name."""

    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)

    def get(self, name: str) -> Endpoint | None:
        return self.endpoints.get(name)

    @classmethod
    def from_document(cls, document: object) -> StorageData:
        if not isinstance(document, Mapping):
            raise StorageDataError("storage description is not a JSON object")
        endpoints = {}
        for name, raw in document.items():
            if not isinstance(raw, Mapping):
                raise StorageDataError(f"endpoint {name}: not an object")
            endpoints[name] = parse_endpoint(str(raw.get("name") or name), raw)
        return cls(endpoints)

    @classmethod
    def from_bytes(cls, data: bytes) -> StorageData:
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StorageDataError(f"storage description is not valid JSON: {exc}") from None
        return cls.from_document(document)

    @classmethod
    def from_file(cls, path: Path) -> StorageData:
        try:
            return cls.from_bytes(path.read_bytes())
        except OSError as exc:
            raise StorageDataError(f"cannot read storage description {path}: {exc.strerror}") from None
