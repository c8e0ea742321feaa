"""A fault-injecting HTTPS proxy between a pilot and the dev server.

The pilot talks to the proxy as it would to the PanDA server (same CA, same host
name, its own X.509 proxy); the proxy ends TLS with the dev server's certificate,
reads each HTTP request, and either forwards it to the dev server (a new TLS
connection per request, presenting the user's proxy) or breaks it as a ``Rule``
says:

``Status(code)``
    answers ``code`` at once; the server never sees the request.
``Slow(seconds)``
    forwards the request; the reply is held back ``seconds``.
``Truncate()``
    forwards the request; the reply is cut in the middle of its body (then FIN).
``Reset()``
    resets the connection (RST) when the request arrives; the server never sees it.
``Hold(forward)``
    never replies (with ``forward``, the server gets and applies the request first).
``BreakTLS(connections)``
    forwards the request and replies, closes the connection, then answers the next
    ``connections`` connections with bytes that are not TLS at all.

Rules match on the call (``acquire_jobs``, ``update_job``, ``schedconfig`` ...), the
update's state and how many matching requests to let through first (``skip``).  Each
rule applies ``times`` times; ``rule.hit(n)`` fires when it has been applied n times.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from pilot.devserver.auth import ServerTLS
from pilot.devserver.server import DevServer
from pilot.model.credentials import Credentials
from pilot.server.tls import PilotTLSPolicy

#: What a broken TLS peer answers to a ClientHello.
NOT_TLS = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\nthis is not TLS\r\n"

# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    code: int
    body: bytes = b"Service Unavailable"


@dataclass(frozen=True)
class Slow:
    seconds: float


@dataclass(frozen=True)
class Truncate:
    pass


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Hold:
    forward: bool = False


@dataclass(frozen=True)
class BreakTLS:
    connections: int


Action = Status | Slow | Truncate | Reset | Hold | BreakTLS


# -- HTTP framing ---------------------------------------------------------------------------


@dataclass
class Message:
    """One HTTP/1.1 request or response as bytes, split into head and body."""

    head: bytes
    body: bytes
    start_line: str
    headers: dict[str, str]

    @property
    def raw(self) -> bytes:
        return self.head + self.body


def _parse_chunked(data: bytes) -> int | None:
    """Length of a complete chunked body at the start of ``data``, None if incomplete."""
    at = 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        size = int(data[at:end].split(b";")[0].strip() or b"0", 16)
        at = end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", at - 2)
            return None if trailer_end < 0 else trailer_end + 4
        at += size + 2
        if at > len(data):
            return None


def parse_message(data: bytes, *, response: bool, closed: bool = False) -> tuple[Message, bytes] | None:
    """A complete message at the start of ``data`` and what follows it; None if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[: end + 4]
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    rest = data[end + 4 :]
    status = int(lines[0].split()[1]) if response else 0
    length: int
    if response and (100 <= status < 200 or status in (204, 304)):
        length = 0
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        chunked = _parse_chunked(rest)
        if chunked is None:
            return None
        length = chunked
    elif "content-length" in headers:
        length = int(headers["content-length"])
    elif response:
        if not closed:
            return None
        length = len(rest)  # delimited by the end of the connection
    else:
        length = 0
    if len(rest) < length:
        return None
    return Message(head, rest[:length], lines[0], headers), rest[length:]


@dataclass
class Request:
    """What the proxy knows about a request: its call, and for updates the state and job."""

    message: Message
    call: str
    state: str | None = None
    panda_id: int | None = None


def describe_request(message: Message) -> Request:
    target = message.start_line.split()[1] if len(message.start_line.split()) > 1 else ""
    path = target.split("?")[0]
    call = "schedconfig" if "/schedconfig/" in path else path.rstrip("/").rsplit("/", 1)[-1]
    state: str | None = None
    panda_id: int | None = None
    body = message.body
    if body:
        try:
            if body[:2] == b"\x1f\x8b":
                body = gzip.decompress(body)
            document = json.loads(body)
        except (OSError, ValueError):
            document = None
        if isinstance(document, dict):
            found = document.get("job_status", document.get("state"))
            state = found if isinstance(found, str) else None
            job = document.get("job_id", document.get("jobId"))
            try:
                panda_id = int(job) if job is not None else None
            except (TypeError, ValueError):
                panda_id = None
    return Request(message, call, state, panda_id)


# -- rules ----------------------------------------------------------------------------------


@dataclass
class Rule:
    """Break ``times`` requests of ``call`` (in ``state``), after letting ``skip`` through."""

    call: str
    action: Action
    state: str | None = None
    skip: int = 0
    times: int = 1
    seen: int = 0
    applied: int = 0
    #: Requests under this rule the server answered (when the action forwards them).
    answered: int = 0
    _waiters: list[tuple[int, Deferred[None]]] = field(default_factory=list)
    _answer_waiters: list[Deferred[None]] = field(default_factory=list)

    def matches(self, request: Request) -> bool:
        return request.call == self.call and (self.state is None or request.state == self.state)

    def take(self, request: Request) -> bool:
        """Whether this rule breaks ``request`` (counting it either way)."""
        if not self.matches(request) or self.applied >= self.times:
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        self.applied += 1
        for waiter in [w for w in self._waiters if w[0] <= self.applied]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)
        return True

    def note_answered(self) -> None:
        self.answered += 1
        waiting, self._answer_waiters = self._answer_waiters, []
        for waiter in waiting:
            waiter.callback(None)

    def server_answered(self) -> Deferred[None]:
        """Fires once the server has answered a request this rule forwarded."""
        waiting: Deferred[None] = Deferred()
        if self.answered:
            waiting.callback(None)
        else:
            self._answer_waiters.append(waiting)
        return waiting

    def hit(self, count: int = 1) -> Deferred[None]:
        """Fires once the rule has been applied ``count`` times."""
        waiting: Deferred[None] = Deferred()
        if self.applied >= count:
            waiting.callback(None)
        else:
            self._waiters.append((count, waiting))
        return waiting


# -- the proxy ------------------------------------------------------------------------------


class _Backend(Protocol):
    """One forwarded request: write it, collect the whole reply, hand it over."""

    def __init__(self, request: bytes, done: Callable[[Message | None], None]) -> None:
        self._request = request
        self._done = done
        self._buffer = b""
        self._finished = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        parsed = parse_message(self._buffer, response=True)
        if parsed is not None and not self._finished:
            self._finished = True
            assert self.transport is not None
            self.transport.loseConnection()
            self._done(parsed[0])

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        if not self._finished:
            self._finished = True
            parsed = parse_message(self._buffer, response=True, closed=True)
            self._done(parsed[0] if parsed is not None else None)


class _NotTLS(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(NOT_TLS)
        self.transport.loseConnection()


class _ClientSide(Protocol):
    """The pilot's side of one connection (inside TLS)."""

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy
        self._buffer = b""
        self._busy = False
        self._gone = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._next()

    def connectionMade(self) -> None:
        self._proxy.connections.add(self)

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        self._gone = True
        self._proxy.connections.discard(self)

    def _next(self) -> None:
        if self._busy or self._gone:
            return
        parsed = parse_message(self._buffer, response=False)
        if parsed is None:
            return
        message, self._buffer = parsed
        self._busy = True
        request = describe_request(message)
        rule = self._proxy.rule_for(request)
        action = rule.action if rule is not None else None
        self._proxy.log.append((request.call, request.state, type(action).__name__ if action else "forward"))
        self._handle(request, rule)

    def _handle(self, request: Request, rule: Rule | None) -> None:
        action = rule.action if rule is not None else None
        if isinstance(action, Status):
            self._reply(_status_reply(action.code, action.body))
        elif isinstance(action, Reset):
            self._reset()
        elif isinstance(action, Hold) and not action.forward:
            pass  # never answered
        else:
            self._proxy.forward(request.message.raw, lambda reply: self._forwarded(reply, rule))

    def _forwarded(self, reply: Message | None, rule: Rule | None) -> None:
        action = rule.action if rule is not None else None
        if rule is not None and reply is not None:
            rule.note_answered()
        if self._gone:
            return
        if reply is None:
            self._close(abort=True)
        elif isinstance(action, Slow):
            self._proxy.later(action.seconds, self._reply, reply.raw)
        elif isinstance(action, Truncate):
            assert self.transport is not None
            self.transport.write(reply.head + reply.body[: max(1, len(reply.body) // 2)])
            self._close(abort=False)
        elif isinstance(action, Hold):
            pass  # the server acted; its reply never comes
        elif isinstance(action, BreakTLS):
            self._reply(reply.raw)
            self._proxy.break_tls(action.connections)
            self._close(abort=False)
        else:
            self._reply(reply.raw)

    def _reply(self, data: bytes) -> None:
        if self._gone:
            return
        assert self.transport is not None
        self.transport.write(data)
        self._busy = False
        self._next()

    def _close(self, *, abort: bool) -> None:
        transport: Any = self.transport
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def _reset(self) -> None:
        """RST: linger 0 on the TCP socket under TLS, then close."""
        tls = self.transport
        tcp = getattr(tls, "transport", None)
        handle = getattr(tcp, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if tcp is not None:
            tcp.abortConnection()
        else:
            self._close(abort=True)


def _status_reply(code: int, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {code} Fault\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class _Listening(Factory):
    """Hands each new connection to TLS, or (while TLS is broken) to the not-TLS peer."""

    noisy = False

    def __init__(self, proxy: FaultProxy, tls: TLSMemoryBIOFactory) -> None:
        self._proxy = proxy
        self._tls = tls

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self._proxy.broken_tls > 0:
            self._proxy.broken_tls -= 1
            self._proxy.broken_connections += 1
            self._proxy.log.append(("connection", None, "BreakTLS"))
            return _NotTLS()
        built: Protocol | None = self._tls.buildProtocol(addr)
        return built


class _Inner(Factory):
    noisy = False

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def buildProtocol(self, addr: Any) -> Protocol:
        return _ClientSide(self._proxy)


class FaultProxy:
    """See the module docstring.  ``start`` listens on a free loopback port."""

    def __init__(self, reactor: Any, server: DevServer) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.server = server
        self.rules: list[Rule] = []
        self.broken_tls = 0
        self.broken_connections = 0
        self.connections: set[_ClientSide] = set()
        self._later: list[Any] = []
        #: (call, state, action) per request, and a line per broken TLS connection.
        self.log: list[tuple[str, str | None, str]] = []
        self._port: IListeningPort | None = None
        policy = PilotTLSPolicy(Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy))
        self._creator = policy.creatorForNetloc(b"localhost", server.port)

    @property
    def url(self) -> str:
        assert self._port is not None
        address: Any = self._port.getHost()
        return f"https://localhost:{address.port}"

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    async def start(self) -> None:
        tls = TLSMemoryBIOFactory(ServerTLS(self.server.pki), False, _Inner(self))
        tls.doStart()
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(_Listening(self, tls))

    async def stop(self) -> None:
        """Stop listening; cut the connections still open (held replies) and pending delays."""
        for call in self._later:
            if call.active():
                call.cancel()
        for connection in list(self.connections):
            transport: Any = connection.transport
            if transport is not None:
                transport.abortConnection()
        if self._port is not None:
            port, self._port = self._port, None
            stopping = port.stopListening()
            if stopping is not None:
                await stopping

    def later(self, seconds: float, f: Callable[..., object], *args: object) -> None:
        self._later.append(self.clock.callLater(seconds, f, *args))

    def rule_for(self, request: Request) -> Rule | None:
        for rule in self.rules:
            if rule.take(request):
                return rule
        return None

    def break_tls(self, connections: int) -> None:
        self.broken_tls += connections

    def forward(self, request: bytes, done: Callable[[Message | None], None]) -> None:
        endpoint = wrapClientTLS(
            self._creator,
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.server.port),
        )
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Backend(request, done)))

        def failed(reason: Failure) -> None:
            done(None)

        connecting.addErrback(failed)
