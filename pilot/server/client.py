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
itself failed: ``ServerUnavailable`` (transport errors, 5xx and 429, after the retry
policy is exhausted), ``ServerRefused`` (any other HTTP error; not retried), and
``ServerProtocolError`` (a reply that is HTML, truncated, a Python repr, or JSON of
the wrong shape).  Nothing here ever logs credentials or reply bodies.
"""

from __future__ import annotations

import gzip
import json
import platform
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import treq
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from pilot import __version__
from pilot.logs import pilot_observer
from pilot.server.api import ApiMode

log = Logger(observer=pilot_observer)

USER_AGENT = (
    f"txpilot/{__version__} (Python {sys.version_info.major}.{sys.version_info.minor}; "
    f"{platform.system()} {platform.machine()})"
)


class StatusCode(IntEnum):
    """The job dispatcher's ``StatusCode`` values (``jobdispatcher/Protocol.py``)."""

    SUCCESS = 0
    TIMEOUT = 10
    NO_JOBS = 20
    FAILED = 30
    INVALID = 50
    ROLE = 60
    PERMISSION = 70
    MISSING_KEY = 80
    PROXY_ERROR = 90


class ServerError(Exception):
    """The exchange with the server failed (as opposed to a logical refusal)."""


class ServerUnavailable(ServerError):
    """Transport errors, 5xx or 429 on every attempt the retry policy allowed."""


class ServerRefused(ServerError):
    """An HTTP error that retrying will not fix (403 token failure, 500 argument error...)."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class MethodNotFound(ServerRefused):
    """The server does not serve this method (wrong API generation)."""


class ServerProtocolError(ServerError):
    """The reply cannot be understood: HTML, truncated, Python repr, wrong JSON shape."""


# ------------------------------------------------------------------------------------
# Requests and results


@dataclass(frozen=True)
class JobRequest:
    """What the pilot asks for when it asks for a job.  Sizes in MB, times in seconds."""

    site_name: str
    computing_element: str
    prod_source_label: str
    node: str
    disk_space: int | None = None
    memory: int | None = None
    cpu: int | None = None
    resource_type: str | None = None
    job_type: str | None = None
    working_group: str | None = None
    harvester_id: str | None = None
    worker_id: int | None = None
    remaining_time: int | None = None


#: JobRequest field → (legacy getJob name, v1 acquire_jobs name); None: not in that API.
_JOB_REQUEST_NAMES: dict[str, tuple[str | None, str | None]] = {
    "site_name": ("siteName", "site_name"),
    "computing_element": ("computingElement", "computing_element"),
    "prod_source_label": ("prodSourceLabel", "prod_source_label"),
    "node": ("node", "node"),
    "disk_space": ("diskSpace", "disk_space"),
    "memory": ("mem", "memory"),
    "cpu": ("cpu", None),
    "resource_type": ("resourceType", "resource_type"),
    "job_type": ("jobType", "job_type"),
    "working_group": ("workingGroup", None),
    "harvester_id": ("harvester_id", "harvester_id"),
    "worker_id": ("worker_id", "worker_id"),
    "remaining_time": ("remaining_time", "remaining_time"),
}


@dataclass(frozen=True)
class JobUpdate:
    """One job update (heartbeat or final).  ``None`` fields are not sent."""

    job_id: int
    state: str
    attempt_nr: int | None = None
    timestamp: str | None = None
    site_name: str | None = None
    node: str | None = None
    scheduler_id: str | None = None
    pilot_id: str | None = None
    batch_id: str | None = None
    trans_exit_code: int | None = None
    pilot_error_code: int | None = None
    pilot_error_diag: str | None = None
    exe_error_code: int | None = None
    exe_error_diag: str | None = None
    pilot_timing: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    cpu_consumption_time: int | None = None
    cpu_consumption_unit: str | None = None
    cpu_conversion_factor: float | None = None
    core_count: int | None = None
    mean_core_count: int | None = None
    n_events: int | None = None
    n_input_files: int | None = None
    job_metrics: str | None = None
    job_output_report: str | None = None
    meta_data: str | None = None
    pilot_log: str | None = None
    stdout: str | None = None
    job_sub_status: str | None = None
    cpu_architecture_level: str | None = None
    max_rss: int | None = None
    max_vmem: int | None = None
    max_swap: int | None = None
    max_pss: int | None = None
    avg_rss: int | None = None
    avg_vmem: int | None = None
    avg_swap: int | None = None
    avg_pss: int | None = None
    tot_rchar: int | None = None
    tot_wchar: int | None = None
    tot_rbytes: int | None = None
    tot_wbytes: int | None = None
    rate_rchar: float | None = None
    rate_wchar: float | None = None
    rate_rbytes: float | None = None
    rate_wbytes: float | None = None


#: JobUpdate field → (legacy updateJob name, v1 update_job name).
_JOB_UPDATE_NAMES: dict[str, tuple[str | None, str | None]] = {
    "job_id": ("jobId", "job_id"),
    "state": ("state", "job_status"),
    "attempt_nr": ("attemptNr", "attempt_nr"),
    "timestamp": ("timestamp", None),
    "site_name": ("siteName", "site_name"),
    "node": ("node", "node"),
    "scheduler_id": ("schedulerID", "scheduler_id"),
    "pilot_id": ("pilotID", "pilot_id"),
    "batch_id": ("batchID", "batch_id"),
    "trans_exit_code": ("transExitCode", "trans_exit_code"),
    "pilot_error_code": ("pilotErrorCode", "pilot_error_code"),
    "pilot_error_diag": ("pilotErrorDiag", "pilot_error_diag"),
    "exe_error_code": ("exeErrorCode", "exe_error_code"),
    "exe_error_diag": ("exeErrorDiag", "exe_error_diag"),
    "pilot_timing": ("pilotTiming", "pilot_timing"),
    "start_time": ("startTime", "start_time"),
    "end_time": ("endTime", "end_time"),
    "cpu_consumption_time": ("cpuConsumptionTime", "cpu_consumption_time"),
    "cpu_consumption_unit": ("cpuConsumptionUnit", "cpu_consumption_unit"),
    "cpu_conversion_factor": ("cpuConversionFactor", "cpu_conversion_factor"),
    "core_count": ("coreCount", "core_count"),
    "mean_core_count": ("meanCoreCount", "mean_core_count"),
    "n_events": ("nEvents", "n_events"),
    "n_input_files": ("nInputFiles", "n_input_files"),
    "job_metrics": ("jobMetrics", "job_metrics"),
    "job_output_report": ("xml", "job_output_report"),
    "meta_data": ("metaData", "meta_data"),
    "pilot_log": ("pilotLog", "pilot_log"),
    "stdout": ("stdout", "stdout"),
    "job_sub_status": ("jobSubStatus", "job_sub_status"),
    "cpu_architecture_level": ("cpu_architecture_level", "cpu_architecture_level"),
    "max_rss": ("maxRSS", "max_rss"),
    "max_vmem": ("maxVMEM", "max_vmem"),
    "max_swap": ("maxSWAP", "max_swap"),
    "max_pss": ("maxPSS", "max_pss"),
    "avg_rss": ("avgRSS", "avg_rss"),
    "avg_vmem": ("avgVMEM", "avg_vmem"),
    "avg_swap": ("avgSWAP", "avg_swap"),
    "avg_pss": ("avgPSS", "avg_pss"),
    "tot_rchar": ("totRCHAR", "tot_rchar"),
    "tot_wchar": ("totWCHAR", "tot_wchar"),
    "tot_rbytes": ("totRBYTES", "tot_rbytes"),
    "tot_wbytes": ("totWBYTES", "tot_wbytes"),
    "rate_rchar": ("rateRCHAR", "rate_rchar"),
    "rate_wchar": ("rateWCHAR", "rate_wchar"),
    "rate_rbytes": ("rateRBYTES", "rate_rbytes"),
    "rate_wbytes": ("rateWBYTES", "rate_wbytes"),
}


@dataclass(frozen=True)
class AcquireResult:
    """The outcome of a job request: jobs (raw dicts) when ``status`` is SUCCESS."""

    status: StatusCode
    jobs: tuple[Mapping[str, Any], ...] = ()
    message: str = ""


@dataclass(frozen=True)
class UpdateResult:
    """The outcome of a job update and the server's commands for the pilot."""

    status: StatusCode
    commands: tuple[str, ...] = ()
    message: str = ""
    pilot_secrets: str | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.status is StatusCode.SUCCESS


def _encode(
    values: Mapping[str, Any], names: Mapping[str, tuple[str | None, str | None]], api: ApiMode
) -> dict[str, Any]:
    index = 0 if api is ApiMode.LEGACY else 1
    encoded: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = names[key][index]
        if name is not None:
            encoded[name] = value
    return encoded


def encode_job_request(request: JobRequest, api: ApiMode) -> dict[str, Any]:
    """The parameters of getJob (legacy) or acquire_jobs (v1) for ``request``."""
    return _encode({f.name: getattr(request, f.name) for f in fields(request)}, _JOB_REQUEST_NAMES, api)


def encode_job_update(update: JobUpdate, api: ApiMode) -> dict[str, Any]:
    """The parameters of updateJob (legacy) or update_job (v1) for ``update``."""
    return _encode({f.name: getattr(update, f.name) for f in fields(update)}, _JOB_UPDATE_NAMES, api)


def parse_commands(raw: object) -> tuple[str, ...]:
    """``"debug,tobekilled"`` → ``("debug", "tobekilled")``; ``NULL``/None → ``()``."""
    if not isinstance(raw, str):
        return ()
    return tuple(c.strip() for c in raw.split(",") if c.strip() and c.strip() not in ("NULL", "None"))


# ------------------------------------------------------------------------------------
# Reply decoding


def _snippet(body: bytes, limit: int = 80) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text) + ("..." if len(body) > limit else "")


def decode_reply(body: bytes, content_type: str, what: str) -> dict[str, Any]:
    """Decode a reply body into a dict: JSON, or (legacy) urlencoded ``k=v&...``."""
    stripped = body.strip()
    if not stripped:
        raise ServerProtocolError(f"{what}: empty reply")
    if stripped[:1] == b"<":
        raise ServerProtocolError(f"{what}: the server replied with HTML, not data: {_snippet(stripped)!r}")
    if stripped[:1] in (b"{", b"["):
        try:
            document = json.loads(stripped)
        except (ValueError, UnicodeDecodeError):
            if stripped[:2] == b"{'" or b"': " in stripped[:200]:
                raise ServerProtocolError(
                    f"{what}: the server replied with a Python repr instead of JSON: {_snippet(stripped)!r}"
                ) from None
            raise ServerProtocolError(
                f"{what}: truncated or malformed JSON reply ({len(body)} bytes): {_snippet(stripped)!r}"
            ) from None
        if not isinstance(document, dict):
            raise ServerProtocolError(f"{what}: expected a JSON object, got {type(document).__name__}")
        return document
    if "json" in content_type:
        raise ServerProtocolError(f"{what}: reply claims JSON but is not: {_snippet(stripped)!r}")
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerProtocolError(f"{what}: reply is not text") from None
    if "=" not in text or "StatusCode" not in text:
        raise ServerProtocolError(f"{what}: unrecognised reply {_snippet(stripped)!r}")
    parsed = parse_qs(text, keep_blank_values=True, strict_parsing=False)
    return {key: values[0] for key, values in parsed.items()}


def _status_code(value: object, what: str) -> StatusCode:
    if isinstance(value, bool):
        raise ServerProtocolError(f"{what}: StatusCode is {value!r}")
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ServerProtocolError(f"{what}: StatusCode is {value!r}") from None
    try:
        return StatusCode(number)
    except ValueError:
        raise ServerProtocolError(f"{what}: unknown StatusCode {number}") from None


def _v1_envelope(document: Mapping[str, Any], what: str) -> tuple[bool, str, Any]:
    success = document.get("success")
    message = document.get("message", "")
    if not isinstance(success, bool) or "data" not in document or not isinstance(message, str | type(None)):
        raise ServerProtocolError(f"{what}: reply is not a v1 {{success, message, data}} object")
    return success, message or "", document["data"]


#: v1 failure messages → the StatusCode the legacy API would have used.
_V1_MESSAGES: tuple[tuple[str, StatusCode], ...] = (
    ("no jobs", StatusCode.NO_JOBS),
    ("timed out", StatusCode.TIMEOUT),
    ("role", StatusCode.ROLE),
    ("ssl secure connection", StatusCode.PERMISSION),
    ("argument error", StatusCode.INVALID),
    ("type error", StatusCode.INVALID),
    ("expecting ", StatusCode.INVALID),
)


def _v1_failure_status(message: str) -> StatusCode:
    lowered = message.lower()
    for needle, status in _V1_MESSAGES:
        if needle in lowered:
            return status
    return StatusCode.FAILED


def _job_dicts(items: object, what: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(items, list) or not all(isinstance(j, dict) for j in items):
        raise ServerProtocolError(f"{what}: 'jobs' is not a list of job objects")
    return tuple(items)


def parse_acquire_reply(document: Mapping[str, Any], api: ApiMode) -> AcquireResult:
    what = "getJob" if api is ApiMode.LEGACY else "acquire_jobs"
    if api is ApiMode.LEGACY:
        status = _status_code(document.get("StatusCode"), what)
        message = str(document.get("errorDialog") or "")
        if status is not StatusCode.SUCCESS:
            return AcquireResult(status, (), message)
        if "jobs" in document:
            jobs = document["jobs"]
            if isinstance(jobs, str):
                try:
                    jobs = json.loads(jobs)
                except ValueError:
                    raise ServerProtocolError(f"{what}: 'jobs' is not valid JSON") from None
            return AcquireResult(status, _job_dicts(jobs, what), message)
        if "PandaID" not in document:
            raise ServerProtocolError(f"{what}: StatusCode 0 but no job in the reply")
        return AcquireResult(status, (dict(document),), message)
    success, message, data = _v1_envelope(document, what)
    if not success:
        if isinstance(data, dict) and "StatusCode" in data:
            return AcquireResult(_status_code(data["StatusCode"], what), (), message)
        return AcquireResult(_v1_failure_status(message), (), message)
    if not isinstance(data, dict):
        raise ServerProtocolError(f"{what}: 'data' is not an object")
    status = _status_code(data.get("StatusCode", 0), what)
    jobs = _job_dicts(data.get("jobs", []), what)
    if status is StatusCode.SUCCESS and not jobs:
        return AcquireResult(StatusCode.NO_JOBS, (), message or "no job in the reply")
    return AcquireResult(status, jobs, message)


def parse_update_reply(document: Mapping[str, Any], api: ApiMode) -> UpdateResult:
    what = "updateJob" if api is ApiMode.LEGACY else "update_job"
    if api is ApiMode.LEGACY:
        data: Mapping[str, Any] = document
        message = str(document.get("errorDialog") or "")
    else:
        success, message, payload = _v1_envelope(document, what)
        if not isinstance(payload, dict):
            if success:
                raise ServerProtocolError(f"{what}: 'data' is not an object")
            return UpdateResult(_v1_failure_status(message), (), message)
        data = payload
    status = _status_code(data.get("StatusCode"), what)
    secrets = data.get("pilotSecrets")
    return UpdateResult(
        status=status,
        commands=parse_commands(data.get("command")),
        message=message or str(data.get("ErrorDiag") or ""),
        pilot_secrets=secrets if isinstance(secrets, str) else (json.dumps(secrets) if secrets else None),
    )


def parse_report_reply(document: Mapping[str, Any], what: str) -> UpdateResult:
    """A v1 reply of a report without a job (``update_worker_node``, ``update_worker_node_gpu``).

    These replies carry no ``data`` (``{"success": true, "message": "Inserted new worker
    node.", "data": null}``), so the outcome is ``success``; a failure's message is mapped
    to the StatusCode the legacy API would have used, as for the other v1 calls.
    """
    success, message, data = _v1_envelope(document, what)
    if isinstance(data, dict) and "StatusCode" in data:
        status = _status_code(data["StatusCode"], what)
    else:
        status = StatusCode.SUCCESS if success else _v1_failure_status(message)
    if not success and status is StatusCode.SUCCESS:
        status = StatusCode.FAILED
    return UpdateResult(status, (), message)


# ------------------------------------------------------------------------------------
# Transport


class TokenAuth:
    """``Authorization: Bearer`` + ``Origin`` headers from a token file, re-read when it changes."""

    def __init__(self, path: Path, origin: str | None) -> None:
        self._path = path
        self._origin = origin
        self._mtime: float | None = None
        self._token: str = ""

    def headers(self) -> dict[bytes, list[bytes]]:
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                self._token = self._path.read_text(encoding="utf-8").strip()
                self._mtime = mtime
        except OSError as exc:
            if not self._token:
                raise ServerRefused(f"cannot read token file {self._path}: {exc.strerror}", 0) from None
        result = {b"Authorization": [b"Bearer " + self._token.encode("ascii", errors="replace")]}
        if self._origin:
            result[b"Origin"] = [self._origin.encode("ascii", errors="replace")]
        return result


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transport errors, 5xx and 429."""

    attempts: int = 4
    initial: float = 2.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: Callable[[], float] = random.random

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure: initial·factorⁿ⁻¹ (capped) + jitter."""
        return min(self.initial * self.factor ** max(0, failures - 1), self.maximum) + self.jitter()


_TRANSPORT_ERRORS = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    TimeoutError,
    OSError,
)


class PandaClient:
    """Calls of the PanDA server's pilot API over one treq ``HTTPClient``.

    The HTTPClient (its Agent, TLS policy and connection pool) is made by the caller,
    so tests can hand in a ``StubTreq`` or a client for a loopback server.
    """

    def __init__(
        self,
        http: HTTPClient,
        base_url: str,
        clock: IReactorTime,
        *,
        api: ApiMode = ApiMode.AUTO,
        token: TokenAuth | None = None,
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 120.0,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._api = ApiMode.V1 if api is ApiMode.AUTO else api
        self._auto = api is ApiMode.AUTO
        self._token = token
        self.retry = retry
        self.timeout = timeout
        self.calls = 0

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
        document, api = await self._call(
            ("getJob", "pilot/acquire_jobs"),
            lambda a: encode_job_request(request, a),
            retry,
            timeout,
            idempotent=False,
        )
        return parse_acquire_reply(document, api)

    async def update_job(
        self, update: JobUpdate, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> UpdateResult:
        document, api = await self._call(
            ("updateJob", "pilot/update_job"), lambda a: encode_job_update(update, a), retry, timeout
        )
        return parse_update_reply(document, api)

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

    async def get_bytes(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        limit: int = 64 << 20,
    ) -> bytes:
        """GET a document (queuedata, a transformation) through the same TLS setup."""
        content: bytes = await self._with_retries(
            url, lambda: self._get(url, limit), retry or self.retry, timeout
        )
        return content

    # -- machinery -------------------------------------------------------------------

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

    async def _call(
        self,
        methods: tuple[str, str],
        params: Callable[[ApiMode], dict[str, Any]],
        retry: RetryPolicy | None,
        timeout: float | None,
        *,
        idempotent: bool = True,
    ) -> tuple[dict[str, Any], ApiMode]:
        api = self._api
        try:
            return await self._post(methods, params(api), api, retry, timeout, idempotent), api
        except MethodNotFound:
            if not (self._auto and api is ApiMode.V1):
                raise
        log.warn(
            "server has no v1 method {method}; switching to the legacy API",
            method=methods[1],
            event="server.api_fallback",
        )
        self._api = ApiMode.LEGACY
        document = await self._post(
            methods, params(ApiMode.LEGACY), ApiMode.LEGACY, retry, timeout, idempotent
        )
        return document, ApiMode.LEGACY

    async def _v1_report(
        self, method: str, fields: Mapping[str, Any], retry: RetryPolicy | None, timeout: float | None
    ) -> UpdateResult:
        # Not through _call: a v1-only method the server lacks says nothing about the API
        # generation for the job calls, so it must not switch an AUTO client to legacy.
        if self._api is ApiMode.LEGACY:
            raise MethodNotFound(f"{method}: the legacy API has no such method", 0)
        # An idempotent upsert that nothing waits for: a couple of attempts are enough.
        policy = retry or replace(self.retry, attempts=min(self.retry.attempts, _REPORT_ATTEMPTS))
        document = await self._post(
            (method.rsplit("/", 1)[-1], method), dict(fields), ApiMode.V1, policy, timeout, True
        )
        return parse_report_reply(document, method)

    async def _post(
        self,
        methods: tuple[str, str],
        params: dict[str, Any],
        api: ApiMode,
        retry: RetryPolicy | None,
        timeout: float | None,
        idempotent: bool,
    ) -> dict[str, Any]:
        url = self._url(methods, api)
        body = gzip.compress(json.dumps(params).encode("utf-8"), compresslevel=6)
        what = methods[0] if api is ApiMode.LEGACY else methods[1]

        async def attempt() -> dict[str, Any]:
            response = await self._http.post(url, data=body, headers=self._headers(api))
            content = await treq.content(response)
            self._check_status(response, content, what)
            return decode_reply(content, _content_type(response), what)

        document: dict[str, Any] = await self._with_retries(
            url, attempt, retry or self.retry, timeout, idempotent
        )
        return document

    async def _get(self, url: str, limit: int) -> bytes:
        headers = Headers({b"User-Agent": [USER_AGENT.encode("ascii")]})
        if self._token is not None and url.startswith(self._base + "/"):
            for name, values in self._token.headers().items():
                headers.setRawHeaders(name, values)
        response = await self._http.get(url, headers=headers)
        content = await treq.content(response)
        self._check_status(response, content, url)
        if len(content) > limit:
            raise ServerProtocolError(f"{url}: reply larger than {limit} bytes")
        return content

    def _check_status(self, response: IResponse, content: bytes, what: str) -> None:
        code = response.code
        if 200 <= code < 300:
            return
        text = _snippet(content, 200)
        if code == 404 or (code == 403 and "is forbidden" in text and "method" in text):
            raise MethodNotFound(f"{what}: HTTP {code}: {text}", code)
        if code == 429 or (code >= 500 and not _is_deterministic_500(text)):
            raise _RetryableStatus(f"{what}: HTTP {code}: {text}")
        raise ServerRefused(f"{what}: HTTP {code}: {text}", code)

    async def _with_retries(
        self,
        url: str,
        attempt: Callable[[], Any],
        retry: RetryPolicy,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> Any:
        per_attempt = self.timeout if timeout is None else timeout
        failures = 0
        while True:
            self.calls += 1
            started = self._clock.seconds()
            pending: Deferred[Any] = Deferred.fromCoroutine(attempt())
            expired: list[bool] = []

            def expire(d: Deferred[Any] = pending, flag: list[bool] = expired) -> None:
                flag.append(True)
                d.cancel()

            timer = self._clock.callLater(per_attempt, expire)
            error: Exception | None = None
            try:
                result = await pending
            except Exception as exc:  # noqa: BLE001 - classified just below
                error = exc
            finally:
                if timer.active():
                    timer.cancel()
            if error is None:
                log.debug(
                    "{url} answered in {elapsed:.3f} s",
                    url=url,
                    elapsed=self._clock.seconds() - started,
                    event="server.call",
                )
                return result
            if expired:
                error = TimeoutError()
            elif _was_cancelled(error):
                raise CancelledError()  # our caller gave up: not a failure of the server
            elif not isinstance(error, (_RetryableStatus, *_TRANSPORT_ERRORS)):
                raise error
            failures += 1
            reason = _describe(error)
            if not idempotent and not isinstance(error, _NOT_SENT_ERRORS):
                raise ServerUnavailable(
                    f"{url}: {reason} (not repeated: the request may have been processed)"
                )
            if failures >= retry.attempts:
                raise ServerUnavailable(f"{url}: {reason} (after {failures} attempts)")
            delay = retry.delay(failures)
            log.warn(
                "{url}: {reason}; retrying in {delay:.1f} s ({failures}/{attempts})",
                url=url,
                reason=reason,
                delay=delay,
                failures=failures,
                attempts=retry.attempts,
                event="server.retry",
            )
            await deferLater(self._clock, delay, lambda: None)


#: Attempts for reports nothing depends on (worker node, GPUs) unless a policy is given.
_REPORT_ATTEMPTS = 2


class _RetryableStatus(Exception):
    """An HTTP status worth retrying (5xx, 429)."""


#: Failures that prove the server never acted on the request (safe to repeat anything):
#: no connection at all, or an error status the server answered with.
_NOT_SENT_ERRORS = (ConnectError, DNSLookupError, _RetryableStatus)


def _was_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a cancellation of the request."""
    if isinstance(exc, CancelledError):
        return True
    reasons: list[Failure] = getattr(exc, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def _is_deterministic_500(text: str) -> bool:
    """Legacy server errors that come from the request itself and would recur."""
    return (
        "unexpected keyword argument" in text
        or "Not a gzipped file" in text
        or "missing" in text
        and "argument" in text
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no reply within the time-out"
    if isinstance(exc, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed):
        reasons = ", ".join(_reason_text(r.value) for r in exc.reasons) or "connection failed"
        return f"connection failed ({reasons})"
    return str(exc) or type(exc).__name__


def _reason_text(error: BaseException) -> str:
    if isinstance(error, SSL.Error):
        return f"TLS failure: {error}"
    return str(error) or type(error).__name__


def _content_type(response: IResponse) -> str:
    values: Sequence[bytes] = response.headers.getRawHeaders(b"content-type") or [b""]
    return values[0].decode("latin-1").lower()
