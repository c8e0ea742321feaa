"""Finished ranges, batched into archives, stored, then reported.

A batch closes when ``max_ranges`` outputs wait, or when the oldest has waited
``max_age`` seconds (the queue's ``zip_time_gap``), or on ``flush``.  At most
``max_in_flight`` batches are being archived and stored at once; outputs that finish
meanwhile wait and go into the next batch (so the batches grow with the rate, instead
of the backlog growing).  A range is reported finished only after its archive was
stored (and verified by the staging engine); an archive that could not be stored
fails its ranges, recoverably.  The outputs are removed once archived and the archive
once stored, so a long job does not fill the disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errorcodes import ErrorCode
from pilot.eventservice.archive import ArchiveMember, BuiltArchive, archive_name, build_archive
from pilot.eventservice.ranges import EventRange
from pilot.logs import pilot_observer
from pilot.server.events import ArchiveChunk, RangeStatus
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)


@record(frozen=True)
class StoredArchive:
    """Where an archive went: its remote URL and the object store's id (if the storage has one)."""

    url: str
    objstore_id: int


#: Stores an archive (local path, LFN, size, adler32): the staging engine's stage-out.
Store = Callable[[Path, str, int, str], Awaitable[StoredArchive]]


@record(frozen=True)
class DoneRange:
    """A range the payload finished: its output and the resources it said it used."""

    range: EventRange
    output: str
    cpu_s: float
    wall_s: float


class Batcher:
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        workdir: Path,
        store: Store,
        *,
        on_finished: Callable[[ArchiveChunk], None],
        on_failed: Callable[[Sequence[RangeStatus]], None],
        core_count: int | None = None,
        max_ranges: int = 100,
        max_age: float = 600.0,
        max_in_flight: int = 2,
    ) -> None:
        self._clock = clock
        self._in_thread = in_thread
        self._workdir = workdir
        self._store = store
        self._on_finished = on_finished
        self._on_failed = on_failed
        self._core_count = core_count
        self.max_ranges = max(1, max_ranges)
        self.max_age = max_age
        self.max_in_flight = max(1, max_in_flight)
        self._pending: list[DoneRange] = []
        self._timer: IDelayedCall | None = None
        self._in_flight: list[Deferred[None]] = []
        self._flushing = False
        self._overdue = False
        #: Set by ``cancel``: no batch starts any more.
        self.cancelled = False
        self.batches = 0
        self.bytes = 0
        self.archive_seconds = 0.0
        self.store_seconds = 0.0

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def add(self, done: DoneRange) -> None:
        self._pending.append(done)
        if len(self._pending) >= self.max_ranges:
            self._close()
        elif self._timer is None:
            self._timer = self._clock.callLater(self.max_age, self._aged)

    async def flush(self) -> None:
        """Close what waits, whatever its size, and wait for every batch to be stored."""
        self._flushing = True
        self._close()
        while (self._in_flight or self._pending) and not self.cancelled:
            await DeferredList(list(self._in_flight), consumeErrors=True)
            self._close()

    def cancel(self) -> None:
        """Stop the age timer and cancel the batches in flight (the job is being torn down).

        Their ranges, and those still waiting for a batch, are failed (recoverably).
        """
        self.cancelled = True
        self._stop_timer()
        waiting, self._pending = self._pending, []
        self._fail(waiting, ErrorCode.ESRECOVERABLE, "the archive was not stored before the job ended")
        for batch in list(self._in_flight):
            batch.cancel()

    def _aged(self) -> None:
        self._timer = None
        self._close(aged=True)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self, *, aged: bool = False) -> None:
        self._overdue = self._overdue or aged
        if self.cancelled:
            return
        if not self._pending:
            self._stop_timer()
            return
        if len(self._in_flight) >= self.max_in_flight:
            return  # taken up when a batch in flight ends
        if not (self._overdue or self._flushing or len(self._pending) >= self.max_ranges):
            return
        batch, self._pending = self._pending, []
        self._overdue = False
        self._stop_timer()
        running = Deferred.fromCoroutine(self._run(batch))
        self._in_flight.append(running)
        running.addBoth(self._ended, running, batch)

    def _ended(self, result: object, running: Deferred[None], batch: list[DoneRange]) -> None:
        self._in_flight.remove(running)
        if isinstance(result, Failure):
            # cancelled (the deadline) or a bug: the batch was neither reported nor failed
            if not result.check(CancelledError):
                log.failure("event ranges: a batch of {n} range(s) failed", result, n=len(batch))
            self._fail(batch, ErrorCode.ESRECOVERABLE, "the archive was not stored before the job ended")
        if self._pending and self._timer is None and not (self._flushing or self._overdue):
            self._timer = self._clock.callLater(self.max_age, self._aged)
        self._close()
        return None

    async def _run(self, batch: list[DoneRange]) -> None:
        lfn = archive_name(batch[0].range.range_id)
        members = [ArchiveMember(d.range.range_id, Path(d.output)) for d in batch]
        started = self._clock.seconds()
        try:
            built: BuiltArchive = await self._in_thread(
                build_and_clean, members, self._workdir, self._workdir / lfn
            )
        except CancelledError:
            raise
        except OSError as exc:
            self._fail(batch, ErrorCode.ESRECOVERABLE, f"archive {lfn} could not be written: {exc}")
            return
        self.archive_seconds += self._clock.seconds() - started
        if built.refused:
            self._fail(
                [d for d in batch if d.range.range_id in built.refused],
                ErrorCode.ESRECOVERABLE,
                "",
                diags=built.refused,
            )
        kept = [d for d in batch if d.range.range_id in set(built.members)]
        if not kept:
            await self._in_thread(_unlink, built.path)
            return
        started = self._clock.seconds()
        try:
            stored = await self._store(built.path, lfn, built.facts.size, built.facts.adler32)
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed store fails its ranges, not the job
            log.warn(
                "event ranges: archive {lfn} not stored: {error}",
                lfn=lfn,
                error=str(exc),
                event="es.store_failed",
            )
            self._fail(kept, ErrorCode.ESRECOVERABLE, f"archive {lfn} could not be stored: {exc}")
            await self._in_thread(_unlink, built.path)  # its ranges are failed: the disk is freed
            return
        self.store_seconds += self._clock.seconds() - started
        self.batches += 1
        self.bytes += built.facts.size
        await self._in_thread(_unlink, built.path)
        log.info(
            "event ranges: archive {lfn} stored: {n} range(s), {size} bytes",
            lfn=lfn,
            n=len(kept),
            size=built.facts.size,
            event="es.archive_stored",
        )
        self._on_finished(
            ArchiveChunk(
                lfn=lfn,
                fsize=built.facts.size,
                adler32=built.facts.adler32,
                num_events=sum(d.range.events for d in kept),
                objstore_id=stored.objstore_id,
                url=stored.url,
                ranges=tuple(
                    RangeStatus(
                        d.range.range_id,
                        "finished",
                        core_count=self._core_count,
                        cpu_seconds=round(d.cpu_s, 3),
                        objstore_id=stored.objstore_id,
                    )
                    for d in kept
                ),
            )
        )

    def _fail(
        self, batch: Sequence[DoneRange], code: ErrorCode, diag: str, *, diags: dict[str, str] | None = None
    ) -> None:
        self._on_failed(
            [
                RangeStatus(
                    d.range.range_id,
                    "failed",
                    error_code=int(code),
                    error_diag=(diags or {}).get(d.range.range_id, diag)[:500],
                )
                for d in batch
            ]
        )


def build_and_clean(members: Sequence[ArchiveMember], workdir: Path, destination: Path) -> BuiltArchive:
    """``build_archive``, then remove the outputs that went in (they are in the archive now)."""
    built = build_archive(members, workdir, destination)
    for path in built.files:
        _unlink(path)
    return built


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
