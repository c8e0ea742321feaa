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
Nothing here touches the job store: this is parsing and encoding only.  The method
signatures and the parameter checks behind them are in ``signatures``.
"""

from __future__ import annotations

import gzip
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser

# the method signatures and their checks live in ``signatures``; their public names are
# part of this module's interface too (``protocol.validate_v1`` ...)
from pilot.devserver.signatures import LEGACY_METHODS as LEGACY_METHODS
from pilot.devserver.signatures import V1_ENDPOINTS as V1_ENDPOINTS
from pilot.devserver.signatures import Params as Params
from pilot.devserver.signatures import V1Endpoint as V1Endpoint
from pilot.devserver.signatures import V1Rejected as V1Rejected
from pilot.devserver.signatures import bind_legacy as bind_legacy
from pilot.devserver.signatures import getJob as getJob
from pilot.devserver.signatures import updateJob as updateJob
from pilot.devserver.signatures import validate_v1 as validate_v1

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


# -- reply encoding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An HTTP reply as the server sends it."""

    status: int
    content_type: str
    body: bytes
    reason: bytes = b"OK"
    headers: tuple[tuple[str, str], ...] = ()


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
    """JSON when asked for, otherwise ``str(dict)``; the content type is text/plain either way.

    A value JSON cannot carry fails the request with the server's own message (its
    ``encode_special_cases``), which the caller turns into the HTTP 500 the server sends.
    """
    text = json.dumps(response, default=_encode_special_cases) if json_reply else str(dict(response))
    return Reply(200, "text/plain", text.encode())


def _encode_special_cases(value: object) -> object:
    """``server/panda.py:encode_special_cases`` for the values a reply of ours can hold."""
    raise TypeError(f"Type not serializable for {value} ({type(value)})")


def error_reply(error: HTTPError) -> Reply:
    return Reply(error.status, "text/plain", error.body.encode(), error.reason)


def text_error(status: int, text: str) -> Reply:
    return error_reply(HTTPError(status, text))
