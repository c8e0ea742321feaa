"""Start and stop the development server from Python (tests, benchmarks, the demo) or twistd.

``start_dev_server`` builds everything (PKI, SQLite store, dispatcher, HTTP site),
listens, and returns a ``DevServer`` handle whose ``url`` uses ``localhost`` so that
host-name verification matches the generated certificate.  ``DevServer.stop`` stops
listening, closes the connections, waits for requests in progress and closes the
database, so a trial test that awaits it leaves a clean reactor.

``DevServerService`` wraps the same for ``twistd -n panda-dev``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from pilot.devserver.auth import Authenticator, ServerTLS, TokenGrant
from pilot.devserver.dispatcher import Dispatcher
from pilot.devserver.event_api import EventAPI
from pilot.devserver.events import EventStore
from pilot.devserver.handlers import PilotAPI
from pilot.devserver.pki import PKIFiles, generate_pki
from pilot.devserver.queues import QueueRegistry
from pilot.devserver.store import JobStore
from pilot.devserver.web import DevServerResource, DevSite, RequestLog

log = Logger()

#: How long ``stop`` lets open connections flush before cutting them.
CLOSE_GRACE = 5.0


class _ConnectionTracker(WrappingFactory):
    """Knows the open connections, so that stopping the server can close them and wait."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    async def close_all(self) -> None:
        if not self.protocols:
            return
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        for connection in list(self.protocols):
            connection.transport.loseConnection()
        cut = self._clock.callLater(CLOSE_GRACE, self._abort_all)
        try:
            await idle
        finally:
            if cut.active():
                cut.cancel()

    def _abort_all(self) -> None:
        for connection in list(self.protocols):
            connection.transport.abortConnection()


@dataclass
class DevServer:
    """A running development server."""

    url: str
    port: int
    pki: PKIFiles
    state_dir: Path
    request_log: RequestLog
    dispatcher: Dispatcher
    authenticator: Authenticator
    queues: QueueRegistry
    event_api: EventAPI
    _store: JobStore = field(repr=False)
    _events: EventStore = field(repr=False)
    _listening: IListeningPort = field(repr=False)
    _connections: _ConnectionTracker = field(repr=False)
    _resource: DevServerResource = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def user_dn(self) -> str:
        return self.pki.user_dn

    async def submit(self, job: Mapping[str, object] | Sequence[Mapping[str, object]]) -> list[int]:
        """Submit a job dict, a list of them, or ``{PandaID: dict}``; returns the PandaIDs."""
        return await self.dispatcher.submit(job, submitter_dn=self.pki.user_dn)

    async def submit_file(self, path: Path) -> list[int] | None:
        """Submit a JSON job file once: None if the same content was submitted before."""
        return await self.dispatcher.submit_file(path.read_bytes(), str(path), submitter_dn=self.pki.user_dn)

    async def job(self, panda_id: int) -> dict[str, object]:
        """State, fields, pilot reports, output report and updates of a job (``KeyError`` if unknown)."""
        view = await self.dispatcher.job_view(panda_id)
        if view is None:
            raise KeyError(panda_id)
        return view

    async def jobs(self, status: str | None = None, site: str | None = None) -> list[dict[str, object]]:
        return await self.dispatcher.list_jobs(status, site)

    async def set_command(self, panda_id: int, command: str | None) -> None:
        """The ``commandToPilot`` of a job (e.g. ``tobekilled``, ``softkill``; None clears it)."""
        if not await self.dispatcher.set_command(panda_id, command):
            raise KeyError(panda_id)

    async def set_debug(self, panda_id: int, on: bool = True) -> None:
        """Switch debug mode of a job on or off."""
        if not await self.dispatcher.set_debug(panda_id, on):
            raise KeyError(panda_id)

    async def events(self, panda_id: int) -> dict[str, object]:
        """A job's event ranges, archives and range reports (``GET /dev/jobs/<id>/events``).

        ``KeyError`` if the job is unknown.  See ``pilot.devserver.events.job_events``.
        """
        view = await self._events.job_events(panda_id)
        if view is None:
            raise KeyError(panda_id)
        return view

    async def worker_nodes(self, site: str | None = None) -> list[dict[str, object]]:
        """The last ``update_worker_node`` report per (site, host, CPU model), oldest first.

        Each is the report's parameters as the server bound them (the host name without
        its ``slot@`` prefix, ``timeout`` left out) plus ``last_seen`` (server clock seconds).
        """
        return _reports(await self._store.worker_nodes("worker_nodes"), site)

    async def worker_node_gpus(self, site: str | None = None) -> list[dict[str, object]]:
        """The last ``update_worker_node_gpu`` report per (site, host, vendor, model), oldest first."""
        return _reports(await self._store.worker_nodes("worker_node_gpus"), site)

    def ready_info(self) -> dict[str, object]:
        """What clients need to find and trust this server."""
        return {
            "url": self.url,
            "port": self.port,
            "ca_cert": str(self.pki.ca_cert),
            "ca_dir": str(self.pki.ca_dir),
            "client_proxy": str(self.pki.client_proxy),
            "client_cert": str(self.pki.client_cert),
            "client_key": str(self.pki.client_key),
            "state_dir": str(self.state_dir),
            "user_dn": self.pki.user_dn,
        }

    def write_ready_file(self, path: Path) -> None:
        """Write ``ready_info`` as JSON atomically (written to a temporary name, then renamed)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.ready_info(), indent=1) + "\n")
        os.replace(tmp, path)

    async def stop(self) -> None:
        """Stop listening, finish or close connections, then close the database."""
        if self._stopped:
            return
        self._stopped = True
        stopping = self._listening.stopListening()
        if stopping is not None:
            await stopping
        await self._resource.wait_idle()
        await self._connections.close_all()
        await self._resource.wait_idle()
        self._store.close()
        log.info("panda-dev server at {url} stopped", url=self.url)


def _reports(rows: list[dict[str, object]], site: str | None) -> list[dict[str, object]]:
    reports = []
    for row in rows:
        if site is not None and row["site"] != site:
            continue
        params = row["params"]
        assert isinstance(params, dict)
        report: dict[str, object] = {key: value for key, value in params.items() if key != "timeout"}
        report["host_name"] = row["host_name"]
        report["last_seen"] = row["last_seen"]
        reports.append(report)
    return reports


async def start_dev_server(
    reactor: IReactorTCP,
    state_dir: Path,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    plain_http: bool = False,
    queues: Mapping[str, Mapping[str, object]] | None = None,
    tokens: Iterable[TokenGrant | str] = (),
    production_dns: Sequence[str] | None = None,
    timefloor: int = 0,
    request_log_size: int = 1000,
    idle_timeout: float | None = None,
    tls_sessions: bool = False,
    files: Path | None = None,
    event_delay: float = 0.0,
) -> DevServer:
    """Start a development server keeping its state (database, PKI) in ``state_dir``.

    ``queues`` maps queue names to queuedata (``{}`` for generated defaults, with
    ``timefloor`` minutes).  ``tokens`` are accepted bearer tokens (``TOKEN[:VO]``
    strings are production tokens).  ``production_dns`` defaults to the generated
    user DN.  ``plain_http`` serves HTTP and treats every caller as that user with
    the production role (a debugging switch only).  ``idle_timeout`` closes
    connections idle that long (Apache's ``KeepAliveTimeout``, 5 s by default there);
    ``tls_sessions`` lets clients resume TLS sessions, as mod_ssl's session cache does.
    ``files`` is served under ``/trf/`` (the real server's transformation area, with
    ETag and Last-Modified revalidation).  ``event_delay`` makes every event-service call
    answer that many seconds late (on the reactor's clock), for benchmarks.
    """
    clock = IReactorTime(reactor)
    state_dir = state_dir.absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    pki = generate_pki(state_dir / "pki")
    store = JobStore(IReactorCore(reactor), state_dir / "panda-dev.sqlite")
    try:
        await store.start()
        events = EventStore(store)
        await events.start()
        registry = QueueRegistry(queues, timefloor=timefloor)
        authenticator = Authenticator(
            production_dns=production_dns if production_dns is not None else [pki.user_dn],
            tokens=[TokenGrant.parse(grant) if isinstance(grant, str) else grant for grant in tokens],
            plain_http=plain_http,
            default_dn=pki.user_dn,
        )
        dispatcher = Dispatcher(store, clock, registry)
        event_api = EventAPI(events, authenticator, clock, event_delay)
        request_log = RequestLog(request_log_size)
        resource = DevServerResource(
            api=PilotAPI(dispatcher, store, authenticator, clock, event_api),
            dispatcher=dispatcher,
            events=events,
            authenticator=authenticator,
            queues=registry,
            request_log=request_log,
            clock=clock,
            files=files.absolute() if files is not None else None,
        )
        site: IProtocolFactory = DevSite(resource, clock, idle_timeout)
        if not plain_http:
            site = TLSMemoryBIOFactory(ServerTLS(pki, sessions=tls_sessions), False, site, clock)
        connections = _ConnectionTracker(site, clock)
        endpoint = (
            TCP6ServerEndpoint(reactor, port, interface=host)  # type: ignore[no-untyped-call]
            if ":" in host
            else TCP4ServerEndpoint(reactor, port, interface=host)  # type: ignore[no-untyped-call]
        )
        listening: IListeningPort = await endpoint.listen(connections)  # type: ignore[no-untyped-call]
    except BaseException:
        store.close()
        raise
    address = listening.getHost()
    assert isinstance(address, IPv4Address | IPv6Address)
    bound = address.port
    scheme = "http" if plain_http else "https"
    name = "localhost" if host in ("127.0.0.1", "::1", "0.0.0.0", "::", "localhost") else host
    server = DevServer(
        url=f"{scheme}://{name}:{bound}",
        port=bound,
        pki=pki,
        state_dir=state_dir,
        request_log=request_log,
        dispatcher=dispatcher,
        authenticator=authenticator,
        queues=registry,
        event_api=event_api,
        _store=store,
        _events=events,
        _listening=listening,
        _connections=connections,
        _resource=resource,
    )
    log.info(
        "panda-dev server listening at {url} (state in {state_dir}, queues: {queues})",
        url=server.url,
        state_dir=str(state_dir),
        queues=", ".join(registry) or "none",
    )
    return server


@dataclass(frozen=True)
class DevServerConfig:
    """Everything ``twistd panda-dev`` can be told."""

    state_dir: Path
    port: int = 25443
    host: str = "127.0.0.1"
    plain_http: bool = False
    queues: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    tokens: tuple[TokenGrant, ...] = ()
    production_dns: tuple[str, ...] | None = None
    timefloor: int = 0
    job_files: tuple[Path, ...] = ()
    ready_file: Path | None = None
    #: Apache-like connection handling: idle connections closed after this many seconds
    #: (KeepAliveTimeout), TLS sessions resumable (mod_ssl's session cache).
    idle_timeout: float | None = None
    tls_sessions: bool = False
    files: Path | None = None
    #: Seconds every event-service call waits before it answers (a slow server, for benchmarks).
    event_delay: float = 0.0


class DevServerService(Service):
    """The development server as a twistd service."""

    def __init__(self, reactor: IReactorTCP, config: DevServerConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._starting: Deferred[None] | None = None
        self.server: DevServer | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed)

    async def _start(self) -> None:
        config = self._config
        self.server = await start_dev_server(
            self._reactor,
            config.state_dir,
            port=config.port,
            host=config.host,
            plain_http=config.plain_http,
            queues=config.queues,
            tokens=config.tokens,
            production_dns=config.production_dns,
            timefloor=config.timefloor,
            idle_timeout=config.idle_timeout,
            tls_sessions=config.tls_sessions,
            files=config.files,
            event_delay=config.event_delay,
        )
        for path in config.job_files:
            ids = await self.server.submit_file(path)
            if ids is not None:
                log.info("{path}: jobs {pandaids} submitted", path=str(path), pandaids=ids)
        if config.ready_file is not None:
            self.server.write_ready_file(config.ready_file)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # stopped while starting
        log.failure("the panda-dev server could not start", failure)
        IReactorCore(self._reactor).stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self.server is not None:
            await self.server.stop()
        if self._config.ready_file is not None:
            try:
                self._config.ready_file.unlink()
            except FileNotFoundError:
                pass
