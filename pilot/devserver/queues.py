"""Queue descriptions ("queuedata") served at ``/cache/schedconfig/<queue>.all.json``.

The pilot reads its queue's CRIC description at start-up (timefloor, limits,
copytools, state).  The real PanDA server serves these as static files from its
cache; here each configured queue has one, either given as a file or generated
with development defaults.  The dispatcher also asks the registry for a queue's
``status`` (a ``test`` queue only hands out test jobs, as on the server) and
``type`` (``unified`` queues change one label rule).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

#: Queue value types: whatever JSON holds.
QueueData = dict[str, object]


def default_queuedata(name: str, *, timefloor: int = 0) -> QueueData:
    """A minimal, valid CRIC-style description of an online development queue (times in CRIC units)."""
    return {
        "nickname": name,
        "panda_resource": name,
        "atlas_site": name,
        "site": name,
        "state": "ACTIVE",
        "status": "online",
        "type": "unified",
        "resource_type": "grid",
        "timefloor": timefloor,  # minutes
        "maxtime": 86400,  # seconds
        "corecount": 1,
        "maxrss": 2000,  # MB
        "maxwdir": 16384,  # MB
        "maxinputsize": 14336,  # MB
        "pledgedcpu": -1,
        "catchall": "",
        "environ": "",
        "container_type": "",
        "container_options": "",
        "direct_access_lan": False,
        "direct_access_wan": False,
        "copytools": {"mv": {"setup": ""}},
        "acopytools": {"pr": ["mv"], "pw": ["mv"], "pl": ["mv"]},
        "astorages": {},
        "params": {},
        "is_cvmfs": False,
    }


def load_queuedata_file(path: Path) -> dict[str, QueueData]:
    """Queues described in a file: one queue (``{"nickname": ...}``) or ``{"<queue>": {...}, ...}``."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read queuedata file {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"queuedata file {path} does not hold a JSON object")
    if "nickname" in document:
        return {str(document["nickname"]): document}
    queues: dict[str, QueueData] = {}
    for name, description in document.items():
        if not isinstance(description, dict):
            raise ValueError(f"queuedata file {path}: queue {name!r} is not a JSON object")
        queues[name] = {"nickname": name, **description}
    return queues


class QueueRegistry(Mapping[str, QueueData]):
    """The configured queues: each one's generated defaults overlaid with what was given."""

    def __init__(
        self, queues: Mapping[str, Mapping[str, object]] | None = None, *, timefloor: int = 0
    ) -> None:
        self._queues: dict[str, QueueData] = {}
        for name, given in (queues or {}).items():
            self._queues[name] = {**default_queuedata(name, timefloor=timefloor), **given}

    def __getitem__(self, name: str) -> QueueData:
        return self._queues[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._queues)

    def __len__(self) -> int:
        return len(self._queues)

    def status(self, name: str) -> str | None:
        queue = self._queues.get(name)
        value = queue.get("status") if queue else None
        return value if isinstance(value, str) else None

    def is_unified(self, name: str) -> bool:
        """``SiteSpec.is_grandly_unified``: type ``unified`` or ``grandly_unified`` in the catchall."""
        queue = self._queues.get(name)
        if queue is None:
            return False
        catchall = queue.get("catchall")
        return queue.get("type") == "unified" or (isinstance(catchall, str) and "grandly_unified" in catchall)

    def document(self, name: str) -> bytes | None:
        """The JSON served for ``<name>.all.json``, or None for an unknown queue."""
        queue = self._queues.get(name)
        return None if queue is None else json.dumps(queue, indent=1).encode()
