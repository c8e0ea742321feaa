"""The copytools the pilot knows, by the names queuedata uses (``copytools``, ``acopytools``)."""

from __future__ import annotations

from collections.abc import Mapping

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.gcs import gs
from pilot.staging.tools.gfal import gfal
from pilot.staging.tools.local import cp, ln, mv
from pilot.staging.tools.lsm import lsm
from pilot.staging.tools.rucio import rucio
from pilot.staging.tools.s3 import objectstore, s3
from pilot.staging.tools.xrdcp import xrdcp

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
        builtin: list[ICopyTool] = [cp, mv, ln, xrdcp, gfal, lsm, s3, objectstore, gs, rucio]
        self._tools: dict[str, ICopyTool] = {t.name: t for t in builtin} if tools is None else dict(tools)

    def register(self, tool: ICopyTool) -> None:
        self._tools[tool.name] = tool

    def get(self, name: str) -> ICopyTool:
        tool = self._tools.get(ALIASES.get(name, name))
        if tool is None:
            raise PilotError(
                ErrorCode.UNKNOWNCOPYTOOL,
                f"copytool {name!r} is not known (known: {', '.join(sorted(self._tools))})",
            )
        return tool

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and ALIASES.get(name, name) in self._tools
