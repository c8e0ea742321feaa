"""Running transfers: attempts in order, in parallel, verified, timed, recorded.

For each file the engine tries its attempts (tool + replica/endpoint) in order
until one succeeds.  Each attempt has a time-out that grows with the file's size
(enforced on the injected clock by cancelling the tool's Deferred, which kills a
tool's process group); long transfers log their progress at a fixed interval.
Inputs are checked after the copy — size, then adler32 or md5 against the job
definition, computed in bounded steps in the checksum pool (or while the bytes
streamed in, ``follow.py``) — and a bad copy is deleted before the next attempt.
Outputs are checked at the far end where the tool can.  Up to ``parallel`` files
move at once (at most ``MAX_PARALLEL``, whatever the caller asks).  Every finished transfer goes to
the durable ``TransferRecord``; a file the record shows as already done (and still
intact) is not copied again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.logs import pilot_observer
from pilot.model.job import Checksum
from pilot.staging.follow import ChecksumFollower, checksum_file
from pilot.staging.interfaces import IBulkCopyTool
from pilot.staging.plan import FileTransfer
from pilot.staging.progress import Progress
from pilot.staging.record import RecordEntry, TransferRecord
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.transfer import Attempt, CopyRequest, CopyResult, Direction, TransferError, timeout_for
from pilot.util.checksum import FileFacts, file_facts
from pilot.util.threads import ThreadRunner

#: Inputs at least this large are checksummed while they are written (``follow.py``).
FOLLOW_THRESHOLD = 32 << 20

#: The most transfers at once, whatever the caller asks: the option is validated
#: upstream, this only keeps a bad value from starting hundreds of copytools.
MAX_PARALLEL = 64


def _facts_value(facts: FileFacts, algorithm: str) -> str | None:
    return facts.adler32 if algorithm == "adler32" else facts.md5


class StagingEngine:
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        registry: CopytoolRegistry,
        context: ToolContext,
        *,
        parallel: int = 4,
        progress_interval: float = 60.0,
        record: TransferRecord | None = None,
        timeout_base: float = 400.0,
        timeout_rate: float = 1e6,
        follow_threshold: int | None = FOLLOW_THRESHOLD,
        bulk_size: int = 32,
        checksum_runner: ThreadRunner | None = None,
    ) -> None:
        self.registry = registry
        self.context = context
        self.parallel = min(max(1, parallel), MAX_PARALLEL)
        if self.parallel != parallel:
            self.log.warn(
                "transfer parallelism {asked} out of range: using {used}",
                asked=parallel,
                used=self.parallel,
                event="transfer.parallelism_clamped",
            )
        #: Where checksums are read, in bounded steps (a small pool of its own in the
        #: pilot); the tools' short blocking calls stay on ``context.in_thread``.
        self.checksum_runner: ThreadRunner = checksum_runner or context.in_thread
        self.progress_interval = progress_interval
        self.follow_threshold = follow_threshold
        self.record = record
        self.timeout_base = timeout_base
        self.timeout_rate = timeout_rate
        self.bulk_size = bulk_size
        self._recorded: dict[tuple[str, str], RecordEntry] | None = None
        self._stopping = False

    @property
    def clock(self) -> Any:
        return self.context.clock

    async def run(self, transfers: Sequence[FileTransfer], *, stop_on_failure: bool = False) -> None:
        """Move every file; outcomes land on the FileTransfer objects (``done``/``error``).

        With ``stop_on_failure`` (stage-in: one missing input dooms the job) the
        remaining transfers are cancelled as soon as one file has failed for good.
        Cancelling the run cancels every transfer and raises CancelledError (it is
        never turned into transfer errors).
        """
        if self.record is not None and self._recorded is None:
            self._recorded = await self.context.in_thread(self.record.load)
        semaphore = DeferredSemaphore(self.parallel)
        pending: list[Deferred[None]] = []
        self._stopping = False

        def cancel_rest(_: object) -> None:
            self._stopping = True
            for d in pending:
                if not d.called:  # not started yet; running ones finish (their errors stay theirs)
                    d.cancel()

        for unit in self._units(transfers):
            d: Deferred[None] = semaphore.run(self._unit_deferred, unit)
            if stop_on_failure:
                d.addCallback(self._stop_others_if_failed, unit, cancel_rest)
            pending.append(d)
        cancelled: list[bool] = []

        def cancel_all(_: object) -> None:
            cancelled.append(True)
            self._stopping = True
            for d in pending:
                # the running ones too: a unit's Deferred has fired (the semaphore was
                # acquired) and waits on its transfer, which cancel() then cancels
                d.cancel()

        gathered = DeferredList(pending, consumeErrors=True)
        waiter: Deferred[object] = Deferred(cancel_all)
        gathered.addBoth(lambda _: None if waiter.called else waiter.callback(None))
        await waiter
        if cancelled:  # DeferredList swallows its members' CancelledError
            raise CancelledError()
        for transfer in transfers:
            if not transfer.done and transfer.error is None:
                code = (
                    ErrorCode.STAGEINFAILED
                    if transfer.direction is Direction.IN
                    else ErrorCode.STAGEOUTFAILED
                )
                transfer.error = TransferError(code, f"{transfer.lfn}: cancelled after another file failed")

    @staticmethod
    def _stop_others_if_failed(_: None, unit: list[FileTransfer], cancel_rest: Any) -> None:
        if any(t.error is not None and not t.done for t in unit):
            cancel_rest(None)

    # -- one file ------------------------------------------------------------------

    async def _transfer(
        self,
        transfer: FileTransfer,
        *,
        start: int = 0,
        errors: list[TransferError] | None = None,
        started: float | None = None,
    ) -> None:
        """Try ``transfer``'s attempts from ``start`` on until one works."""
        started = self.clock.seconds() if started is None else started
        errors = [] if errors is None else errors
        if start == 0 and await self._already_done(transfer):
            return
        for attempt in transfer.attempts[start:]:
            transfer.tries += 1
            try:
                result = await self._attempt(transfer, attempt)
            except TransferError as error:
                await self._failed_attempt(transfer, attempt, error, errors)
                if not error.retry_elsewhere:
                    break
                continue
            await self._succeeded(transfer, attempt, result, started)
            return
        transfer.duration = self.clock.seconds() - started
        transfer.error = self._final_error(transfer, errors)

    async def _failed_attempt(
        self, transfer: FileTransfer, attempt: Attempt, error: TransferError, errors: list[TransferError]
    ) -> None:
        errors.append(error)
        self.log.warn(
            "{lfn}: {direction} with {tool} from {endpoint} failed: {code} {detail}",
            lfn=transfer.lfn,
            direction="stage-in" if transfer.direction is Direction.IN else "stage-out",
            tool=attempt.tool,
            endpoint=attempt.endpoint or attempt.remote,
            code=error.code.name,
            detail=error.detail,
            event="transfer.attempt_failed",
        )
        await self._discard_partial(transfer)

    async def _succeeded(
        self, transfer: FileTransfer, attempt: Attempt, result: CopyResult, started: float
    ) -> None:
        transfer.done = True
        transfer.used = attempt
        transfer.remote_url = result.remote_url or attempt.remote
        transfer.verified_remotely = result.verified_remotely
        transfer.duration = self.clock.seconds() - started
        transfer.error = None
        self.log.info(
            "{lfn}: {direction} done with {tool} ({endpoint}) in {seconds:.2f} s",
            lfn=transfer.lfn,
            direction="stage-in" if transfer.direction is Direction.IN else "stage-out",
            tool=attempt.tool,
            endpoint=attempt.endpoint,
            seconds=transfer.duration,
            size=transfer.size,
            event="transfer.done",
        )
        await self._remember(transfer)

    # -- bulk stage-in -------------------------------------------------------------

    def _units(self, transfers: Sequence[FileTransfer]) -> list[list[FileTransfer]]:
        """Transfers grouped into batches for bulk-capable tools; one transfer per unit otherwise."""
        units: list[list[FileTransfer]] = []
        groups: dict[tuple[str, str, str], list[FileTransfer]] = {}
        for transfer in transfers:
            first = transfer.attempts[0] if transfer.attempts else None
            bulk = (
                self.bulk_size > 1
                and transfer.direction is Direction.IN
                and first is not None
                and IBulkCopyTool.providedBy(self.registry.get(first.tool))
                and first.remote.rsplit("/", 1)[-1] == transfer.lfn
            )
            if not bulk or first is None:
                units.append([transfer])
                continue
            key = (first.tool, first.endpoint, str(transfer.local.parent))
            group = groups.setdefault(key, [])
            if not group:
                units.append(group)
            group.append(transfer)
            if len(group) == self.bulk_size:
                del groups[key]
        return units

    def _unit_deferred(self, unit: list[FileTransfer]) -> Deferred[None]:
        if self._stopping:
            return succeed(None)  # another file failed for good: this one is not started
        if len(unit) == 1:
            return Deferred.fromCoroutine(self._transfer(unit[0]))
        return Deferred.fromCoroutine(self._bulk(unit))

    async def _bulk(self, batch: list[FileTransfer]) -> None:
        started = self.clock.seconds()
        pending = [t for t in batch if not await self._already_done(t)]
        if len(pending) < 2:
            for transfer in pending:
                await self._transfer(transfer, start=0)
            return
        attempts = [t.attempts[0] for t in pending]
        tool = IBulkCopyTool(self.registry.get(attempts[0].tool))
        timeout = timeout_for(
            sum(t.size or 0 for t in pending), base=self.timeout_base, rate=self.timeout_rate
        )
        requests = [self._request(t, a, timeout, None) for t, a in zip(pending, attempts, strict=True)]
        running: Deferred[list[CopyResult | TransferError]] = maybeDeferred(
            tool.copy_in_bulk, requests, self.context
        )
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            running.cancel()

        timer = self.clock.callLater(timeout, expire)
        self.log.info(
            "stage-in of {n} files with {tool} in one batch from {endpoint}",
            n=len(pending),
            tool=attempts[0].tool,
            endpoint=attempts[0].endpoint,
            event="transfer.batch",
        )
        try:
            results = await running
        except CancelledError:
            if not expired:
                raise
            timed_out = TransferError(
                ErrorCode.STAGEINTIMEOUT, f"batch of {len(pending)} did not finish within {timeout:.0f} s"
            )
            results = [timed_out] * len(pending)
        except TransferError as error:
            results = [error] * len(pending)
        finally:
            if timer.active():
                timer.cancel()
        for transfer, attempt, result in zip(pending, attempts, results, strict=True):
            transfer.tries += 1
            errors: list[TransferError] = []
            if isinstance(result, CopyResult):
                try:
                    await self._verify_input(transfer, result)
                except TransferError as error:
                    result = error
                else:
                    await self._succeeded(transfer, attempt, result, started)
                    continue
            await self._failed_attempt(transfer, attempt, result, errors)
            await self._transfer(transfer, start=1, errors=errors, started=started)

    def _final_error(self, transfer: FileTransfer, errors: list[TransferError]) -> TransferError:
        stage_in = transfer.direction is Direction.IN
        if not errors:
            code = ErrorCode.STAGEINFAILED if stage_in else ErrorCode.STAGEOUTFAILED
            return TransferError(code, f"{transfer.lfn}: no attempt could be made")
        if stage_in and all(e.missing for e in errors):
            places = {a.endpoint or a.remote for a in transfer.attempts}
            code = ErrorCode.REPLICANOTFOUND if len(places) > 1 else ErrorCode.MISSINGINPUTFILE
            return TransferError(
                code, f"{transfer.lfn} not found at {', '.join(sorted(places))}", missing=True
            )
        # The most telling failure: a checksum or time-out beats "missing" elsewhere.
        for error in errors:
            if not error.missing:
                return error
        return errors[-1]

    async def _attempt(self, transfer: FileTransfer, attempt: Attempt) -> CopyResult:
        tool = self.registry.get(attempt.tool)
        timeout = timeout_for(transfer.size, base=self.timeout_base, rate=self.timeout_rate)
        started = self.clock.seconds()
        progress = Progress(transfer, attempt, started, self.clock)
        request = self._request(transfer, attempt, timeout, progress)
        method = tool.copy_in if transfer.direction is Direction.IN else tool.copy_out
        follower = self._follower(transfer)
        if follower is not None:
            follower.start()
        running: Deferred[CopyResult] = maybeDeferred(method, request, self.context)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            running.cancel()

        timer = self.clock.callLater(timeout, expire)
        reporter = LoopingCall(progress.report)
        reporter.clock = self.clock
        reporter.start(self.progress_interval, now=False)
        succeeded = False
        try:
            result = await running
            succeeded = True
        except CancelledError:
            if expired:
                code = (
                    ErrorCode.STAGEINTIMEOUT
                    if transfer.direction is Direction.IN
                    else ErrorCode.STAGEOUTTIMEOUT
                )
                raise TransferError(
                    code, f"{transfer.lfn}: {attempt.tool} did not finish within {timeout:.0f} s"
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
            reporter.stop()
            if follower is not None and not succeeded:
                follower.abandon()
        if transfer.direction is Direction.IN:
            followed = await follower.finish() if follower is not None else None
            await self._verify_input(transfer, result, followed)
        elif result.remote_checksum is not None and transfer.checksum is not None:
            if result.remote_checksum != transfer.checksum:
                code = (
                    ErrorCode.PUTADMISMATCH
                    if transfer.checksum.algorithm == "adler32"
                    else ErrorCode.PUTMD5MISMATCH
                )
                raise TransferError(
                    code,
                    f"{transfer.lfn}: remote {result.remote_checksum.value} != local {transfer.checksum.value}",
                )
        return result

    def _request(
        self, transfer: FileTransfer, attempt: Attempt, timeout: float, progress: Progress | None
    ) -> CopyRequest:
        return CopyRequest(
            direction=transfer.direction,
            local=transfer.local,
            remote=attempt.remote,
            lfn=transfer.lfn,
            scope=transfer.scope,
            guid=transfer.guid,
            size=transfer.size,
            checksum=transfer.checksum,
            endpoint=attempt.endpoint,
            timeout=timeout,
            settings=attempt.settings,
            token=transfer.token,
            dataset=transfer.dataset,
            progress=progress.update if progress is not None else None,
        )

    def _follower(self, transfer: FileTransfer) -> ChecksumFollower | None:
        """A checksum-while-copying follower for a large verified input, else None.

        The follower holds no thread while it waits (``follow.py``), so it works with
        any runner, a synchronous one included; ``follow_threshold=None`` turns it off.
        """
        if (
            self.follow_threshold is None
            or transfer.direction is not Direction.IN
            or transfer.checksum is None
            or (transfer.size or 0) < self.follow_threshold
        ):
            return None
        return ChecksumFollower(
            transfer.local, self.clock, self.checksum_runner, md5=transfer.checksum.algorithm == "md5"
        )

    async def _verify_input(
        self, transfer: FileTransfer, result: CopyResult, followed: FileFacts | None = None
    ) -> None:
        expected = transfer.checksum
        try:
            size = os.stat(transfer.local).st_size
        except OSError:
            raise TransferError(
                ErrorCode.STAGEINFAILED, f"{transfer.lfn}: the copy is not in the work directory"
            ) from None
        if transfer.size is not None and size != transfer.size:
            raise TransferError(
                ErrorCode.STAGEINFAILED, f"{transfer.lfn}: size {size} != expected {transfer.size}"
            )
        if expected is None:
            return
        actual: Checksum
        if expected.algorithm == "adler32" and result.local_checksum is not None:
            actual = result.local_checksum
        elif followed is not None and _facts_value(followed, expected.algorithm) == expected.value:
            actual = expected  # read while it was written, and the name still holds those bytes
        else:
            read = await checksum_file(
                transfer.local, self.clock, self.checksum_runner, md5=expected.algorithm == "md5"
            )
            if read is None or read.size != size:
                raise TransferError(
                    ErrorCode.STAGEINFAILED, f"{transfer.lfn}: the copy changed while it was verified"
                )
            value = read.adler32 if expected.algorithm == "adler32" else (read.md5 or "")
            actual = Checksum(expected.algorithm, value)
        if actual != expected:
            code = ErrorCode.GETADMISMATCH if expected.algorithm == "adler32" else ErrorCode.GETMD5MISMATCH
            raise TransferError(
                code, f"{transfer.lfn}: {expected.algorithm} {actual.value} != expected {expected.value}"
            )

    async def _discard_partial(self, transfer: FileTransfer) -> None:
        if transfer.direction is Direction.IN:
            await self.context.in_thread(_unlink, transfer.local)

    # -- the durable record ---------------------------------------------------------

    async def _already_done(self, transfer: FileTransfer) -> bool:
        entry = (self._recorded or {}).get((transfer.direction.value, transfer.lfn))
        if entry is None:
            return False
        if transfer.direction is Direction.OUT:
            if transfer.checksum is None or entry.adler32 != transfer.checksum.value:
                return False
        else:
            # reads the whole file (and may copy it): long work, so the checksum pool's
            if not await self.checksum_runner(_same_file, entry, transfer):
                return False
        transfer.done = True
        transfer.from_record = True
        transfer.remote_url = entry.remote
        transfer.used = Attempt(entry.tool, entry.remote, entry.endpoint)
        self.log.info(
            "{lfn}: already {what} according to the transfer record",
            lfn=transfer.lfn,
            what="staged in" if transfer.direction is Direction.IN else "stored",
            event="transfer.recorded",
        )
        return True

    async def _remember(self, transfer: FileTransfer) -> None:
        if self.record is None or transfer.used is None:
            return
        checksum = transfer.checksum
        adler = checksum.value if checksum is not None and checksum.algorithm == "adler32" else None
        entry = RecordEntry(
            direction=transfer.direction.value,
            lfn=transfer.lfn,
            scope=transfer.scope,
            size=transfer.size,
            adler32=adler,
            tool=transfer.used.tool,
            remote=transfer.remote_url,
            endpoint=transfer.used.endpoint,
            local=str(transfer.local),
            seconds=round(transfer.duration, 3),
            time=self.clock.seconds(),
        )
        await self.record.append(entry)


def _unlink(path: Any) -> None:
    try:
        if os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


def _same_file(entry: RecordEntry, transfer: FileTransfer) -> bool:
    """Whether a recorded input is still intact; copied into the new work directory if elsewhere."""
    source = entry.local
    if not os.path.isfile(source):
        return False
    facts = file_facts(type(transfer.local)(source))
    if transfer.size is not None and facts.size != transfer.size:
        return False
    if (
        transfer.checksum is not None
        and transfer.checksum.algorithm == "adler32"
        and facts.adler32 != transfer.checksum.value
    ):
        return False
    if os.path.abspath(source) != os.path.abspath(transfer.local):
        try:
            os.link(source, transfer.local)
        except OSError:
            shutil.copyfile(source, transfer.local)
    return True
