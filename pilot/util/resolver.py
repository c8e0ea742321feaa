"""Host name resolution in the pilot's own worker pool.

Twisted resolves the names of HTTPS servers with ``getaddrinfo`` in the reactor's
default thread pool.  The pilot keeps its blocking calls in pools of its own
(``pilot.util.threads``), and a ``getaddrinfo`` is one: on a worker node with a slow or
dead DNS server it blocks for the resolver's full timeout and retries.
``PoolResolver`` runs it through a ``ThreadRunner`` instead, so the pilot needs no
thread of the reactor's pool at all (each thread costs its stack and a malloc arena).

Names are ASCII almost always (``pandaserver.cern.ch``): those are passed to
``getaddrinfo`` as bytes, which spares the process the ``idna`` codec and the Unicode
tables it pulls in (``stringprep``, ``unicodedata``), which CPython loads for any
``str`` host.  With the reactor-pool thread avoided, that is about 0.2 MB of peak RSS
in ``bench/pilotcost``.  Other names are
IDNA-encoded as before.  Failure to resolve is an empty resolution, as Twisted's own
resolver reports it: the endpoint then fails with its usual ``DNSLookupError``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Literal

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.logs import pilot_observer
from pilot.util.threads import ThreadRunner

#: getaddrinfo's answer: (family, type, proto, canonname, sockaddr) tuples.
AddrInfo = list[tuple[Any, Any, int, str, Any]]

_SOCKET_TYPES = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}
_TRANSPORTS: dict[int, Literal["TCP", "UDP"]] = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}


def host_argument(name: str) -> bytes:
    """``name`` as ``getaddrinfo`` takes it: plain bytes if ASCII, else IDNA-encoded."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def address_family(address_types: Sequence[type[IAddress]] | None) -> int:
    """The ``getaddrinfo`` family for the address types the caller accepts (None: any)."""
    types = set(address_types or ())
    if types == {IPv4Address}:
        return socket.AF_INET
    if types == {IPv6Address}:
        return socket.AF_INET6
    return socket.AF_UNSPEC


def lookup(host: bytes, port: int, family: int, socket_type: int) -> AddrInfo:
    """Blocking: ``getaddrinfo``; a name that does not resolve gives no addresses."""
    try:
        return socket.getaddrinfo(host, port, family, socket_type)
    except (socket.gaierror, UnicodeError):
        return []


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """A ``getaddrinfo`` under way cannot be interrupted; its answer is simply delivered."""


@implementer(IHostnameResolver)
class PoolResolver:
    """``IHostnameResolver`` whose ``getaddrinfo`` calls run through ``in_thread``."""

    log = Logger(observer=pilot_observer)

    def __init__(self, in_thread: ThreadRunner) -> None:
        self._in_thread = in_thread

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        socket_type = _SOCKET_TYPES.get(transportSemantics, socket.SOCK_STREAM)
        looking = self._in_thread(
            lookup, host_argument(hostName), portNumber, address_family(addressTypes), socket_type
        )

        def deliver(answers: AddrInfo) -> None:
            for family, kind, _proto, _canonical, sockaddr in answers:
                transport = _TRANSPORTS.get(kind, "TCP")
                if family == socket.AF_INET:
                    resolutionReceiver.addressResolved(IPv4Address(transport, sockaddr[0], sockaddr[1]))
                elif family == socket.AF_INET6:
                    resolutionReceiver.addressResolved(IPv6Address(transport, *sockaddr))

        def failed(failure: Failure) -> None:
            # the pool refused the call (the pilot is stopping): no addresses, as for a bad name
            self.log.warn("cannot resolve {name}: {error}", name=hostName, error=failure.getErrorMessage())

        looking.addCallbacks(deliver, failed)
        looking.addBoth(lambda _: resolutionReceiver.resolutionComplete())
        return resolution
