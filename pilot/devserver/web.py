"""HTTP for the development server: the PanDA API, queuedata, a development API, a request log.

Paths:

* ``/server/panda/<method>`` and ``/api/v1/<module>/<method>``: the pilot API of
  both generations (``pilot.devserver.handlers``), with the real server's 403/500
  text replies for refused or broken requests;
* ``/cache/schedconfig/<queue>.all.json``: queuedata of the configured queues;
* ``/dev/...``: JSON API to submit and inspect jobs (``/dev/jobs/<id>/events``: an
  event-service job's ranges, archives and range reports), set pilot commands and
  debug mode.  It needs the production role (or plain-HTTP mode), like an operator;
* anything else: 404, as Apache answers outside the server's script aliases.

Every request is kept in a bounded in-memory ``RequestLog`` with the exact bytes
and headers received and sent, so tests can assert what a client put on the wire.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pilot.devserver import protocol
from pilot.devserver.auth import Authenticator, Identity, TokenAuthenticationFailed, peer_chain
from pilot.devserver.dispatcher import Dispatcher
from pilot.devserver.events import EventStore
from pilot.devserver.files import file_reply, request_counts
from pilot.devserver.handlers import PilotAPI
from pilot.devserver.jobdef import JobDefinitionError
from pilot.devserver.protocol import HTTPError, Params, RawRequest, Reply
from pilot.devserver.queues import QueueRegistry
from pilot.devserver.store import DuplicatePandaID

log = Logger()


# -- the request log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedRequest:
    """One request and its reply, as they were on the wire."""

    time: float
    client: str
    method: str
    uri: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    params: Params | None
    dn: str | None
    status: int
    reply_headers: tuple[tuple[str, str], ...]
    reply_body: bytes

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The first value of a request header (case-insensitive), or None."""
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def reply_header(self, name: str) -> str | None:
        return next((value for key, value in self.reply_headers if key.lower() == name.lower()), None)


class RequestLog:
    """The last ``size`` requests, oldest first."""

    def __init__(self, size: int = 1000) -> None:
        self._entries: deque[LoggedRequest] = deque(maxlen=size)

    def append(self, entry: LoggedRequest) -> None:
        self._entries.append(entry)

    def __iter__(self) -> Iterator[LoggedRequest]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[LoggedRequest]:
        return list(self._entries)

    def matching(self, path: str) -> list[LoggedRequest]:
        """Requests to exactly this path (query string ignored)."""
        return [entry for entry in self._entries if entry.path == path]

    def last(self, path: str | None = None) -> LoggedRequest:
        """The most recent request (to ``path``); ``LookupError`` if there is none."""
        for entry in reversed(self._entries):
            if path is None or entry.path == path:
                return entry
        raise LookupError(f"no request to {path or 'any path'} was logged")

    def clear(self) -> None:
        self._entries.clear()


# -- the site ------------------------------------------------------------------------------------


def _json_reply(status: int, document: object) -> Reply:
    reasons = {
        200: b"OK",
        400: b"Bad Request",
        403: b"Forbidden",
        404: b"Not Found",
        405: b"Method Not Allowed",
    }
    body = json.dumps(document, indent=1).encode()
    return Reply(status, "application/json", body, reasons.get(status, b"Error"))


class DevServerResource(Resource):
    """The single resource behind every path (routing is by path prefix)."""

    isLeaf = True

    def __init__(
        self,
        *,
        api: PilotAPI,
        dispatcher: Dispatcher,
        authenticator: Authenticator,
        queues: QueueRegistry,
        request_log: RequestLog,
        clock: IReactorTime,
        files: Path | None = None,
        events: EventStore | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._files = files
        self._api = api
        self._dispatcher = dispatcher
        self._events = events
        self._auth = authenticator
        self._queues = queues
        self.request_log = request_log
        self._clock = clock
        self._in_flight: set[Deferred[None]] = set()

    def render(self, request: Request) -> int:
        """Answer asynchronously; every handler Deferred is tracked until it ends."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        handling = Deferred.fromCoroutine(self._respond(request, gone))
        self._in_flight.add(handling)
        handling.addErrback(self._crashed, request, gone)
        handling.addBoth(lambda _: self._in_flight.discard(handling))
        return NOT_DONE_YET

    @staticmethod
    def _crashed(failure: Failure, request: Request, gone: list[bool]) -> None:
        """Last resort (a bug in this module): log it and do not leave the client hanging."""
        log.failure("answering {uri} failed", failure, uri=request.uri)
        if not gone and not request.finished:
            untyped: Any = request
            untyped.setResponseCode(500, b"INTERNAL SERVER ERROR")
            untyped.finish()

    async def wait_idle(self) -> None:
        """Wait for the requests being handled (used when stopping)."""
        while self._in_flight:
            pending = list(self._in_flight)
            for handling in pending:
                await handling

    async def _respond(self, request: Request, gone: list[bool]) -> None:
        content = request.content
        assert content is not None
        content.seek(0)
        body = content.read()
        path = urllib.parse.unquote(request.path.decode("latin-1"))
        method = request.method.decode("latin-1")
        params: Params | None = None
        identity: Identity | None = None
        try:
            if path.startswith(("/server/panda/", "/api/")):
                route = protocol.route(path)
                identity = self._identify(request)
                reply, params = await self._api.handle(route, self._raw(request, body), identity)
            elif path.startswith("/cache/schedconfig/"):
                reply = self._queuedata(path)
            elif path.startswith("/trf/") and method in ("GET", "HEAD"):
                reply = file_reply(self._files, path[len("/trf/") :], _header(request, b"if-none-match"))
            elif path == "/dev" or path.startswith("/dev/"):
                identity = self._identify(request)
                reply = await self._development(method, path, request, body, identity)
            else:
                reply = protocol.text_error(404, "Not Found")
        except HTTPError as exc:
            reply = protocol.error_reply(exc)
        except TokenAuthenticationFailed as exc:
            reply = protocol.text_error(403, f"ERROR : Token authentication failed. {exc}")
        except _EXPECTED_FAILURES as exc:
            # what the real server's catch-all makes of a malformed request: HTTP 500 with the text
            log.info("{method} {path}: {error!r} -> HTTP 500", method=method, path=path, error=exc)
            reply = protocol.text_error(500, str(exc))
        except Exception as exc:  # noqa: BLE001 - the server's catch-all: an HTTP 500, never a traceback
            log.failure("request {method} {path} failed", method=method, path=path)
            reply = protocol.text_error(500, str(exc))
        self._finish(request, reply, body, params, identity, gone)

    def _identify(self, request: Request) -> Identity:
        return self._auth.identify(
            peer_chain(request.channel.transport),
            _header(request, b"authorization"),
            _header(request, b"origin"),
        )

    @staticmethod
    def _raw(request: Request, body: bytes) -> RawRequest:
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        return RawRequest(
            http_method=request.method.decode("latin-1"),
            query=query,
            body=body,
            content_type=_header(request, b"content-type"),
            content_encoding=_header(request, b"content-encoding"),
            accept=_header(request, b"accept"),
        )

    def _finish(
        self,
        request: Request,
        reply: Reply,
        body: bytes,
        params: Params | None,
        identity: Identity | None,
        gone: list[bool],
    ) -> None:
        method = request.method.decode("latin-1")
        uri = request.uri.decode("latin-1")
        dn = identity.dn if identity else None
        untyped: Any = request  # twisted.web.server.Request is not annotated
        if not gone:
            untyped.setResponseCode(reply.status, reply.reason)
            untyped.setHeader(b"content-type", reply.content_type.encode())
            untyped.setHeader(b"content-length", str(len(reply.body)).encode())
            for name, value in reply.headers:
                untyped.setHeader(name.encode("latin-1"), value.encode("latin-1"))
            if method != "HEAD":
                untyped.write(reply.body)
            untyped.finish()
        log.debug(
            "{method} {uri} -> {status} ({dn}){gone}",
            method=method,
            uri=uri,
            status=reply.status,
            dn=dn,
            gone=" client gone" if gone else "",
        )
        peer = untyped.getClientAddress()
        self.request_log.append(
            LoggedRequest(
                time=self._clock.seconds(),
                client=str(getattr(peer, "host", peer)),
                method=method,
                uri=uri,
                headers=tuple(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, values in request.requestHeaders.getAllRawHeaders()
                    for value in values
                ),
                body=body,
                params=params,
                dn=dn,
                status=reply.status,
                reply_headers=tuple(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, values in request.responseHeaders.getAllRawHeaders()
                    for value in values
                ),
                reply_body=reply.body,
            )
        )

    # -- queuedata ----------------------------------------------------------------------------

    def _queuedata(self, path: str) -> Reply:
        name = path[len("/cache/schedconfig/") :]
        if name.endswith(".all.json"):
            document = self._queues.document(name[: -len(".all.json")])
            if document is not None:
                return Reply(200, "application/json", document)
        return protocol.text_error(404, "Not Found")

    # -- development API ------------------------------------------------------------------------

    async def _development(
        self, method: str, path: str, request: Request, body: bytes, identity: Identity
    ) -> Reply:
        if not self._auth.production_v1(identity):
            return _json_reply(403, {"error": "the development API needs the production role"})
        parts = [part for part in path.split("/") if part][1:]
        query = urllib.parse.parse_qs(request.uri.split(b"?", 1)[1].decode()) if b"?" in request.uri else {}
        try:
            if parts == ["requests"] and method == "GET":
                return _json_reply(200, {"requests": request_counts(self.request_log.entries)})
            if parts == ["jobs"] and method == "GET":
                jobs = await self._dispatcher.list_jobs(_first(query, "status"), _first(query, "site"))
                return _json_reply(200, {"jobs": jobs})
            if parts == ["jobs"] and method == "POST":
                submission = _json_document(body)
                ids = await self._dispatcher.submit(
                    submission, submitter_dn=identity.dn or self._auth.default_dn
                )
                return _json_reply(200, {"PandaIDs": ids})
            if len(parts) >= 2 and parts[0] == "jobs":
                return await self._job_resource(method, parts[1], parts[2:], body)
        except (JobDefinitionError, DuplicatePandaID) as exc:
            return _json_reply(400, {"error": str(exc)})
        if parts and parts[0] == "jobs":
            return _json_reply(405, {"error": f"{method} is not allowed on {path}"})
        return _json_reply(404, {"error": f"unknown development API path {path}"})

    async def _job_resource(self, method: str, key: str, rest: list[str], body: bytes) -> Reply:
        if not key.isdigit():
            return _json_reply(404, {"error": f"not a PandaID: {key}"})
        panda_id = int(key)
        if not rest and method == "GET":
            view = await self._dispatcher.job_view(panda_id)
            return _json_reply(200, view) if view is not None else _unknown(panda_id)
        if rest == ["events"] and method == "GET" and self._events is not None:
            events = await self._events.job_events(panda_id)
            return _json_reply(200, events) if events is not None else _unknown(panda_id)
        if rest == ["command"] and method == "POST":
            command = _json_object(body).get("command")
            if command is not None and not isinstance(command, str):
                raise JobDefinitionError("command must be a string or null")
            found = await self._dispatcher.set_command(panda_id, command)
            return (
                _json_reply(200, {"PandaID": panda_id, "commandToPilot": command})
                if found
                else _unknown(panda_id)
            )
        if rest == ["debug"] and method == "POST":
            debug = _json_object(body).get("debug", True)
            if not isinstance(debug, bool):
                raise JobDefinitionError("debug must be true or false")
            found = await self._dispatcher.set_debug(panda_id, debug)
            return _json_reply(200, {"PandaID": panda_id, "debug": debug}) if found else _unknown(panda_id)
        known: tuple[list[str], ...] = ([], ["command"], ["debug"], ["events"])
        return _json_reply(405 if rest in known else 404, {"error": "not supported"})


#: Failures the real server produces from bad requests: logged without a traceback.
_EXPECTED_FAILURES = (
    TypeError,
    ValueError,
    OSError,
    EOFError,
    AttributeError,
    KeyError,
    IndexError,
    SyntaxError,
)


def _unknown(panda_id: int) -> Reply:
    return _json_reply(404, {"error": f"no job {panda_id}"})


def _json_document(body: bytes) -> object:
    try:
        return json.loads(body or b"{}")
    except ValueError as exc:
        raise JobDefinitionError(f"the request body is not JSON: {exc}") from None


def _json_object(body: bytes) -> dict[str, object]:
    document = _json_document(body)
    if not isinstance(document, dict):
        raise JobDefinitionError("the request body must be a JSON object")
    return document


class DevSite(Site):
    """The site: no form parsing (the API decodes bodies itself), no access log (we log requests)."""

    noisy = False

    def __init__(
        self, resource: DevServerResource, clock: IReactorTime, idle_timeout: float | None = None
    ) -> None:
        # ``idle_timeout``: close a connection idle that long, as Apache's KeepAliveTimeout does.
        timeout = {} if idle_timeout is None else {"timeout": idle_timeout}
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=clock, **timeout)  # type: ignore[no-untyped-call]

    def log(self, request: object) -> None:
        """Requests are logged by ``DevServerResource`` (and kept in its ``RequestLog``)."""


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _header(request: Request, name: bytes) -> str | None:
    """A header as a CGI environment variable holds it (repeated headers joined with ", ")."""
    values = request.requestHeaders.getRawHeaders(name)
    return None if values is None else ", ".join(value.decode("latin-1") for value in values)
