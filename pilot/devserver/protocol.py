"""The PanDA server's wire formats, for both API generations, as the real server speaks them.

The point of the development server is that a pilot which works against it works
against an unmodified PanDA server, so this module reproduces the server's
request decoding and reply encoding *including its strictness and quirks*:

* legacy ``/server/panda/<method>`` (panda-server 0.8.1): a request whose
  ``Content-Type`` is exactly ``application/json`` always has a gzipped body,
  whatever ``Content-Encoding`` says; other requests use the query string (GET) or
  the form body (POST).  Parameters are bound to the method's Python signature, so
  an unknown name is an HTTP 500 ``getJob() got an unexpected keyword argument``.
  Replies are urlencoded unless the ``Accept`` header contains ``application/json``.
* ``/api/v1/<module>/<method>`` (panda-server 1.0.4): JSON only for POST/PUT with
  ``Content-Type: application/json`` (gunzipped only with ``Content-Encoding: gzip``);
  the ``request_validation`` checks (method, binding, annotation-driven type check);
  replies are ``{"success", "message", "data"}`` as JSON when the request's
  ``Content-Type`` or ``Accept`` is exactly ``application/json``, otherwise the
  Python ``repr`` of that dict.

Errors that the real server reports as HTTP errors are raised as ``HTTPError``.
Nothing here touches the job store: this is parsing and encoding only.
"""

from __future__ import annotations

import ast
import gzip
import inspect
import json
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from types import UnionType
from typing import Union, get_args, get_origin

# -- status codes (jobdispatcher/Protocol.py) -----------------------------------------------------

SC_SUCCESS = 0
SC_TIMEOUT = 10
SC_NO_JOBS = 20
SC_FAILED = 30
SC_INVALID = 50
SC_ROLE = 60
SC_PERMS = 70
SC_MISS_KEY = 80
SC_PROXY_ERROR = 90

MESSAGE_SSL = "SSL secure connection is required"
MESSAGE_PROD_ROLE = "production or pilot role required"
MESSAGE_NO_ROLE = "no production/pilot role in VOMS FQANs or non pilot owner"

#: Values a parameter dict may hold after decoding (JSON values, or strings/lists of strings).
Params = dict[str, object]


class HTTPError(Exception):
    """A reply that is not a normal API reply: the real server's 403/500 text bodies."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body

    @property
    def reason(self) -> bytes:
        return {403: b"Forbidden", 404: b"Not Found"}.get(self.status, b"INTERNAL SERVER ERROR")


def forbidden(method: str) -> HTTPError:
    return HTTPError(403, f"ERROR : method {method} is forbidden")


# -- routing (server/panda.py:parse_script_name + validate_method) --------------------------------


@dataclass(frozen=True)
class Route:
    """``generation`` is ``"legacy"`` or ``"v1"``; ``module`` is ``"panda"`` for legacy paths."""

    generation: str
    module: str
    method: str


def route(path: str) -> Route:
    """Map a request path to an allowed API method, or raise the server's 403."""
    fields = path.split("/")
    if path.startswith("/server/panda/") and len(fields) == 4:
        method = fields[-1]
        if method in LEGACY_METHODS:
            return Route("legacy", "panda", method)
        raise forbidden(method)
    if path.startswith("/api/") and len(fields) == 5:
        version, module, method = fields[2], fields[3], fields[4]
        # the real server maps "latest" to "1", which is not a known version key: it is refused too
        if version == "v1" and (module, method) in V1_ENDPOINTS:
            return Route("v1", module, method)
        raise forbidden(method)
    raise forbidden("")


# -- request decoding ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    """What the server needs to know about an HTTP request to decode its parameters."""

    http_method: str
    query: bytes
    body: bytes
    content_type: str | None
    content_encoding: str | None
    accept: str | None

    @property
    def legacy_accepts_json(self) -> bool:
        """``PandaRequest.acceptJson``: a substring test on ``Accept``."""
        return self.accept is not None and "application/json" in self.accept

    @property
    def v1_json_reply(self) -> bool:
        """v1 replies are JSON when ``Content-Type`` or ``Accept`` *equals* ``application/json``."""
        return self.content_type == "application/json" or self.accept == "application/json"


def parse_legacy_params(request: RawRequest) -> Params:
    """Decode a legacy request's parameters like panda-server 0.8.1.

    Any exception escaping from here becomes an HTTP 500 whose body is ``str(exc)``,
    exactly as the real server's catch-all does (``Not a gzipped file (b'{"')`` for an
    uncompressed JSON body, ``Expecting value: ...`` for bad JSON).
    """
    if request.content_type == "application/json":
        decoded = json.loads(gzip.decompress(request.body))
        # the legacy code patches booleans into strings by iterating over the decoded value
        # whatever its type; non-objects fail in the same places they fail on the server
        for key in list(decoded):
            if decoded[key] is True:
                decoded[key] = "True"
            elif decoded[key] is False:
                decoded[key] = "False"
        return _as_mapping(decoded, "pandaserver.jobdispatcher.JobDispatcher")
    return _parse_query_or_form(request)


def parse_v1_params(request: RawRequest, module: str, method: str) -> Params:
    """Decode a v1 request's parameters like panda-server 1.0.4 (JSON errors are HTTP 500)."""
    if request.content_type == "application/json" and request.http_method in ("PUT", "POST"):
        body = request.body
        if request.content_encoding == "gzip":
            body = gzip.decompress(body)
        try:
            decoded = json.loads(body)
        except json.JSONDecodeError as exc:
            raise HTTPError(500, f"ERROR : received invalid JSON : {exc}") from None
        return _as_mapping(decoded, f"pandaserver.api.v1.{module}_api", method)
    return _parse_query_or_form(request)


def _as_mapping(decoded: object, module: str, method: str = "") -> Params:
    if isinstance(decoded, dict):
        return decoded
    name = f"{module}.{method}" if method else module
    raise TypeError(f"{name}() argument after ** must be a mapping, not {type(decoded).__name__}")


def _parse_query_or_form(request: RawRequest) -> Params:
    """GET/HEAD: the query string, repeated keys as lists; otherwise form fields, first value wins."""
    if request.http_method in ("GET", "HEAD"):
        grouped: dict[str, list[str]] = {}
        for key, value in urllib.parse.parse_qsl(request.query.decode("latin-1"), keep_blank_values=True):
            grouped.setdefault(key, []).append(value)
        return {key: values[0] if len(values) == 1 else values for key, values in grouped.items()}
    return _parse_form(request.body, request.content_type)


def _parse_form(body: bytes, content_type: str | None) -> Params:
    """Form bodies as werkzeug parses them: only urlencoded and multipart; anything else is empty."""
    header = Message()
    header["content-type"] = content_type or ""
    mimetype = header.get_content_type()
    params: Params = {}
    if mimetype == "application/x-www-form-urlencoded":
        text = body.decode("utf-8", "replace")
        for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
            params.setdefault(key, value)
    elif mimetype == "multipart/form-data" and content_type is not None:
        message = BytesParser().parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        if message.is_multipart():
            for part in message.get_payload():
                if not isinstance(part, Message):
                    continue
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    params.setdefault(name, payload.decode("utf-8", "replace"))
    return params


# -- legacy method signatures (0.8.1 jobdispatcher/JobDispatcher.py) --------------------------------
# Calling these stubs with the decoded parameters raises the very TypeError the real
# server turns into an HTTP 500 (unknown or missing parameters).  They return nothing.


def getJob(
    req: object,
    siteName: object,
    token: object = None,
    timeout: object = 60,
    cpu: object = None,
    mem: object = None,
    diskSpace: object = None,
    prodSourceLabel: object = None,
    node: object = None,
    computingElement: object = None,
    AtlasRelease: object = None,
    prodUserID: object = None,
    getProxyKey: object = None,
    countryGroup: object = None,
    workingGroup: object = None,
    allowOtherCountry: object = None,
    taskID: object = None,
    nJobs: object = None,
    background: object = None,
    resourceType: object = None,
    harvester_id: object = None,
    worker_id: object = None,
    schedulerID: object = None,
    jobType: object = None,
    viaTopic: object = None,
    remaining_time: object = None,
) -> None:
    """Legacy ``getJob`` parameters (all strings on the wire)."""


def updateJob(
    req: object,
    jobId: object,
    state: object,
    token: object = None,
    transExitCode: object = None,
    pilotErrorCode: object = None,
    pilotErrorDiag: object = None,
    timestamp: object = None,
    timeout: object = 60,
    xml: object = "",
    node: object = None,
    workdir: object = None,
    cpuConsumptionTime: object = None,
    cpuConsumptionUnit: object = None,
    remainingSpace: object = None,
    schedulerID: object = None,
    pilotID: object = None,
    siteName: object = None,
    messageLevel: object = None,
    pilotLog: object = "",
    metaData: object = "",
    cpuConversionFactor: object = None,
    exeErrorCode: object = None,
    exeErrorDiag: object = None,
    pilotTiming: object = None,
    computingElement: object = None,
    startTime: object = None,
    endTime: object = None,
    nEvents: object = None,
    nInputFiles: object = None,
    batchID: object = None,
    attemptNr: object = None,
    jobMetrics: object = None,
    stdout: object = "",
    jobSubStatus: object = None,
    coreCount: object = None,
    maxRSS: object = None,
    maxVMEM: object = None,
    maxSWAP: object = None,
    maxPSS: object = None,
    avgRSS: object = None,
    avgVMEM: object = None,
    avgSWAP: object = None,
    avgPSS: object = None,
    totRCHAR: object = None,
    totWCHAR: object = None,
    totRBYTES: object = None,
    totWBYTES: object = None,
    rateRCHAR: object = None,
    rateWCHAR: object = None,
    rateRBYTES: object = None,
    rateWBYTES: object = None,
    corruptedFiles: object = None,
    meanCoreCount: object = None,
    cpu_architecture_level: object = None,
    grid: object = None,
    source_site: object = None,
    destination_site: object = None,
) -> None:
    """Legacy ``updateJob`` parameters (all strings on the wire, except in JSON bodies)."""


LEGACY_METHODS: dict[str, Callable[..., None]] = {"getJob": getJob, "updateJob": updateJob}


def bind_legacy(method: str, params: Params) -> Params:
    """All of the method's parameters with defaults applied, or the server's ``TypeError``."""
    stub = LEGACY_METHODS[method]
    stub(None, **params)  # raises e.g. "getJob() got an unexpected keyword argument 'x'"
    bound = inspect.signature(stub).bind(None, **params)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "req"}


# -- v1 endpoint signatures (1.0.4 api/v1/*_api.py) ------------------------------------------------

_REQUIRED = inspect.Parameter.empty
_UNTYPED = inspect.Parameter.empty
_Spec = tuple[str, object, object]  # (name, annotation, default)


def _signature(*specs: _Spec) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("req", kind)]
    params += [
        inspect.Parameter(name, kind, default=default, annotation=annotation)
        for name, annotation, default in specs
    ]
    return inspect.Signature(params)


def _numbers(*names: str) -> tuple[_Spec, ...]:
    return tuple((name, int | float, None) for name in names)


@dataclass(frozen=True)
class V1Endpoint:
    """One ``@request_validation``-decorated function: its requirements and signature."""

    secure: bool
    production: bool
    http_method: str | None
    signature: inspect.Signature


V1_ENDPOINTS: dict[tuple[str, str], V1Endpoint] = {
    ("pilot", "acquire_jobs"): V1Endpoint(
        True,
        False,
        "POST",
        _signature(
            ("site_name", str, _REQUIRED),
            ("timeout", int, 60),
            ("memory", int, None),
            ("disk_space", int, None),
            ("prod_source_label", str, None),
            ("node", str, None),
            ("computing_element", str, None),
            ("prod_user_id", str, None),
            ("get_proxy_key", str, None),
            ("task_id", int, None),
            ("n_jobs", int, 1),
            ("background", bool, None),
            ("resource_type", str, None),
            ("harvester_id", str, None),
            ("worker_id", int, None),
            ("scheduler_id", str, None),
            ("job_type", str, None),
            ("via_topic", bool, None),
            ("remaining_time", _UNTYPED, None),
            ("target_architecture", dict | str, None),
        ),
    ),
    ("pilot", "get_job_status"): V1Endpoint(
        True,
        False,
        "GET",
        _signature(("job_ids", typing.List[int], _REQUIRED), ("timeout", int, 60)),  # noqa: UP006 - the server's annotation
    ),
    ("pilot", "update_job"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("job_id", int, _REQUIRED),
            ("job_status", str, _REQUIRED),
            ("job_output_report", str, ""),
            ("node", str, None),
            ("cpu_consumption_time", int, None),
            ("cpu_consumption_unit", str, None),
            ("scheduler_id", str, None),
            ("pilot_id", str, None),
            ("site_name", str, None),
            ("pilot_log", str, ""),
            ("meta_data", str, ""),
            ("cpu_conversion_factor", float | int, None),
            ("trans_exit_code", int, None),
            ("pilot_error_code", int, None),
            ("pilot_error_diag", str, None),
            ("exe_error_code", int, None),
            ("exe_error_diag", str, None),
            ("pilot_timing", str, None),
            ("start_time", str, None),
            ("end_time", str, None),
            ("n_events", int, None),
            ("n_input_files", int, None),
            ("batch_id", str, None),
            ("attempt_nr", int, None),
            ("job_metrics", str, None),
            ("stdout", str, ""),
            ("job_sub_status", str, None),
            ("core_count", int, None),
            *_numbers(
                "max_rss", "max_vmem", "max_swap", "max_pss", "avg_rss", "avg_vmem", "avg_swap", "avg_pss"
            ),
            *_numbers("tot_rchar", "tot_wchar", "tot_rbytes", "tot_wbytes"),
            *_numbers("rate_rchar", "rate_wchar", "rate_rbytes", "rate_wbytes"),
            ("corrupted_files", str, None),
            ("mean_core_count", int, None),
            ("cpu_architecture_level", str, None),
            ("grid", str, None),
            ("source_site", str, None),
            ("destination_site", str, None),
            ("timeout", int, 60),
        ),
    ),
    ("pilot", "update_worker_node"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("site", str, _REQUIRED),
            ("host_name", str, _REQUIRED),
            ("cpu_model", str, _REQUIRED),
            ("panda_queue", str, None),
            ("n_logical_cpus", int, None),
            ("n_sockets", int, None),
            ("cores_per_socket", int, None),
            ("threads_per_core", int, None),
            ("cpu_architecture", str, None),
            ("cpu_architecture_level", str, None),
            ("clock_speed", float, None),
            ("total_memory", int, None),
            ("total_local_disk", int, None),
            ("timeout", int, 60),
        ),
    ),
    ("pilot", "update_worker_node_gpu"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("site", str, _REQUIRED),
            ("host_name", str, _REQUIRED),
            ("vendor", str, _REQUIRED),
            ("model", str, _REQUIRED),
            ("count", int, _REQUIRED),
            ("vram", int, None),
            ("architecture", str, None),
            ("framework", str, None),
            ("framework_version", str, None),
            ("driver_version", str, None),
            ("timeout", int, 60),
        ),
    ),
    ("system", "is_alive"): V1Endpoint(False, False, "GET", _signature()),
}


class V1Rejected(Exception):
    """``request_validation`` refused the call: the reply is ``success: false`` with this message."""


def validate_v1(endpoint: V1Endpoint, method: str, http_method: str, params: Params) -> Params:
    """Steps 3-5 of ``request_validation``: HTTP method, binding, type check (and GET casts).

    Returns the bound arguments (defaults applied, GET values cast).  Raises
    ``V1Rejected`` for the server's ``success: false`` replies; other exceptions are
    the server's HTTP 500s (for instance ``int | float`` annotations have no
    ``__name__``, so a wrongly typed value there fails while building the message).
    """
    if endpoint.http_method and endpoint.http_method != http_method:
        raise V1Rejected(f"expecting {endpoint.http_method}, received {http_method}")
    if "req" in params:
        raise TypeError(f"{method}() got multiple values for argument 'req'")
    try:
        bound = endpoint.signature.bind(None, **params)
    except TypeError as exc:
        raise V1Rejected(f"Argument error: {exc}") from None
    bound.apply_defaults()
    for name, value in list(bound.arguments.items()):
        if name == "req":
            continue
        parameter = endpoint.signature.parameters[name]
        expected: object = parameter.annotation
        default: object = parameter.default
        # like the server: values equal to the default, and unannotated parameters, are not checked
        if expected is inspect.Parameter.empty or default == value:
            continue
        if http_method == "GET":
            value = _cast_get_value(name, value, expected, default)
            bound.arguments[name] = value
        _check_type(name, value, expected, default)
    return {name: value for name, value in bound.arguments.items() if name != "req"}


def _type_name(annotation: object) -> str:
    # deliberately getattr: union annotations have no __name__ and the server fails right there
    name: str = getattr(annotation, "__name__")  # noqa: B009
    return name


def _cast_get_value(name: str, value: object, expected: object, default: object) -> object:
    """Query-string values arrive as strings; the server casts them to the annotation."""
    origin, args = get_origin(expected), get_args(expected)
    try:
        if value == "None" and default is None:
            return None
        if expected is str:
            return value
        if expected is bool:
            return _str_method(value, "lower")() in ("true", "1")
        if expected is int:
            return int(float(value))  # type: ignore[arg-type] # wrong types raise TypeError, as on the server
        if origin is list and args:
            if isinstance(value, str):
                value = [value]
            converters: dict[object, Callable[[object], object]] = {
                int: lambda item: int(float(item)),  # type: ignore[arg-type]
                float: lambda item: float(item),  # type: ignore[arg-type]
                bool: lambda item: _str_method(item, "lower")() in ("true", "1"),
            }
            convert = converters.get(args[0])
            if convert is None:
                return value
            return [convert(item) for item in value]  # type: ignore[attr-defined]
        if not isinstance(expected, type):
            raise TypeError(f"Expected {expected}, received {type(value)}")
        if not isinstance(value, expected):
            value = ast.literal_eval(value)  # type: ignore[arg-type]
        if not isinstance(value, expected):
            raise TypeError(f"Expected {expected}, received {type(value)}")
        return value
    except (ValueError, TypeError):
        raise V1Rejected(
            f"Type error: '{name}' with value '{value}' could not be casted to type "
            f"{_type_name(expected)} from {type(value).__name__}."
        ) from None


def _str_method(value: object, attribute: str) -> Callable[[], str]:
    method: Callable[[], str] = getattr(value, attribute)  # AttributeError for non-strings, like the server
    return method


def _check_type(name: str, value: object, expected: object, default: object) -> None:
    origin, args = get_origin(expected), get_args(expected)
    if origin is not None and origin is not Union and origin is not UnionType:
        assert isinstance(origin, type)
        if not isinstance(value, origin):
            raise V1Rejected(
                f"Type error: '{name}' must be of type {origin.__name__}, got {type(value).__name__}."
            )
        if args and origin is list and isinstance(value, list):
            element = args[0]
            assert isinstance(element, type)
            if not all(isinstance(item, element) for item in value):
                raise V1Rejected(f"Type error: All elements in '{name}' must be {element.__name__}.")
        return
    if not isinstance(value, expected) and not (value is None and value == default):  # type: ignore[arg-type]
        raise V1Rejected(
            f"Type error: '{name}' must be of type {_type_name(expected)}, got {type(value).__name__}."
        )


# -- reply encoding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An HTTP reply as the server sends it."""

    status: int
    content_type: str
    body: bytes
    reason: bytes = b"OK"


def legacy_response(status_code: int, error_dialog: str | None = None) -> dict[str, object]:
    """``Protocol.Response``: the status code, and ``errorDialog`` when given."""
    data: dict[str, object] = {"StatusCode": status_code}
    if error_dialog is not None:
        data["errorDialog"] = error_dialog
    return data


def encode_legacy(data: Mapping[str, object], accept_json: bool) -> Reply:
    """``Response.encode``: urlencoded text, or JSON (with a JSON content type) for JSON clients."""
    if accept_json:
        return Reply(200, "application/json", json.dumps(data).encode())
    return Reply(200, "text/plain", urllib.parse.urlencode(data).encode())


def v1_response(success: bool, message: str = "", data: object = None) -> dict[str, object]:
    """``generate_response``."""
    return {"success": success, "message": message, "data": data}


def encode_v1(response: Mapping[str, object], json_reply: bool) -> Reply:
    """JSON when asked for, otherwise ``str(dict)``; the content type is text/plain either way."""
    text = json.dumps(response) if json_reply else str(dict(response))
    return Reply(200, "text/plain", text.encode())


def error_reply(error: HTTPError) -> Reply:
    return Reply(error.status, "text/plain", error.body.encode(), error.reason)


def text_error(status: int, text: str) -> Reply:
    return error_reply(HTTPError(status, text))
