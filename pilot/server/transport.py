"""The exchange itself: headers, HTTP status classes, failure classes, the retry loop.

One policy for every call (``panda-server-protocol.md`` §7): connection errors, 5xx
(except the legacy server's deterministic argument errors) and 429 are retried with
exponential backoff; any other status is final.  A call that is not idempotent
(``acquire_jobs``: a lost reply may have dispatched a job) is repeated only after a
failure that proves the server never saw it: no connection, a failed TLS handshake,
or an error status.  A kept-alive connection the server closed as it was reused is
retried once at once on a fresh connection, for idempotent calls only.

Messages name the URL once (callers do not repeat it) and never quote a reply body.
"""

from __future__ import annotations

import platform
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (  # type: ignore[attr-defined]  # RequestNotSent: not in __all__
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IResponse

from pilot import __version__
from pilot.logs import pilot_observer
from pilot.server.errors import (
    MethodNotFound,
    ServerRefused,
    ServerUnavailable,
    StaleConnection,
    TLSHandshakeFailed,
)
from pilot.server.replies import server_message
from pilot.util.records import record

log = Logger(observer=pilot_observer)

T = TypeVar("T")

USER_AGENT = (
    f"txpilot/{__version__} (Python {sys.version_info.major}.{sys.version_info.minor}; "
    f"{platform.system()} {platform.machine()})"
)


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


@record(frozen=True)
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


class RetryableStatus(Exception):
    """An HTTP status worth retrying (5xx, 429); the server answered, so it did not act."""


# ------------------------------------------------------------------------------------
# HTTP status → outcome

#: Known plain-text error bodies of the server → what we say instead of quoting them.
_KNOWN_BODIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Token authentication failed",), "token authentication failed"),
    (("is banned",), "the pilot's identity is banned on this server"),
    (("unexpected keyword argument",), "the server rejected a parameter of the request"),
    (("Not a gzipped file",), "the server could not read the compressed request body"),
    (("missing", "argument"), "the server misses a required parameter"),
)

#: Legacy 500 replies that come from the request itself and would recur.
_DETERMINISTIC_500 = frozenset(explanation for needles, explanation in _KNOWN_BODIES[2:])


def _explain(body: bytes) -> str | None:
    text = body[:4096].decode("utf-8", errors="replace")
    for needles, explanation in _KNOWN_BODIES:
        if all(needle in text for needle in needles):
            return explanation
    return None


def _status_text(code: int) -> str:
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def check_status(response: IResponse, body: bytes, url: str) -> None:
    """Raise the failure an HTTP error status means; return for 2xx.

    The body decides only the class (a 403 "method ... is forbidden" is a missing
    method, a legacy 500 argument error is final) and, for a v1 JSON reply, the
    server's own ``message``; it is never quoted.
    """
    code = response.code
    if 200 <= code < 300:
        return
    status = _status_text(code)
    text = body[:4096].decode("utf-8", errors="replace")
    if code == 404:
        raise MethodNotFound(f"{url}: {status} (check the server URL and its path prefix)", code)
    if code == 403 and "is forbidden" in text and "method" in text:
        raise MethodNotFound(f"{url}: {status}: the server does not serve this method", code)
    explanation = server_message(body) or _explain(body)
    detail = f"{status}: {explanation}" if explanation else status
    if code == 429 or (code >= 500 and explanation not in _DETERMINISTIC_500):
        raise RetryableStatus(detail)
    raise ServerRefused(f"{url}: {detail}", code)


def content_type(response: IResponse) -> str:
    values: Sequence[bytes] = response.headers.getRawHeaders(b"content-type") or [b""]
    return values[0].decode("latin-1").lower()


# ------------------------------------------------------------------------------------
# Failure classes

_WRAPPED_FAILURES = (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)

TRANSPORT_ERRORS = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    RequestNotSent,
    *_WRAPPED_FAILURES,
    RetryableStatus,
    TimeoutError,
    OSError,
)


def _reasons(exc: BaseException) -> list[Failure]:
    return list(getattr(exc, "reasons", None) or [])


def was_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a cancellation of the request.

    A request cancelled while its TCP connection is being made fails with Twisted's
    ``ConnectingCancelledError`` (not a ``CancelledError``): that is a cancellation too.
    """
    if isinstance(exc, CancelledError | ConnectingCancelledError):
        return True
    return any(r.check(CancelledError) for r in _reasons(exc))


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` proves the server never acted on the request (safe to repeat anything)."""
    if isinstance(exc, ConnectError | DNSLookupError | RequestNotSent | RetryableStatus):
        return True
    reasons = _reasons(exc)
    return (
        isinstance(exc, _WRAPPED_FAILURES)
        and bool(reasons)
        and all(r.check(TLSHandshakeFailed) for r in reasons)
    )


def stale_connection(exc: BaseException) -> bool:
    """Whether a reused connection closed before any byte of the reply came."""
    return isinstance(exc, _WRAPPED_FAILURES) and any(r.check(StaleConnection) for r in _reasons(exc))


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed attempt (no URL: the caller adds it once)."""
    if isinstance(exc, TimeoutError):
        return "no reply within the time-out"
    if isinstance(exc, _WRAPPED_FAILURES):
        reasons = ", ".join(dict.fromkeys(_reason_text(r.value) for r in exc.reasons)) or "connection failed"
        return reasons if never_sent(exc) else f"connection failed ({reasons})"
    return str(exc) or type(exc).__name__


def _reason_text(error: BaseException) -> str:
    if isinstance(error, StaleConnection):
        return "the server closed the kept-alive connection before replying"
    if isinstance(error, SSL.Error):
        return f"TLS failure: {ssl_error_text(error)}"
    return str(error) or type(error).__name__


def ssl_error_text(error: SSL.Error) -> str:
    """OpenSSL's reason strings (``certificate verify failed``), without the list-of-tuples repr."""
    details = error.args[0] if error.args and isinstance(error.args[0], list) else []
    texts = [str(item[-1]) for item in details if isinstance(item, tuple) and item and item[-1]]
    return "; ".join(texts) or str(error) or "TLS error"


# ------------------------------------------------------------------------------------
# The retry loop


@record
class Exchange:
    """How one call is made: where, by which policy, and what to do on a stale connection."""

    clock: IReactorTime
    policy: RetryPolicy
    timeout: float
    idempotent: bool = True
    #: Called once before repeating a call that failed on a stale kept-alive connection,
    #: so that the repeat opens a fresh one (``ServerConnection.drop_idle``).
    fresh_connection: Callable[[], object] | None = None
    #: Called before each attempt (the client's call counter).
    on_attempt: Callable[[], None] | None = None


async def with_retries(url: str, attempt: Callable[[], Awaitable[T]], exchange: Exchange) -> T:
    """Run ``attempt`` until it succeeds or the policy says stop; each attempt timed out alone."""
    failures = 0
    stale_repeated = False
    while True:
        if exchange.on_attempt is not None:
            exchange.on_attempt()
        started = exchange.clock.seconds()
        outcome = await _one_attempt(attempt, exchange)
        if isinstance(outcome, tuple):
            log.debug(
                "{url} answered in {elapsed:.3f} s",
                url=url,
                elapsed=exchange.clock.seconds() - started,
                event="server.call",
            )
            return outcome[0]
        error = outcome
        if stale_connection(error) and not stale_repeated and exchange.idempotent:
            # The server closed a kept-alive connection as we reused it: say so quietly
            # and repeat at once on a fresh connection; this is not a server failure.
            stale_repeated = True
            if exchange.fresh_connection is not None:
                exchange.fresh_connection()
            log.info(
                "{url}: kept-alive connection closed by the server; repeating on a new one",
                url=url,
                event="server.stale_connection",
            )
            continue
        failures += 1
        reason = describe(error)
        if not exchange.idempotent and not never_sent(error):
            raise ServerUnavailable(f"{url}: {reason} (not repeated: the request may have been processed)")
        if failures >= exchange.policy.attempts:
            raise ServerUnavailable(f"{url}: {reason} (after {failures} attempts)")
        delay = exchange.policy.delay(failures)
        log.warn(
            "{url}: {reason}; retrying in {delay:.1f} s ({failures}/{attempts})",
            url=url,
            reason=reason,
            delay=delay,
            failures=failures,
            attempts=exchange.policy.attempts,
            event="server.retry",
        )
        await deferLater(exchange.clock, delay, lambda: None)


async def _one_attempt(attempt: Callable[[], Awaitable[T]], exchange: Exchange) -> tuple[T] | BaseException:
    """One attempt under its time-out: ``(result,)``, or the failure to classify.

    A cancellation from our caller propagates as CancelledError; only our own
    time-out is turned into TimeoutError.  Failures outside the transport classes
    (protocol errors, refusals) propagate at once.
    """

    async def run() -> T:
        return await attempt()

    pending: Deferred[T] = Deferred.fromCoroutine(run())
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        pending.cancel()

    timer = exchange.clock.callLater(exchange.timeout, expire)
    try:
        return (await pending,)
    except Exception as exc:  # classified just below; cancellations re-raised
        if expired:
            return TimeoutError()
        if was_cancelled(exc):
            raise CancelledError() from None  # our caller gave up: not a failure of the server
        if not isinstance(exc, TRANSPORT_ERRORS):
            raise
        return exc
    finally:
        if timer.active():
            timer.cancel()
