"""The pilot's HTTP(S) client: kept-alive connections, resumed TLS sessions, counted.

A job talks to the server a handful of times in a few seconds (acquire, starting,
running, final update), then every few minutes (heartbeats); consecutive jobs do
the same.  ``ServerConnection`` keeps an idle connection for ``idle_timeout``
seconds, so the calls of a job share one TLS connection while the server keeps it
open, and gives every new connection the server's last TLS session, so that after
the server closed an idle connection the next one costs a resumed handshake, not a
full one (``TLSSessions`` in ``pilot.server.tls``).

Everything is built from public Twisted API: ``Agent.usingEndpointFactory`` with an
endpoint that wraps TLS around ``HostnameEndpoint`` itself, and puts a thin protocol
between TLS and HTTP that

* counts connections, full and resumed handshakes and requests (``ConnectionStats``,
  for the job summary and the benchmarks);
* explains a lost connection to the retry policy: ``TLSHandshakeFailed`` when the
  handshake failed (nothing was sent), ``StaleConnection`` when a reused connection
  closed before any byte of the reply (the server's keep-alive time-out raced our
  request);
* starts and stops the HTTP client factory without Twisted's "Starting factory"/
  "Stopping factory" log lines (two lines per connection otherwise), by calling
  the factory's ``startFactory``/``stopFactory`` hooks rather than ``doStart``/``doStop``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from pilot.server.errors import StaleConnection, TLSHandshakeFailed
from pilot.server.tls import ResumingCreator, TLSSessions, keep_resumable, was_resumed
from pilot.server.transport import ssl_error_text
from pilot.util.records import record

#: Seconds an idle connection is kept.  Long enough for the calls of a job and the next
#: job's request; short enough that a middlebox silently dropping idle connections
#: (often after minutes) does not turn the next job request into a lost reply.
IDLE_TIMEOUT = 60.0


@record
class ConnectionStats:
    """What the connections of one ``ServerConnection`` cost so far."""

    connections_opened: int = 0
    connections_closed: int = 0
    full_handshakes: int = 0
    resumed_handshakes: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ServerConnection:
    """An ``HTTPClient`` over a pool of kept-alive, session-resuming connections.

    ``policy`` is the TLS policy (``PilotTLSPolicy``) for https URLs; http URLs are
    served too (the dev server's plain mode, tests).  ``close`` closes the idle
    connections (call it in ``stopService``).
    """

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS | None,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        connect_timeout: float = 30.0,
        per_host: int = 2,
    ) -> None:
        self.stats = ConnectionStats()
        self.sessions = TLSSessions()
        self._closed_waiters: list[Deferred[None]] = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.maxPersistentPerHost = per_host
        self.pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]  # a float works
        # Our retry policy decides what may be repeated (a POST may be, if idempotent).
        self.pool.retryAutomatically = False
        endpoints = _EndpointFactory(reactor, policy, self, connect_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)  # type: ignore[no-untyped-call]
        self.http = HTTPClient(self.agent)

    def drop_idle(self) -> Deferred[None]:
        """Close the idle connections, so that the next request opens a fresh one."""
        closing: Deferred[None] = self.pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closing.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """Close the idle connections at shutdown (in-flight requests are the caller's)."""
        return self.drop_idle()

    def next_close(self) -> Deferred[None]:
        """Fires when a connection closes next (benchmarks and tests wait on it)."""
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def _connection_closed(self) -> None:
        self.stats.connections_closed += 1
        waiting, self._closed_waiters = self._closed_waiters, []
        for waiter in waiting:
            waiter.callback(None)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS | None, owner: ServerConnection, timeout: float
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._owner = owner
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        creator = None
        if uri.scheme == b"https":
            if self._policy is None:
                raise ValueError(f"no TLS policy for https://{uri.host.decode('ascii', 'replace')}")
            host = uri.host.decode("ascii")
            creator = self._owner.sessions.resuming(
                self._policy.creatorForNetloc(uri.host, uri.port), host, uri.port
            )
        return _ObservedEndpoint(endpoint, creator, self._owner)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """TCP (+ TLS) with ``_Observed`` between the transport and the HTTP protocol."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, creator: ResumingCreator | None, owner: ServerConnection
    ) -> None:
        self._endpoint = endpoint
        self._creator = creator
        self._owner = owner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        observed = _ObservedFactory(protocolFactory, self._owner, self._creator)
        outer: IProtocolFactory = observed
        if self._creator is not None:
            outer = TLSMemoryBIOFactory(self._creator, True, observed)
        connecting: Deferred[IProtocol] = self._endpoint.connect(outer)
        return connecting.addCallback(_innermost)


def _innermost(protocol: IProtocol) -> IProtocol:
    """The HTTP protocol inside TLS and ``_Observed`` (what the pool expects back)."""
    while isinstance(protocol, ProtocolWrapper):
        protocol = protocol.wrappedProtocol
    return protocol


class _ObservedFactory(WrappingFactory["_Observed"]):
    noisy = False

    def __init__(
        self, wrapped: IProtocolFactory, owner: ServerConnection, creator: ResumingCreator | None
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.owner = owner
        self.creator = creator

    def buildProtocol(self, addr: object) -> _Observed:
        return _Observed(self, self.wrappedFactory.buildProtocol(addr))

    # The pool's factory is a plain ``Factory`` whose ``doStart``/``doStop`` log a line
    # each (``noisy``); its start/stop hooks are what it needs, so call those.
    def doStart(self) -> None:
        if not self.numPorts and isinstance(self.wrappedFactory, Factory):
            self.wrappedFactory.startFactory()  # type: ignore[no-untyped-call]
        elif not self.numPorts:
            self.wrappedFactory.doStart()
        self.numPorts += 1

    def doStop(self) -> None:
        if self.numPorts == 0:
            return
        self.numPorts -= 1
        if self.numPorts:
            return
        if isinstance(self.wrappedFactory, Factory):
            self.wrappedFactory.stopFactory()  # type: ignore[no-untyped-call]
        else:
            self.wrappedFactory.doStop()


@implementer(IHandshakeListener)
class _Observed(ProtocolWrapper):
    """Counts what happens on one connection and explains why it was lost."""

    factory: _ObservedFactory

    def __init__(self, factory: _ObservedFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self._stats = factory.owner.stats
        self._tls = factory.creator is not None
        self._handshake_done = not self._tls
        self._resumed = False
        self._confirmed = False  # the server sent application data: the handshake is good both ways
        self._requests = 0
        self._awaiting_reply = False

    def makeConnection(self, transport: ITransport) -> None:
        self._stats.connections_opened += 1
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self._resumed = was_resumed(self.transport.getHandle())  # type: ignore[union-attr]
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def write(self, data: bytes) -> None:
        self._request_bytes()
        super().write(data)  # type: ignore[no-untyped-call]

    def writeSequence(self, data: list[bytes]) -> None:
        self._request_bytes()
        super().writeSequence(data)  # type: ignore[no-untyped-call]

    def _request_bytes(self) -> None:
        if not self._awaiting_reply:  # the first bytes of a new request
            self._awaiting_reply = True
            self._requests += 1
            self._stats.requests += 1

    def dataReceived(self, data: bytes) -> None:
        if not self._confirmed:
            self._confirm()
        self._awaiting_reply = False
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _confirm(self) -> None:
        self._confirmed = True
        if not self._tls:
            return
        if self._resumed:
            self._stats.resumed_handshakes += 1
        else:
            self._stats.full_handshakes += 1
        creator = self.factory.creator
        assert creator is not None
        # TLS 1.3 tickets arrive after the handshake, before the first reply bytes.
        creator.remember(self.transport.getHandle())  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        explained = self._explain(reason)
        if self._tls and self._confirmed and not reason.check(SSL.Error, VerificationError):
            keep_resumable(self.transport.getHandle())  # type: ignore[union-attr]
        super().connectionLost(explained)  # type: ignore[no-untyped-call]
        self.factory.owner._connection_closed()  # after the pool has forgotten the connection

    def _explain(self, reason: Failure) -> Failure:
        if self._tls and not self._confirmed:
            if not self._handshake_done or reason.check(SSL.Error, VerificationError):
                return Failure(_handshake_failure(reason, self.factory.creator))
        if self._requests >= 2 and self._awaiting_reply:
            return Failure(StaleConnection("the server closed the kept-alive connection before replying"))
        return reason


def _handshake_failure(reason: Failure, creator: ResumingCreator | None) -> TLSHandshakeFailed:
    host = creator.host if creator is not None else "the server"
    error = reason.value
    if isinstance(error, VerificationError):
        return TLSHandshakeFailed(
            f"the server's certificate is not valid for the host name {host}",
            "check the host name in the server URL",
        )
    if isinstance(error, SSL.Error):
        text = ssl_error_text(error)
        if "certificate verify failed" in text:
            return TLSHandshakeFailed(
                f"the certificate of {host} is not trusted ({text})",
                "check --cacert/--capath (the server's CA is not trusted)",
            )
        if "alert" in text:
            return TLSHandshakeFailed(
                f"{host} refused the handshake ({text})",
                "check the X.509 proxy (X509_USER_PROXY) and that the server trusts its CA",
            )
        return TLSHandshakeFailed(f"{text} with {host}")
    return TLSHandshakeFailed(
        f"the connection to {host} closed during the handshake ({error or type(error).__name__})"
    )
