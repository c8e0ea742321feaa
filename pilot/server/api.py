"""The PanDA server's two API generations (``panda-server-protocol.md`` section 0)."""

from __future__ import annotations

from enum import Enum


class ApiMode(Enum):
    """Which PanDA server API generation to speak."""

    V1 = "v1"
    LEGACY = "legacy"
    AUTO = "auto"
