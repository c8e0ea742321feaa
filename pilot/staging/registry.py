"""The copytools the pilot knows, by the names queuedata uses (``copytools``, ``acopytools``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.staging.interfaces import ICopyTool

#: Built-in tools: name → (module, attribute).  A tool's module is imported when a job
#: first needs it, so the pilot does not pay (in start-up time and memory) for object-store
#: and Rucio clients a queue never uses.
BUILTIN: dict[str, tuple[str, str]] = {
    "cp": ("pilot.staging.tools.local", "cp"),
    "mv": ("pilot.staging.tools.local", "mv"),
    "ln": ("pilot.staging.tools.local", "ln"),
    "xrdcp": ("pilot.staging.tools.xrdcp", "xrdcp"),
    "gfal": ("pilot.staging.tools.gfal", "gfal"),
    "lsm": ("pilot.staging.tools.lsm", "lsm"),
    "s3": ("pilot.staging.tools.s3", "s3"),
    "objectstore": ("pilot.staging.tools.s3", "objectstore"),
    "gs": ("pilot.staging.tools.gcs", "gs"),
    "rucio": ("pilot.staging.tools.rucio", "rucio"),
}

#: Alternative names queues use for the same tool.
ALIASES = {
    "gfalcopy": "gfal",
    "gfal-copy": "gfal",
    "xrootd": "xrdcp",
    "symlink": "ln",
    "copy": "cp",
    "gcs": "gs",
}


class CopytoolRegistry:
    """Name → ICopyTool."""

    def __init__(self, tools: Mapping[str, ICopyTool] | None = None) -> None:
        self._lazy: dict[str, tuple[str, str]] = dict(BUILTIN) if tools is None else {}
        self._tools: dict[str, ICopyTool] = {} if tools is None else dict(tools)

    def register(self, tool: ICopyTool) -> None:
        self._tools[tool.name] = tool
        self._lazy.pop(tool.name, None)

    def get(self, name: str) -> ICopyTool:
        key = ALIASES.get(name, name)
        tool = self._tools.get(key)
        if tool is None and key in self._lazy:
            module, attribute = self._lazy.pop(key)
            tool = self._tools[key] = getattr(importlib.import_module(module), attribute)
        if tool is None:
            raise PilotError(
                ErrorCode.UNKNOWNCOPYTOOL,
                f"copytool {name!r} is not known (known: {', '.join(sorted(self.names))})",
            )
        return tool

    @property
    def names(self) -> set[str]:
        return set(self._tools) | set(self._lazy)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and ALIASES.get(name, name) in self.names
