"""Reading a reply body with a size limit enforced while it arrives, into memory or a file.

``treq.content`` buffers a whole body before anyone can look at its size: a 400 MB
reply cost the pilot 1.7 GB of memory before the old after-the-fact check refused
it.  Here the limit is checked on every chunk; once it is passed the transport is
told to stop producing (the connection is closed, never returned to the pool) and
the reader fails with ``ReplyTooLarge``.  A declared ``Content-Length`` above the
limit is refused before a byte of the body is read.

``stream_to_file`` writes a body to disk as it arrives without blocking the reactor:
chunks go to a queue that one worker at a time drains into the file (through the
caller's ``ThreadRunner``, so the writes stay in order), adler32 and md5 are computed
on the way, and the transport is paused while the queue holds more than
``HIGH_WATER`` bytes, so a fast server and a slow disk cannot fill the memory.
Failure or cancellation removes the partial file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from pilot.server.errors import LocalFileError, ReplyTooLarge
from pilot.util.checksum import FileFacts, RunningChecksum
from pilot.util.threads import ThreadRunner

MiB = 1 << 20

#: Default limits: replies of API calls, and documents (queuedata, storage data, transformations).
API_REPLY_LIMIT = 16 * MiB
DOCUMENT_LIMIT = 64 * MiB

#: Bytes queued for the file writer above which the transport is paused.
HIGH_WATER = 4 * MiB


def _too_large(what: str, limit: int) -> ReplyTooLarge:
    return ReplyTooLarge(f"{what}: reply larger than the limit of {limit} bytes; not read further")


def _declared_too_large(response: IResponse, limit: int) -> bool:
    length = response.length
    return length is not UNKNOWN_LENGTH and isinstance(length, int) and length > limit


class _Refuse(Protocol):
    """Takes a body it must not read: stops the transport at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class _Collector(Protocol):
    """Collects a body in memory up to ``limit`` bytes."""

    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._what = what
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.finished.errback(_too_large(self._what, self._limit))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            body, self._chunks = b"".join(self._chunks), []
            self.finished.callback(body)
        else:
            self.finished.errback(reason)

    def _cancel(self, finished: Deferred[bytes]) -> None:
        self._chunks.clear()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


async def read_body(response: IResponse, limit: int, what: str) -> bytes:
    """The whole body of ``response``, or ReplyTooLarge as soon as it passes ``limit`` bytes."""
    if _declared_too_large(response, limit):
        response.deliverBody(_Refuse())  # type: ignore[no-untyped-call]
        raise _too_large(what, limit)
    collector = _Collector(limit, what)
    response.deliverBody(collector)  # type: ignore[no-untyped-call]
    return await collector.finished


class _FileSink(Protocol):
    """Feeds a body to a file through one worker at a time, pausing the transport when behind."""

    def __init__(
        self,
        handle: BinaryIO,
        in_thread: ThreadRunner,
        limit: int,
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._handle = handle
        self._progress = progress
        self._in_thread = in_thread
        self._limit = limit
        self._what = what
        self._queue: list[bytes] = []
        self._queued = 0
        self._size = 0
        self._writing: Deferred[None] | None = None
        self._paused = False
        self._ended = False
        self._idle: list[Deferred[None]] = []
        self.checksum = RunningChecksum(md5=True)
        self.finished: Deferred[FileFacts] = Deferred(self._cancel)

    # -- the body as it arrives ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.finished.errback(_too_large(self._what, self._limit))
            return
        if self._progress is not None:
            self._progress(self._size)
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._pump()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._ended = True
            self._pump()
        else:
            self._queue, self._queued = [], 0
            self.finished.errback(reason)

    # -- the writer ------------------------------------------------------------------

    def _pump(self) -> None:
        if self._writing is not None or self.finished.called:
            return
        if not self._queue:
            if self._ended:
                self.finished.callback(self.checksum.facts())
            return
        chunks, self._queue, self._queued = self._queue, [], 0
        writing = self._in_thread(_write_chunks, self._handle, self.checksum, chunks)
        self._writing = writing
        writing.addCallbacks(self._written, self._write_failed)

    def _written(self, _: None) -> None:
        self._writing = None
        self._wake_idle()
        if self._paused and not self.finished.called and self._queued <= HIGH_WATER // 2:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self._pump()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        self._wake_idle()
        if not self.finished.called:
            self._stop()
            error = failure.value
            errno = error.errno if isinstance(error, OSError) else None
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            self.finished.errback(LocalFileError(f"{self._what}: cannot write the download: {reason}", errno))

    # -- stopping --------------------------------------------------------------------

    def _stop(self) -> None:
        self._queue, self._queued = [], 0
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel(self, finished: Deferred[FileFacts]) -> None:
        self._stop()

    def _wake_idle(self) -> None:
        waiting, self._idle = self._idle, []
        for waiter in waiting:
            waiter.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires when no write is in flight (then the file may be closed or removed)."""
        waiter: Deferred[None] = Deferred()
        if self._writing is None:
            waiter.callback(None)
        else:
            self._idle.append(waiter)
        return waiter


def _write_chunks(handle: BinaryIO, checksum: RunningChecksum, chunks: list[bytes]) -> None:
    for chunk in chunks:
        handle.write(chunk)
        checksum.update(chunk)


def _open_new(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _close(handle: BinaryIO) -> None:
    handle.close()


def _close_and_remove(handle: BinaryIO | None, path: Path) -> None:
    try:
        if handle is not None:
            handle.close()
    finally:
        path.unlink(missing_ok=True)


async def stream_to_file(
    response: IResponse,
    path: Path,
    in_thread: ThreadRunner,
    limit: int,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> FileFacts:
    """Write the body of ``response`` to ``path`` (created 0600); its size and checksums.

    ``progress`` is told the bytes received so far, on the reactor, as chunks arrive.

    On any failure, and on cancellation, the partial file is removed before the
    failure propagates.
    """
    if _declared_too_large(response, limit):
        response.deliverBody(_Refuse())  # type: ignore[no-untyped-call]
        raise _too_large(what, limit)
    try:
        handle = await in_thread(_open_new, path)
    except OSError as exc:
        response.deliverBody(_Refuse())  # type: ignore[no-untyped-call]
        raise LocalFileError(f"{what}: cannot create {path}: {exc.strerror}", exc.errno) from None
    sink = _FileSink(handle, in_thread, limit, what, progress)
    response.deliverBody(sink)  # type: ignore[no-untyped-call]
    try:
        facts = await sink.finished
        try:
            await in_thread(_close, handle)
        except OSError as exc:  # the last buffered bytes could not be written
            raise LocalFileError(f"{what}: cannot write the download: {exc.strerror}", exc.errno) from None
    except BaseException:
        await sink.idle()
        await in_thread(_close_and_remove, handle, path)
        raise
    return facts
