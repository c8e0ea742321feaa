"""The event-service calls' values: what the pilot asks for and reports about event ranges.

Ranges come from ``getEventRanges`` (legacy) or ``/api/v1/event/acquire_event_ranges``;
statuses go back with ``updateEventRanges`` / ``update_event_ranges`` (both take the
list as a JSON *string*, ``eventRanges`` / ``event_ranges``, and a ``version``:
0 = a flat list of range statuses, 1 = chunks, each an archive (``zipFile``) with the
ranges whose outputs it holds), or range by range with ``update_single_event_range``.
The encodings and the server's quirks are ``pilot.server.event_calls``'s business;
these values are what the rest of the pilot sees.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

from pilot.server.errors import ServerError
from pilot.util.records import record

#: A range's statuses as the server knows them (``task_event_module.updateEventRanges``).
RANGE_STATES = ("running", "transferring", "finished", "failed", "fatal")

#: ``pathConvention`` for archives of pre-merge outputs, as ATLAS reports them.
PATH_CONVENTION = 1000


@record(frozen=True)
class EventRangeRequest:
    """Ask for up to ``n_ranges`` ranges of job ``job_id`` (``jobsetID``, ``jediTaskID``)."""

    job_id: int
    jobset_id: int
    task_id: int | None
    n_ranges: int


@record(frozen=True)
class RangeStatus:
    """One range's new status (a version-0 item, or an item of a version-1 chunk)."""

    range_id: str
    status: str
    error_code: int | None = None
    error_diag: str | None = None
    core_count: int | None = None
    cpu_seconds: float | None = None
    objstore_id: int | None = None

    def wire(self) -> dict[str, Any]:
        """The item as the server reads it (absent fields are left out, not sent as null)."""
        item: dict[str, Any] = {"eventRangeID": self.range_id, "eventStatus": self.status}
        optional = (
            ("errorCode", self.error_code),
            ("errorDiag", self.error_diag),
            ("coreCount", self.core_count),
            ("cpuConsumptionTime", self.cpu_seconds),
            ("objstoreID", self.objstore_id),
        )
        item.update({name: value for name, value in optional if value is not None})
        return item


@record(frozen=True)
class ArchiveChunk:
    """A version-1 chunk: one archive of range outputs in the object store, and its ranges."""

    lfn: str
    fsize: int
    adler32: str
    num_events: int
    ranges: tuple[RangeStatus, ...]
    #: The storage's numeric id; the server rolls a chunk without one back (with the report).
    objstore_id: int | None = None
    path_convention: int = PATH_CONVENTION
    #: Where the archive is (never sent to the server): a file source (Harvester) declares
    #: the archive for stage-out by its local path.
    url: str | None = None

    def wire(self) -> dict[str, Any]:
        zip_file: dict[str, Any] = {
            "lfn": self.lfn,
            "fsize": self.fsize,
            "adler32": self.adler32,
            "numEvents": self.num_events,
            "pathConvention": self.path_convention,
        }
        if self.objstore_id is not None:  # the pilot always has one (see ``JobStaging.store_archive``)
            zip_file["objstoreID"] = self.objstore_id
        return {"zipFile": zip_file, "eventRanges": [r.wire() for r in self.ranges]}


@record(frozen=True)
class EventRangeUpdate:
    """One report for job ``panda_id``: version 0 (``statuses``) or version 1 (``chunks``)."""

    panda_id: int
    statuses: tuple[RangeStatus, ...] = ()
    chunks: tuple[ArchiveChunk, ...] = ()

    @property
    def version(self) -> int:
        return 1 if self.chunks else 0

    @property
    def range_ids(self) -> tuple[str, ...]:
        return tuple(r.range_id for r in self.ranges)

    @property
    def ranges(self) -> tuple[RangeStatus, ...]:
        """Every range's status, in the order sent (a chunk's items in their chunk's place)."""
        if self.chunks:
            return tuple(r for chunk in self.chunks for r in chunk.ranges)
        return self.statuses

    def only(self, range_ids: Collection[str]) -> EventRangeUpdate:
        """The same report with only the ranges in ``range_ids`` (chunks left empty dropped)."""
        keep = set(range_ids)
        if not self.chunks:
            return replace(self, statuses=tuple(r for r in self.statuses if r.range_id in keep))
        chunks = []
        for chunk in self.chunks:
            ranges = tuple(r for r in chunk.ranges if r.range_id in keep)
            if ranges:
                chunks.append(chunk if len(ranges) == len(chunk.ranges) else replace(chunk, ranges=ranges))
        return replace(self, chunks=tuple(chunks))

    def wire(self) -> list[dict[str, Any]]:
        """The ``eventRanges`` list, before it is made a JSON string."""
        if self.chunks:
            return [chunk.wire() for chunk in self.chunks]
        return [status.wire() for status in self.statuses]


@record(frozen=True)
class EventUpdateResult:
    """What the server made of a report.

    ``accepted``: per range id, True/False/None as the server's ``Returns`` said (None
    where the server said nothing, or the outcome had to be confirmed another way);
    ``command``: a command for the job (``tobekilled``, ``softkill``...), if any;
    ``how``: how the report went (``"bulk"``, ``"single"``, ``"confirmed-after-500"``:
    read back with a status query after an ambiguous failure), for the log and the summary.
    """

    accepted: dict[str, bool | None]
    command: str | None = None
    how: str = "bulk"


class RangesNotRecorded(ServerError):
    """The server recorded only some ranges of a report, perhaps none: send the others again.

    Raised by a source that read back what the server recorded (after panda-server
    1.0.4's HTTP 500, which comes whether the report was committed or rolled back).
    ``settled`` holds the outcomes of the ranges that must not be sent again (True:
    recorded as reported; False: the server will never take that status; None: a
    status it does not record) and the command, if one came.  Every other range of
    the report was not recorded, or its fate is still unknown; the source reads it
    back before it sends it again, so resending all of them is safe.
    """

    def __init__(self, message: str, settled: EventUpdateResult) -> None:
        super().__init__(message)
        self.settled = settled
