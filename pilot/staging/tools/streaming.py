"""Streaming file bodies for HTTP-based copytools (S3, GCS): progress and digests on the way.

Downloads go to disk through the pilot's bounded writer (``pilot.server.body``): the
reactor only queues chunks, a worker thread writes them and computes adler32, and the
connection is paused while the disk is behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

import treq
from twisted.web.iweb import IResponse

from pilot.errorcodes import ErrorCode
from pilot.errors import DISK_FULL_ERRNOS
from pilot.model.job import Checksum
from pilot.server.body import stream_to_file
from pilot.server.errors import LocalFileError
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError
from pilot.util.threads import ThreadRunner


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


async def body_snippet(response: IResponse) -> str:
    """The start of a response body, for an error message (servers explain refusals there)."""
    content: bytes = await treq.content(response)
    return content[:300].decode("utf-8", errors="replace")


#: Largest object a GET may bring (the limit guards the disk against a runaway body).
DOWNLOAD_LIMIT = 1 << 40


async def receive_download(
    response: IResponse,
    request: CopyRequest,
    error: Callable[[int, str, CopyRequest], TransferError],
    in_thread: ThreadRunner,
) -> CopyResult:
    """A GET's response into ``request.local`` (adler32 on the way), or ``error`` unless 200."""
    if response.code != 200:
        raise error(response.code, await body_snippet(response), request)
    try:
        facts = await stream_to_file(
            response, request.local, in_thread, DOWNLOAD_LIMIT, request.remote, request.progress
        )
    except LocalFileError as exc:
        code = ErrorCode.NOLOCALSPACE if exc.errno in DISK_FULL_ERRNOS else ErrorCode.STAGEINFAILED
        raise TransferError(code, str(exc), retry_elsewhere=False) from None
    return CopyResult(local_checksum=Checksum("adler32", facts.adler32), remote_url=request.remote)
