"""Kept-alive connections, TLS session resumption and TLS failures, over real TLS on loopback.

The server is the development server (``pilot.devserver``) with its generated PKI,
or, for the race of a kept-alive connection the server closes, a small twisted.web
site on loopback.  The client's retry timing runs on a ``task.Clock`` that these
tests never advance: whatever is repeated here is repeated at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pilot.devserver.pki import generate_pki
from pilot.devserver.server import DevServer, start_dev_server
from pilot.model.credentials import Credentials
from pilot.server.api import ApiMode
from pilot.server.client import (
    JobRequest,
    JobUpdate,
    PandaClient,
    RetryPolicy,
    ServerUnavailable,
    StatusCode,
)
from pilot.server.connection import ServerConnection
from pilot.server.tls import PilotTLSPolicy

from .harness import bash_job
from .test_client import capture

reactor: Any = _reactor

QUEUE = "CONN_QUEUE"
REQUEST = JobRequest(site_name=QUEUE, computing_element=QUEUE, prod_source_label="managed", node="wn1")
ONCE = RetryPolicy(attempts=1, initial=0.0, jitter=lambda: 0.0)


class DevServerConnectionTests(TestCase):
    """Against the development server over TLS, with the pilot's TLS policy."""

    timeout = 60

    async def server(self, **kwargs: Any) -> DevServer:
        server = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: {}}, **kwargs)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def connection(self, credentials: Credentials) -> ServerConnection:
        connection = ServerConnection(reactor, PilotTLSPolicy(credentials))
        self.addCleanup(connection.close)
        return connection

    def client(self, server: DevServer, connection: ServerConnection, **kwargs: Any) -> PandaClient:
        return PandaClient(
            connection.http, server.url, Clock(), api=ApiMode.V1, connection=connection, retry=ONCE, **kwargs
        )

    async def test_one_connection_then_a_resumed_session(self) -> None:
        """N calls in a row share one connection and one full handshake; after the server
        closed the idle connection, the next call resumes the TLS session."""
        server = await self.server(idle_timeout=0.5, tls_sessions=True)
        (panda_id,) = await server.submit(bash_job(QUEUE, "-c true"))
        connection = self.connection(Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy))
        client = self.client(server, connection)
        result = await client.acquire_job(REQUEST)
        self.assertEqual([job["PandaID"] for job in result.jobs], [panda_id])
        for state in ("starting", "running", "running", "running", "running"):
            update = await client.update_job(JobUpdate(job_id=panda_id, state=state))
            self.assertEqual(update.status, StatusCode.SUCCESS)
        stats = connection.stats
        self.assertEqual(
            (stats.connections_opened, stats.full_handshakes, stats.resumed_handshakes), (1, 1, 0)
        )
        self.assertEqual(stats.requests, 6)

        await connection.next_close()  # the server's idle time-out (0.5 s)
        update = await client.update_job(JobUpdate(job_id=panda_id, state="running"))
        self.assertEqual(update.status, StatusCode.SUCCESS)
        self.assertEqual(
            (stats.connections_opened, stats.full_handshakes, stats.resumed_handshakes), (2, 1, 1)
        )
        # the resumed connection still authenticated the pilot (its DN came from the session)
        self.assertEqual((await server.job(panda_id))["jobStatus"], "running")

    async def test_no_factory_chatter(self) -> None:
        """Connections opened by ServerConnection log no "Starting/Stopping factory" lines."""
        server = await self.server()
        events = capture(self)
        connection = self.connection(Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy))
        await self.client(server, connection).update_job(JobUpdate(job_id=1, state="running"))
        await connection.close()
        chatter = [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
        self.assertEqual(chatter, [])
        self.assertEqual(connection.stats.connections_opened, 1)

    async def test_untrusted_server_is_a_handshake_failure_with_a_hint(self) -> None:
        server = await self.server()
        other = generate_pki(Path(self.mktemp()))  # a CA that did not sign the server
        connection = self.connection(Credentials(cacert=other.ca_cert, proxy=server.pki.client_proxy))
        # A job request is not idempotent, but a failed handshake proves nothing was sent,
        # so it is retried: wait for the retry's announcement, then let its delay pass.
        retrying: Deferred[LogEvent] = Deferred()

        def watch(event: LogEvent) -> None:
            if event.get("event") == "server.retry" and not retrying.called:
                # resume the test after the client has scheduled its retry on the clock
                reactor.callLater(0, retrying.callback, event)

        globalLogPublisher.addObserver(cast(ILogObserver, watch))
        self.addCleanup(globalLogPublisher.removeObserver, cast(ILogObserver, watch))
        clock = Clock()
        client = PandaClient(
            connection.http,
            server.url,
            clock,
            api=ApiMode.V1,
            connection=connection,
            retry=RetryPolicy(attempts=2, initial=5.0, jitter=lambda: 0.0),
        )
        pending = Deferred.fromCoroutine(client.acquire_job(REQUEST))
        announced = await retrying
        self.assertIn("check --cacert/--capath", announced["reason"])
        self.assertEqual(client.calls, 1)
        clock.advance(5.0)
        failure = await self.assertFailure(pending, ServerUnavailable)
        message = str(failure)
        self.assertEqual(client.calls, 2)
        self.assertIn("TLS handshake failed", message)
        self.assertIn("check --cacert/--capath (the server's CA is not trusted)", message)
        self.assertNotIn("may have been processed", message)
        self.assertEqual(message.count(server.url), 1, message)
        self.assertEqual(connection.stats.full_handshakes, 0)

    async def test_host_name_mismatch_is_named(self) -> None:
        server = await self.server(host="127.0.0.2")  # the certificate names localhost, 127.0.0.1, ::1
        connection = self.connection(Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy))
        client = self.client(server, connection)
        failure = await self.assertFailure(
            Deferred.fromCoroutine(client.acquire_job(REQUEST)), ServerUnavailable
        )
        message = str(failure)
        self.assertIn("not valid for the host name 127.0.0.2", message)
        self.assertIn("check the host name in the server URL", message)
        self.assertIn("(after 1 attempts)", message)


class _ClosesSecondRequest(Resource):
    """Answers, then drops the kept-alive connection when the next request arrives on it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.dropped = 0

    def render_POST(self, request: Request) -> bytes | int:
        self.requests.append(request.path.decode())
        if len(self.requests) == 2:
            self.dropped += 1
            request.channel.transport.loseConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        data = {"StatusCode": 0, "jobs": []} if b"acquire" in request.path else {"StatusCode": 0}
        return json.dumps({"success": True, "message": "", "data": data}).encode()


class StaleConnectionTests(TestCase):
    """The server closes a kept-alive connection just as the pilot reuses it."""

    timeout = 30

    async def client(self) -> tuple[PandaClient, _ClosesSecondRequest, ServerConnection]:
        resource = _ClosesSecondRequest()
        site = Site(resource)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connection = ServerConnection(reactor, None)
        self.addCleanup(connection.close)
        url = f"http://127.0.0.1:{port.getHost().port}"
        client = PandaClient(connection.http, url, Clock(), api=ApiMode.V1, connection=connection)
        return client, resource, connection

    async def test_update_repeated_at_once_on_a_fresh_connection(self) -> None:
        client, resource, connection = await self.client()
        await client.update_job(JobUpdate(job_id=1, state="running"))
        result = await client.update_job(JobUpdate(job_id=1, state="running"))  # dropped, repeated
        self.assertEqual(result.status, StatusCode.SUCCESS)
        self.assertEqual(len(resource.requests), 3)
        self.assertEqual(resource.dropped, 1)
        self.assertEqual(connection.stats.connections_opened, 2)

    async def test_job_request_not_repeated(self) -> None:
        """The dropped request may have dispatched a job: never ask twice."""
        client, resource, _connection = await self.client()
        await client.update_job(JobUpdate(job_id=1, state="running"))
        failure = await self.assertFailure(
            Deferred.fromCoroutine(client.acquire_job(REQUEST)), ServerUnavailable
        )
        self.assertIn("the server closed the kept-alive connection before replying", str(failure))
        self.assertIn("not repeated: the request may have been processed", str(failure))
        self.assertEqual(len(resource.requests), 2)
