"""Streaming file bodies for HTTP-based copytools (S3, GCS): progress and digests on the way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO

import treq
from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from pilot.model.job import Checksum
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError
from pilot.util.checksum import RunningChecksum


class CountingReader:
    """A file wrapper for ``FileBodyProducer`` that reports bytes read."""

    def __init__(self, handle: IO[bytes], progress: Callable[[int], None] | None) -> None:
        self._handle = handle
        self._progress = progress
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self.sent += len(chunk)
        if self._progress is not None:
            self._progress(self.sent)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()


class StreamToFile:
    """Receives a response body into a file, counting bytes and computing adler32 on the way."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None) -> None:
        self._handle = path.open("wb")
        self._progress = progress
        self._running = RunningChecksum()

    @property
    def received(self) -> int:
        return self._running.size

    @property
    def adler32(self) -> Checksum:
        return Checksum("adler32", self._running.facts().adler32)

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self._running.update(data)
        if self._progress is not None:
            self._progress(self._running.size)

    def close(self) -> None:
        self._handle.close()


async def download_body(
    response: IResponse, path: Path, progress: Callable[[int], None] | None
) -> StreamToFile:
    """Write the body of ``response`` to ``path``; the file is closed whatever happens."""
    sink = StreamToFile(path, progress)
    try:
        collected: Deferred[None] = treq.collect(response, sink.write)
        await collected
    finally:
        sink.close()
    return sink


async def body_snippet(response: IResponse) -> str:
    """The start of a response body, for an error message (servers explain refusals there)."""
    content: bytes = await treq.content(response)
    return content[:300].decode("utf-8", errors="replace")


async def receive_download(
    response: IResponse, request: CopyRequest, error: Callable[[int, str, CopyRequest], TransferError]
) -> CopyResult:
    """A GET's response into ``request.local`` (adler32 on the way), or ``error`` unless 200."""
    if response.code != 200:
        raise error(response.code, await body_snippet(response), request)
    sink = await download_body(response, request.local, request.progress)
    return CopyResult(local_checksum=sink.adler32, remote_url=request.remote)
