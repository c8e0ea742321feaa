"""What can go wrong in an exchange with the PanDA server (or a document download).

Logical outcomes (no jobs, a DB time-out, a missing role...) are results, never
exceptions; these classes mean the exchange itself failed.  Messages name the URL
once and never quote a reply body: bodies may echo credentials or carry megabytes.

``StaleConnection`` and ``TLSHandshakeFailed`` are the *reasons* inside Twisted's
``ResponseNeverReceived``/``RequestTransmissionFailed`` that the connection layer
(``pilot.server.connection``) substitutes for the raw ones, so the retry policy can
tell "the server closed a kept-alive connection as we reused it" and "the TLS
handshake failed, nothing was sent" from an ordinary lost reply.
"""

from __future__ import annotations


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
    """The server does not serve this method (wrong API generation) or this URL (404)."""


class ServerProtocolError(ServerError):
    """The reply cannot be understood: HTML, truncated, Python repr, wrong JSON shape, too deep."""


class ReplyTooLarge(ServerProtocolError):
    """The reply is larger than the caller's limit; reading stopped once it was passed."""


class ChecksumMismatch(ServerError):
    """A downloaded document does not have the checksum the caller expected."""


class StaleConnection(Exception):
    """A reused (kept-alive) connection closed before any byte of the reply arrived.

    The usual cause is the server closing an idle connection just as the pilot sent a
    request on it (Apache's ``KeepAliveTimeout``).  The request may have reached the
    server, so only idempotent calls are repeated on a fresh connection.
    """


class TLSHandshakeFailed(Exception):
    """The TLS handshake failed: the server never saw the request (safe to repeat).

    ``hint`` tells the operator what to check (``--cacert``/``--capath``, the host name).
    """

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(f"TLS handshake failed: {problem}" + (f"; {hint}" if hint else ""))
        self.problem = problem
        self.hint = hint


class LocalFileError(Exception):
    """A download could not be written on the worker node (full disk, permissions).

    Not a server failure and not retried: repeating the download would fail the same way.
    """

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno
