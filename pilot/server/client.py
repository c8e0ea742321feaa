"""The PanDA server client: both API generations, one retry policy, clear outcomes.

Wire formats (``panda-server-protocol.md``; checked against panda-server 1.0.4 and 0.8.1):

* **v1** (``/api/v1/<module>/<method>``): POST, JSON body, gzip-compressed with
  ``Content-Encoding: gzip``, ``Accept: application/json``; replies are
  ``{"success": bool, "message": str, "data": ...}`` with the dispatcher's
  ``StatusCode`` nested in ``data``.  Values are sent with the exact Python types the
  server's type check demands (ints as ints, strings as strings).
* **legacy** (``/server/panda/<method>``): POST of gzip-compressed JSON with
  ``Content-Type: application/json`` and *no* ``Content-Encoding`` (the server always
  gunzips such bodies); we also send ``Accept: application/json`` so that replies come
  as JSON, but urlencoded replies (``StatusCode=0&command=NULL``) are parsed too.

``ApiMode.AUTO`` speaks v1 and falls back to legacy, for the rest of the pilot's
life, when the server says the v1 method does not exist (HTTP 403 ``method ... is
forbidden`` or 404).

Logical outcomes (no jobs, DB time-out, no role, ...) are *results* carrying a
``StatusCode``, never exceptions: the caller decides.  Exceptions mean the exchange
itself failed (``pilot.server.errors``).  Replies are read with a size limit enforced
while reading (``pilot.server.body``).  Nothing here ever logs credentials or reply
bodies; every exception message names the URL once.

The pieces live in modules of one job each; this module keeps their public names
importable from ``pilot.server.client``.
"""

from __future__ import annotations

import json
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from pilot.logs import pilot_observer
from pilot.server import event_calls
from pilot.server.api import ApiMode
from pilot.server.body import API_REPLY_LIMIT, DOCUMENT_LIMIT, read_body, stream_to_file
from pilot.server.connection import ServerConnection
from pilot.server.errors import (
    ChecksumMismatch,
    LocalFileError,
    MethodNotFound,
    ReplyTooLarge,
    ServerError,
    ServerProtocolError,
    ServerRefused,
    ServerUnavailable,
)
from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult, RangeStatus
from pilot.server.messages import (
    AcquireResult,
    JobRequest,
    JobUpdate,
    StatusCode,
    UpdateResult,
    encode_job_request,
    encode_job_update,
    parse_commands,
)
from pilot.server.replies import (
    decode_reply,
    parse_acquire_reply,
    parse_report_reply,
    parse_update_reply,
)
from pilot.server.transport import (
    USER_AGENT,
    Exchange,
    RetryPolicy,
    TokenAuth,
    check_status,
    content_type,
    describe,
    with_retries,
)
from pilot.util.checksum import FileFacts
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

__all__ = [
    "USER_AGENT",
    "AcquireResult",
    "ChecksumMismatch",
    "Download",
    "JobRequest",
    "JobUpdate",
    "LocalFileError",
    "MethodNotFound",
    "PandaClient",
    "ReplyTooLarge",
    "RetryPolicy",
    "ServerError",
    "ServerProtocolError",
    "ServerRefused",
    "ServerUnavailable",
    "StatusCode",
    "TokenAuth",
    "UpdateResult",
    "decode_reply",
    "describe",
    "encode_job_request",
    "encode_job_update",
    "parse_acquire_reply",
    "parse_commands",
    "parse_report_reply",
    "parse_update_reply",
]

log = Logger(observer=pilot_observer)

#: Sees an error status and its body before the retry policy does (may raise instead).
ErrorStatusCheck = Callable[[ApiMode, int, bytes, str], None]

#: Attempts for reports nothing depends on (worker node, GPUs) unless a policy is given.
_REPORT_ATTEMPTS = 2

#: How much of an error reply is read to classify it (never quoted).
_ERROR_BODY_LIMIT = 64 << 10


@record(frozen=True)
class Download:
    """The outcome of ``PandaClient.download``.

    ``modified`` is False when the server answered 304 to a conditional request (then
    nothing was written and ``facts`` is None).  ``etag``/``last_modified`` are the
    reply's validators, for the next conditional request.
    """

    modified: bool
    facts: FileFacts | None
    etag: str | None = None
    last_modified: str | None = None


def gzip_bytes(data: bytes) -> bytes:
    """``data`` in gzip format (what ``gzip.compress`` makes, without importing ``gzip``)."""
    # level 1: update bodies are a few kB of JSON, where it compresses nearly as well as 6
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip header
    return compressor.compress(data) + compressor.flush()


class PandaClient:
    """Calls of the PanDA server's pilot API over one treq ``HTTPClient``.

    The HTTPClient (its Agent, TLS policy and connection pool) is made by the caller,
    so tests can hand in a ``StubTreq`` or a client for a loopback server.  When it
    comes from a ``ServerConnection``, pass that too: a call that failed on a
    kept-alive connection the server had closed is then repeated on a fresh one.
    """

    def __init__(
        self,
        http: HTTPClient,
        base_url: str,
        clock: IReactorTime,
        *,
        api: ApiMode = ApiMode.AUTO,
        token: TokenAuth | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        timeout: float = 120.0,
        connection: ServerConnection | None = None,
        reply_limit: int = API_REPLY_LIMIT,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._api = ApiMode.V1 if api is ApiMode.AUTO else api
        self._auto = api is ApiMode.AUTO
        self._token = token
        self._connection = connection
        self.retry = retry
        self.timeout = timeout
        self.reply_limit = reply_limit
        self.calls = 0

    @property
    def connection(self) -> ServerConnection | None:
        """The kept-alive connection pool the client speaks through (its counters), if any."""
        return self._connection

    @property
    def api(self) -> ApiMode:
        """The API generation in use (AUTO resolves to V1 until a fallback happened)."""
        return self._api

    # -- public calls --------------------------------------------------------------

    async def acquire_job(
        self, request: JobRequest, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> AcquireResult:
        # Not idempotent: a request whose reply was lost may have dispatched a job, so
        # only failures that prove the request never reached the server are retried.
        document, api, url = await self._call(
            ("getJob", "pilot/acquire_jobs"),
            lambda a: encode_job_request(request, a),
            retry,
            timeout,
            idempotent=False,
        )
        return parse_acquire_reply(document, api, url)

    async def update_job(
        self, update: JobUpdate, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> UpdateResult:
        document, api, url = await self._call(
            ("updateJob", "pilot/update_job"), lambda a: encode_job_update(update, a), retry, timeout
        )
        return parse_update_reply(document, api, url)

    async def update_worker_node(
        self, fields: Mapping[str, Any], *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> UpdateResult:
        """Report the worker node's hardware (``/api/v1/pilot/update_worker_node``, v1 only).

        ``fields`` are the endpoint's parameters with the Python types its type check
        demands (``clock_speed`` a float, counts and sizes ints).  Raises ``MethodNotFound``
        at once when the client speaks the legacy API, which has no such method.
        """
        return await self._v1_report("pilot/update_worker_node", fields, retry, timeout)

    async def update_worker_node_gpu(
        self, fields: Mapping[str, Any], *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> UpdateResult:
        """Report one GPU model of the worker node (``/api/v1/pilot/update_worker_node_gpu``, v1 only)."""
        return await self._v1_report("pilot/update_worker_node_gpu", fields, retry, timeout)

    # Event service (``pilot.server.event_calls``).  None of these calls is idempotent: a
    # lost reply may have handed out ranges or recorded statuses, so, as for acquire_job,
    # only failures that prove the server never saw the request are retried.

    async def acquire_event_ranges(
        self, request: EventRangeRequest, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``request.n_ranges`` range objects, as sent ([] when the job has no more)."""
        document, api, url = await self._call(
            event_calls.ACQUIRE,
            lambda a: event_calls.encode_acquire(request, a),
            retry,
            timeout,
            idempotent=False,
        )
        return event_calls.parse_acquire_reply(document, api, url)

    async def update_event_ranges(
        self, update: EventRangeUpdate, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> EventUpdateResult:
        """Report ``update`` in one call (``updateEventRanges`` / ``update_event_ranges``).

        On a v1 server an HTTP 500 is never repeated: panda-server 1.0.4 sends one after
        every report, committed or rolled back, raised here as
        ``event_calls.CommittedThenFailed`` (``get_event_range_statuses`` tells which).
        """
        document, api, url = await self._call(
            event_calls.UPDATE,
            lambda a: event_calls.encode_update(update, a),
            retry,
            timeout,
            idempotent=False,
            error_status=event_calls.check_update_status,
        )
        return event_calls.parse_update_reply(document, api, update, url)

    async def update_single_event_range(
        self,
        status: RangeStatus,
        panda_id: int,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> EventUpdateResult:
        """Report one range of job ``panda_id`` (``updateEventRange`` / ``update_single_event_range``).

        ``accepted`` holds True (recorded), None (a status the server does not record) or
        False (refused); the command is the job's, if the reply carries one.
        """
        document, api, url = await self._call(
            event_calls.UPDATE_SINGLE,
            lambda a: event_calls.encode_single(status, a),
            retry,
            timeout,
            idempotent=False,
        )
        return event_calls.parse_single_reply(document, api, status, panda_id, url)

    async def get_event_range_statuses(
        self,
        jobs: Sequence[tuple[int, int]],
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> dict[str, str]:
        """The statuses the server holds for the ranges of ``jobs``, by range id (v1 only).

        ``jobs`` are ``(jediTaskID, PandaID)`` pairs, a range id's first two fields.
        ``GET /api/v1/event/get_event_range_statuses?job_task_ids=<JSON>`` (panda-server
        1.0.4), a read, so repeated like any idempotent call; a fatal range is listed as
        ``failed`` under attempt number 1.  Raises ``MethodNotFound`` at once on the
        legacy API, which has no such method (nor needs one: its ``updateEventRanges``
        answers reliably), and ``EventCallFailed`` when the server refuses the query.
        """
        url = self._url(("", event_calls.STATUSES), ApiMode.V1)
        if self._api is ApiMode.LEGACY:
            raise MethodNotFound(f"{event_calls.STATUSES}: the legacy API has no such method", 0)
        query = urllib.parse.urlencode(event_calls.encode_statuses(jobs))
        document = await self._get_json(url, query, retry, timeout)
        return event_calls.parse_statuses_reply(document, jobs, url)

    async def get_bytes(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        limit: int = DOCUMENT_LIMIT,
    ) -> bytes:
        """GET a small document (queuedata, storage data) through the same TLS setup."""

        async def attempt() -> bytes:
            response = await self._http.get(url, headers=self._get_headers(url))
            await self._check(response, url)
            return await read_body(response, limit, url)

        return await with_retries(url, attempt, self._exchange(retry, timeout, True))

    async def download(
        self,
        url: str,
        destination: Path,
        *,
        in_thread: ThreadRunner,
        limit: int = DOCUMENT_LIMIT,
        etag: str | None = None,
        last_modified: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Download:
        """GET ``url`` into ``destination`` (created 0600) as the body arrives.

        The body never sits whole in memory and disk writes never run on the reactor
        (``pilot.server.body.stream_to_file``); ``limit``, retries and TLS are those of
        every call.  With ``etag``/``last_modified`` the request is conditional and a
        304 reply writes nothing.  On failure or cancellation ``destination`` is removed.
        """
        headers = self._get_headers(url)
        if etag is not None:
            headers.setRawHeaders(b"If-None-Match", [etag.encode("latin-1", "replace")])
        if last_modified is not None:
            headers.setRawHeaders(b"If-Modified-Since", [last_modified.encode("latin-1", "replace")])

        async def attempt() -> Download:
            response = await self._http.get(url, headers=headers)
            validators = (_header(response, b"etag"), _header(response, b"last-modified"))
            if response.code == 304 and (etag is not None or last_modified is not None):
                await _discard(response)
                return Download(False, None, *validators)
            await self._check(response, url)
            facts = await stream_to_file(response, destination, in_thread, limit, url)
            return Download(True, facts, *validators)

        return await with_retries(url, attempt, self._exchange(retry, timeout, True))

    # -- machinery -------------------------------------------------------------------

    def _exchange(self, retry: RetryPolicy | None, timeout: float | None, idempotent: bool) -> Exchange:
        return Exchange(
            clock=self._clock,
            policy=retry or self.retry,
            timeout=self.timeout if timeout is None else timeout,
            idempotent=idempotent,
            fresh_connection=self._connection.drop_idle if self._connection is not None else None,
            on_attempt=self._count,
        )

    def _count(self) -> None:
        self.calls += 1

    def _url(self, methods: tuple[str, str], api: ApiMode) -> str:
        if api is ApiMode.LEGACY:
            return f"{self._base}/server/panda/{methods[0]}"
        return f"{self._base}/api/v1/{methods[1]}"

    def _headers(self, api: ApiMode) -> Headers:
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json"],
                b"User-Agent": [USER_AGENT.encode("ascii")],
            }
        )
        if api is not ApiMode.LEGACY:
            headers.setRawHeaders(b"Content-Encoding", [b"gzip"])
        if self._token is not None:
            for name, values in self._token.headers().items():
                headers.setRawHeaders(name, values)
        return headers

    def _get_headers(self, url: str) -> Headers:
        headers = Headers({b"User-Agent": [USER_AGENT.encode("ascii")]})
        if self._token is not None and url.startswith(self._base + "/"):
            for name, values in self._token.headers().items():
                headers.setRawHeaders(name, values)
        return headers

    async def _check(
        self, response: IResponse, url: str, error_status: Callable[[int, bytes, str], None] | None = None
    ) -> None:
        """Raise for an error status, having read (a bounded part of) its body to classify it.

        ``error_status`` sees it first, for calls whose error statuses mean more than the
        transport knows (1.0.4's HTTP 500 after committing a range report).
        """
        if 200 <= response.code < 300:
            return
        try:
            body = await read_body(response, _ERROR_BODY_LIMIT, url)
        except ReplyTooLarge:
            body = b""  # classified by its status alone
        if error_status is not None:
            error_status(response.code, body, url)
        check_status(response, body, url)

    async def _call(
        self,
        methods: tuple[str, str],
        params: Callable[[ApiMode], dict[str, Any]],
        retry: RetryPolicy | None,
        timeout: float | None,
        *,
        idempotent: bool = True,
        error_status: ErrorStatusCheck | None = None,
    ) -> tuple[dict[str, Any], ApiMode, str]:
        api = self._api
        try:
            document, url = await self._post(
                methods, params(api), api, retry, timeout, idempotent, error_status
            )
            return document, api, url
        except MethodNotFound:
            if not (self._auto and api is ApiMode.V1):
                raise
        log.warn(
            "server has no v1 method {method}; switching to the legacy API",
            method=methods[1],
            event="server.api_fallback",
        )
        self._api = ApiMode.LEGACY
        document, url = await self._post(
            methods, params(ApiMode.LEGACY), ApiMode.LEGACY, retry, timeout, idempotent, error_status
        )
        return document, ApiMode.LEGACY, url

    async def _v1_report(
        self, method: str, fields: Mapping[str, Any], retry: RetryPolicy | None, timeout: float | None
    ) -> UpdateResult:
        # Not through _call: a v1-only method the server lacks says nothing about the API
        # generation for the job calls, so it must not switch an AUTO client to legacy.
        if self._api is ApiMode.LEGACY:
            raise MethodNotFound(f"{method}: the legacy API has no such method", 0)
        # An idempotent upsert that nothing waits for: a couple of attempts are enough.
        policy = retry or replace(self.retry, attempts=min(self.retry.attempts, _REPORT_ATTEMPTS))
        document, url = await self._post(
            (method.rsplit("/", 1)[-1], method), dict(fields), ApiMode.V1, policy, timeout, True
        )
        return parse_report_reply(document, url)

    async def _get_json(
        self, url: str, query: str, retry: RetryPolicy | None, timeout: float | None
    ) -> dict[str, Any]:
        """GET a v1 reply (``Accept: application/json``); ``url`` without the query names it."""
        headers = self._get_headers(url)
        headers.setRawHeaders(b"Accept", [b"application/json"])

        async def attempt() -> dict[str, Any]:
            response = await self._http.get(f"{url}?{query}", headers=headers)
            await self._check(response, url)
            content = await read_body(response, self.reply_limit, url)
            return decode_reply(content, content_type(response), url)

        return await with_retries(url, attempt, self._exchange(retry, timeout, True))

    async def _post(
        self,
        methods: tuple[str, str],
        params: dict[str, Any],
        api: ApiMode,
        retry: RetryPolicy | None,
        timeout: float | None,
        idempotent: bool,
        error_status: ErrorStatusCheck | None = None,
    ) -> tuple[dict[str, Any], str]:
        url = self._url(methods, api)
        body = gzip_bytes(json.dumps(params).encode("utf-8"))
        check = partial(error_status, api) if error_status is not None else None

        async def attempt() -> dict[str, Any]:
            response = await self._http.post(url, data=body, headers=self._headers(api))
            await self._check(response, url, check)
            content = await read_body(response, self.reply_limit, url)
            return decode_reply(content, content_type(response), url)

        document = await with_retries(url, attempt, self._exchange(retry, timeout, idempotent))
        return document, url


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _discard(response: IResponse) -> Awaitable[bytes]:
    return read_body(response, _ERROR_BODY_LIMIT, "")
