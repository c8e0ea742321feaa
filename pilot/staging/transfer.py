"""What a transfer is: requests to copytools, their results, and staging errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field
from enum import Enum
from pathlib import Path
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.model.job import Checksum
from pilot.util.records import record


class Direction(Enum):
    IN = "in"
    OUT = "out"


class TransferError(PilotError):
    """A failed copy, with PanDA's code for it.

    ``missing`` marks "the file is not there" (a replica to skip, not a broken
    tool); ``retry_elsewhere`` says another replica or endpoint may still work.
    """

    def __init__(
        self, code: ErrorCode, detail: str, *, missing: bool = False, retry_elsewhere: bool = True
    ) -> None:
        super().__init__(code, detail)
        self.missing = missing
        self.retry_elsewhere = retry_elsewhere


@record(frozen=True)
class Attempt:
    """One way to move one file: a tool and the remote location it should use.

    ``remote`` is a URL for URL-based tools, ``scope:lfn`` (stage-in) or the RSE
    name (stage-out) for Rucio.  ``endpoint`` is the DDM endpoint (RSE) name.
    """

    tool: str
    remote: str
    endpoint: str
    domain: str = "lan"
    settings: Mapping[str, Any] = field(default_factory=dict)


@record(frozen=True)
class CopyRequest:
    """What a copytool is asked to do for one attempt."""

    direction: Direction
    local: Path
    remote: str
    lfn: str
    scope: str
    guid: str
    size: int | None
    checksum: Checksum | None
    endpoint: str
    timeout: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    token: str = ""
    dataset: str = ""
    progress: Callable[[int], None] | None = None

    @property
    def stage_in(self) -> bool:
        return self.direction is Direction.IN


@record(frozen=True)
class CopyResult:
    """What a copytool reports back (it raises TransferError on failure)."""

    remote_checksum: Checksum | None = None
    remote_url: str = ""
    verified_remotely: bool = False
    #: adler32 of the local file, when the tool computed it while the bytes went by
    #: (saves reading a large input a second time).
    local_checksum: Checksum | None = None


def timeout_for(
    size: int | None, *, base: float = 400.0, rate: float = 1e6, cap: float = 3 * 3600.0
) -> float:
    """Seconds allowed for a transfer of ``size`` bytes: grows with size, bounded."""
    return min(cap, base + (size or 0) / rate)
