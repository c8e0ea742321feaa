"""Decoding the server's replies: bytes → a dict → a typed result.

Formats (``panda-server-protocol.md``): v1 replies are ``{"success", "message",
"data"}`` JSON objects; legacy replies are JSON or urlencoded (``StatusCode=0&...``).
A reply that is HTML, truncated, a Python repr, JSON of the wrong shape or nested
too deep is a ``ServerProtocolError``.  No message quotes the reply body: a body may
echo credentials, and is not the operator's business in a log line; only a v1 error
reply's ``message`` field (the server's own one-line explanation) may be shown,
through ``server_message``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from pilot.server.api import ApiMode
from pilot.server.errors import ServerProtocolError
from pilot.server.messages import AcquireResult, StatusCode, UpdateResult, parse_commands

#: The longest server ``message`` shown in an exception or a log line.
MESSAGE_LIMIT = 200


def _loads(text: bytes | str, what: str, kind: str) -> Any:
    """``json.loads`` whose deep-nesting failure is a protocol error, not a crash.

    CPython's decoder recurses once per nesting level and raises RecursionError
    (not ValueError) past the interpreter's limit: ``'[' * 100000`` would otherwise
    escape every handler of the pilot.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ServerProtocolError(f"{what}: {kind} is nested too deeply") from None


def decode_reply(body: bytes, content_type: str, what: str) -> dict[str, Any]:
    """Decode a reply body into a dict: JSON, or (legacy) urlencoded ``k=v&...``.

    ``what`` names the call in error messages (the client passes the URL).
    """
    stripped = body.strip()
    if not stripped:
        raise ServerProtocolError(f"{what}: empty reply")
    if stripped[:1] == b"<":
        raise ServerProtocolError(f"{what}: the server replied with HTML, not data")
    if stripped[:1] in (b"{", b"["):
        try:
            document = _loads(stripped, what, "the JSON reply")
        except (ValueError, UnicodeDecodeError):
            if stripped[:2] == b"{'" or b"': " in stripped[:200]:
                raise ServerProtocolError(
                    f"{what}: the server replied with a Python repr instead of JSON"
                ) from None
            raise ServerProtocolError(
                f"{what}: truncated or malformed JSON reply ({len(body)} bytes)"
            ) from None
        if not isinstance(document, dict):
            raise ServerProtocolError(f"{what}: expected a JSON object, got {type(document).__name__}")
        return document
    if "json" in content_type:
        raise ServerProtocolError(f"{what}: reply claims JSON but is not JSON ({len(body)} bytes)")
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerProtocolError(f"{what}: reply is not text") from None
    if "=" not in text or "StatusCode" not in text:
        raise ServerProtocolError(f"{what}: unrecognised reply ({len(body)} bytes)")
    parsed = parse_qs(text, keep_blank_values=True, strict_parsing=False)
    return {key: values[0] for key, values in parsed.items()}


def printable(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, control characters replaced by ``?``."""
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(text) > limit else "")


def server_message(body: bytes) -> str | None:
    """The ``message`` of a v1 JSON error reply (printable, <= 200 characters), else None.

    This is the only part of an error body the pilot repeats: the v1 server puts its
    one-line explanation there (``"Argument error: ..."``).  Anything else (HTML
    error pages, legacy plain-text bodies, tracebacks) is never quoted.
    """
    stripped = body.strip()
    if stripped[:1] != b"{" or len(stripped) > 1 << 16:
        return None
    try:
        document = json.loads(stripped)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    message = document.get("message") if isinstance(document, dict) else None
    if not isinstance(message, str) or not message.strip():
        return None
    return printable(message.strip())


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


def parse_acquire_reply(document: Mapping[str, Any], api: ApiMode, what: str | None = None) -> AcquireResult:
    """The outcome of a job request; ``what`` (default: the method) names the call in errors."""
    what = what or ("getJob" if api is ApiMode.LEGACY else "acquire_jobs")
    if api is ApiMode.LEGACY:
        status = _status_code(document.get("StatusCode"), what)
        message = str(document.get("errorDialog") or "")
        if status is not StatusCode.SUCCESS:
            return AcquireResult(status, (), message)
        if "jobs" in document:
            jobs = document["jobs"]
            if isinstance(jobs, str):
                try:
                    jobs = _loads(jobs, what, "'jobs'")
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


def parse_update_reply(document: Mapping[str, Any], api: ApiMode, what: str | None = None) -> UpdateResult:
    """The outcome of a job update; ``what`` (default: the method) names the call in errors."""
    what = what or ("updateJob" if api is ApiMode.LEGACY else "update_job")
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
        pilot_secrets=_secrets_text(secrets, what),
    )


def _secrets_text(secrets: object, what: str) -> str | None:
    if isinstance(secrets, str) or not secrets:
        return secrets if isinstance(secrets, str) else None
    try:
        return json.dumps(secrets)
    except RecursionError:  # decoded just under the limit, re-encoded a few frames deeper
        raise ServerProtocolError(f"{what}: 'pilotSecrets' is nested too deeply") from None


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
