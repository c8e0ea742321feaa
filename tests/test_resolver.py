"""``pilot.util.resolver``: host names resolved in the pilot's own pool."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pilot.util.resolver import PoolResolver, address_family, host_argument, lookup
from pilot.util.threads import PoolStopped, WorkerPool

reactor: Any = _reactor


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.began: IHostResolution | None = None
        self.addresses: list[Any] = []
        self.done: Deferred[None] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.began = resolution

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(None)


def inline(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return succeed(f(*args, **kwargs))


def no_such_name(*args: Any) -> Any:
    """The answer of a resolver for an unknown name (no DNS query from the tests)."""
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class ArgumentTests(SynchronousTestCase):
    def test_ascii_names_are_bytes(self) -> None:
        self.assertEqual(host_argument("pandaserver.cern.ch"), b"pandaserver.cern.ch")

    def test_other_names_are_idna(self) -> None:
        self.assertEqual(host_argument("bücher.example"), b"xn--bcher-kva.example")

    def test_families(self) -> None:
        self.assertEqual(address_family(None), socket.AF_UNSPEC)
        self.assertEqual(address_family([IPv4Address]), socket.AF_INET)
        self.assertEqual(address_family([IPv6Address]), socket.AF_INET6)
        self.assertEqual(address_family([IPv4Address, IPv6Address]), socket.AF_UNSPEC)

    def test_unknown_name_has_no_addresses(self) -> None:
        self.patch(socket, "getaddrinfo", no_such_name)
        self.assertEqual(lookup(b"no-such-host.invalid", 443, socket.AF_UNSPEC, socket.SOCK_STREAM), [])


class ResolverTests(SynchronousTestCase):
    def test_localhost_with_port_and_transport(self) -> None:
        receiver = Receiver()
        resolution = PoolResolver(inline).resolveHostName(receiver, "localhost", 8443, [IPv4Address])
        self.assertIs(receiver.began, resolution)
        self.assertEqual(resolution.name, "localhost")
        self.successResultOf(receiver.done)
        self.assertIn(IPv4Address("TCP", "127.0.0.1", 8443), receiver.addresses)
        self.assertTrue(all(isinstance(a, IPv4Address) for a in receiver.addresses))

    def test_udp_semantics(self) -> None:
        receiver = Receiver()
        PoolResolver(inline).resolveHostName(receiver, "127.0.0.1", 53, None, "UDP")
        self.successResultOf(receiver.done)
        self.assertEqual(receiver.addresses, [IPv4Address("UDP", "127.0.0.1", 53)])

    def test_ipv6_literal(self) -> None:
        if not socket.has_ipv6:
            raise AssertionError("this machine's Python has no IPv6")
        receiver = Receiver()
        PoolResolver(inline).resolveHostName(receiver, "::1", 443)
        self.successResultOf(receiver.done)
        self.assertEqual(receiver.addresses[0].host, "::1")
        self.assertIsInstance(receiver.addresses[0], IPv6Address)

    def test_bad_name_completes_empty(self) -> None:
        self.patch(socket, "getaddrinfo", no_such_name)
        receiver = Receiver()
        PoolResolver(inline).resolveHostName(receiver, "no-such-host.invalid", 443)
        self.successResultOf(receiver.done)
        self.assertEqual(receiver.addresses, [])

    def test_stopped_pool_completes_empty_and_warns(self) -> None:
        def refused(f: Any, *args: Any) -> Deferred[Any]:
            return fail(PoolStopped("worker pool pilot-blocking is stopped"))

        receiver = Receiver()
        PoolResolver(refused).resolveHostName(receiver, "localhost", 443)
        self.successResultOf(receiver.done)
        self.assertEqual(receiver.addresses, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class RealPoolTests(TestCase):
    async def test_resolves_in_the_pool_not_on_the_reactor(self) -> None:
        pool = WorkerPool(reactor, 1, "resolver-test")
        pool.start()
        self.addCleanup(pool.stop)
        threads: list[str] = []

        def recording(f: Any, *args: Any) -> Deferred[Any]:
            def run(*a: Any) -> Any:
                import threading

                threads.append(threading.current_thread().name)
                return f(*a)

            return pool.run(run, *args)

        receiver = Receiver()
        PoolResolver(recording).resolveHostName(receiver, "localhost", 80, [IPv4Address])
        await receiver.done
        self.assertIn(IPv4Address("TCP", "127.0.0.1", 80), receiver.addresses)
        self.assertEqual(len(threads), 1)
        self.assertIn("resolver-test", threads[0])


class CodecTests(SynchronousTestCase):
    def test_ascii_names_load_no_idna_codec(self) -> None:
        code = (
            "import sys, socket\n"
            "from pilot.util.resolver import lookup, host_argument\n"
            "assert lookup(host_argument('localhost'), 80, socket.AF_UNSPEC, socket.SOCK_STREAM)\n"
            "print('encodings.idna' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "False")
