"""Reply bodies read with a limit enforced while reading; downloads streamed to disk.

The large-reply tests run a loopback HTTP server that makes its body lazily, one
chunk each time the socket can take more, and counts what it sent: a client that
stops reading at the limit makes the server stop soon after it, far below the
size it offered.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from pilot.server.api import ApiMode
from pilot.server.body import HIGH_WATER, MiB, stream_to_file
from pilot.server.client import (
    JobRequest,
    PandaClient,
    ReplyTooLarge,
    RetryPolicy,
    ServerProtocolError,
)
from pilot.server.connection import ServerConnection
from pilot.server.errors import LocalFileError
from pilot.util.checksum import RunningChecksum

reactor: Any = _reactor

ONCE = RetryPolicy(attempts=1, initial=0.0, jitter=lambda: 0.0)
CHUNK = 64 << 10


def pattern(offset: int, size: int) -> bytes:
    """Bytes of a deterministic stream (so the file's content can be checked)."""
    return bytes((offset + i) % 251 for i in range(size))


@implementer(IPullProducer)
class _LazyBody:
    """Writes ``size`` bytes one chunk per ``resumeProducing``: nothing is made ahead."""

    def __init__(self, request: Request, size: int, owner: _Streaming) -> None:
        self._request = request
        self._size = size
        self._owner = owner
        self._block = pattern(0, CHUNK)

    def resumeProducing(self) -> None:
        left = self._size - self._owner.sent
        if left <= 0:
            self._request.unregisterProducer()
            self._request.finish()
            return
        chunk = self._block[: min(CHUNK, left)]
        self._owner.advance(len(chunk))
        self._request.write(chunk)

    def stopProducing(self) -> None:
        self._owner.stopped = True


class _Streaming(Resource):
    """Serves ``size`` bytes lazily (chunked, or with ``Content-Length`` if ``declare``)."""

    isLeaf = True

    def __init__(
        self, size: int, *, declare: bool = False, content_type: bytes = b"application/json"
    ) -> None:
        super().__init__()
        self.size = size
        self.declare = declare
        self.content_type = content_type
        self.sent = 0
        self.stopped = False
        self.gone: Deferred[None] = Deferred()
        self.reached: Deferred[None] = Deferred()  # fires once 4 MiB are sent

    def advance(self, size: int) -> None:
        self.sent += size
        if self.sent >= 4 * MiB and not self.reached.called:
            self.reached.callback(None)

    def _finished(self, result: object) -> None:
        if not self.gone.called:
            self.gone.callback(None)

    def render(self, request: Request) -> int:
        request.setHeader(b"content-type", self.content_type)
        if self.declare:
            request.setHeader(b"content-length", str(self.size).encode())
        request.notifyFinish().addBoth(self._finished)
        request.registerProducer(_LazyBody(request, self.size, self), False)
        return NOT_DONE_YET


class LoopbackTests(TestCase):
    timeout = 120

    def serve(self, resource: Resource) -> str:
        site = Site(resource)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def client(self, url: str, clock: Any = None) -> PandaClient:
        connection = ServerConnection(reactor, None)
        self.addCleanup(connection.close)
        return PandaClient(
            connection.http, url, clock or Clock(), api=ApiMode.V1, connection=connection, retry=ONCE
        )

    async def test_400_mb_reply_stops_at_the_limit(self) -> None:
        """A 400 MB job reply is refused after about 16 MiB, with memory far below its size."""
        body = _Streaming(400 * MiB)
        client = self.client(self.serve(body))
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        failure = await self.assertFailure(
            Deferred.fromCoroutine(client.acquire_job(_REQUEST)), ReplyTooLarge
        )
        await body.gone
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        self.assertIsInstance(failure, ServerProtocolError)
        self.assertIn(f"reply larger than the limit of {16 * MiB} bytes", str(failure))
        self.assertIn("/api/v1/pilot/acquire_jobs", str(failure))
        self.assertLess(body.sent, 48 * MiB, "the server stopped soon after the limit")
        self.assertGreater(body.sent, 16 * MiB)
        self.assertLess(growth, 100 * 1024, "peak RSS grew by less than 100 MiB")

    async def test_declared_length_refused_unread(self) -> None:
        body = _Streaming(400 * MiB, declare=True)
        url = self.serve(body)
        client = self.client(url)
        await self.assertFailure(
            Deferred.fromCoroutine(client.get_bytes(f"{url}/doc", limit=MiB)), ReplyTooLarge
        )
        await body.gone
        self.assertLess(body.sent, 16 * MiB)

    async def test_download_streams_to_disk(self) -> None:
        size = 3 * MiB + 12345
        url = self.serve(_Streaming(size, content_type=b"application/octet-stream"))
        destination = Path(self.mktemp())
        result = await self.client(url).download(f"{url}/trf", destination, in_thread=self.in_thread())
        data = destination.read_bytes()
        self.assertEqual(len(data), size)
        self.assertEqual(data[:CHUNK], pattern(0, CHUNK))
        expected = RunningChecksum(md5=True)
        expected.update(data)
        self.assertEqual(result.facts, expected.facts())
        self.assertEqual(destination.stat().st_mode & 0o777, 0o600)

    async def test_download_over_the_limit_leaves_no_file(self) -> None:
        body = _Streaming(400 * MiB)
        url = self.serve(body)
        destination = Path(self.mktemp())
        await self.assertFailure(
            Deferred.fromCoroutine(
                self.client(url).download(
                    f"{url}/trf", destination, in_thread=self.in_thread(), limit=8 * MiB
                )
            ),
            ReplyTooLarge,
        )
        await body.gone
        self.assertFalse(destination.exists())
        self.assertLess(body.sent, 40 * MiB)

    async def test_cancelled_download_leaves_no_file(self) -> None:
        body = _Streaming(400 * MiB)
        url = self.serve(body)
        destination = Path(self.mktemp())
        pending = Deferred.fromCoroutine(
            self.client(url).download(f"{url}/trf", destination, in_thread=self.in_thread())
        )
        await body.reached  # 4 MiB sent: the download is under way
        pending.cancel()
        await self.assertFailure(pending, CancelledError)
        await body.gone
        self.assertFalse(destination.exists())
        self.assertLess(body.sent, 100 * MiB)

    def in_thread(self) -> Callable[..., Deferred[Any]]:
        def run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

        return run


_REQUEST = JobRequest(site_name="S", computing_element="S", prod_source_label="managed", node="n")


class _FakeTransport:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True


class _FakeResponse:
    length = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.transport = _FakeTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class _ManualWriter:
    """A ThreadRunner whose calls finish when the test says so (the disk is slow)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.max_in_flight = 0

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, args, d))
        self.max_in_flight = max(self.max_in_flight, len(self.pending))
        return d

    def finish_one(self) -> None:
        f, args, d = self.pending.pop(0)
        try:
            result = f(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting Deferred
            d.errback(exc)
        else:
            d.callback(result)


class BackpressureTests(SynchronousTestCase):
    """A slow disk pauses the transport; one write at a time; memory bounded."""

    def test_paused_while_the_writer_is_behind(self) -> None:
        writer = _ManualWriter()
        response = _FakeResponse()
        path = Path(self.mktemp())
        done = Deferred.fromCoroutine(stream_to_file(response, path, writer, 64 * MiB, "u"))  # type: ignore[arg-type]
        writer.finish_one()  # open
        sink = response.protocol
        block = pattern(0, CHUNK)
        for _ in range((HIGH_WATER // CHUNK) * 3):
            sink.dataReceived(block)
        self.assertEqual(response.transport.paused, 1, "paused once the queue passed the high-water mark")
        self.assertEqual(len(writer.pending), 1, "one write in flight at a time")
        while writer.pending:
            writer.finish_one()
        self.assertEqual(response.transport.resumed, 1)
        sink.connectionLost(_done_reason())
        while writer.pending:
            writer.finish_one()  # close
        facts = self.successResultOf(done)
        self.assertEqual(facts.size, (HIGH_WATER // CHUNK) * 3 * CHUNK)
        self.assertEqual(path.stat().st_size, facts.size)
        self.assertEqual(writer.max_in_flight, 1)

    def test_disk_error_is_local_and_removes_the_file(self) -> None:
        response = _FakeResponse()
        path = Path(self.mktemp())

        def failing(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if f.__name__ == "_write_chunks":
                raise_it: Deferred[Any] = Deferred()
                raise_it.errback(OSError(28, "No space left on device"))
                return raise_it
            return succeed(f(*args))

        done = Deferred.fromCoroutine(stream_to_file(response, path, failing, 64 * MiB, "https://x/trf"))  # type: ignore[arg-type]
        response.protocol.dataReceived(b"abc")
        failure = self.failureResultOf(done, LocalFileError)
        self.assertEqual(failure.value.errno, 28)
        self.assertIn("No space left on device", str(failure.value))
        self.assertTrue(response.transport.stopped)
        self.assertFalse(path.exists())


def _done_reason() -> Any:
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    return Failure(ResponseDone())
