"""No network for the tests that say "no network": a namespace for processes, a guard in-process.

* ``NetnsSpawner(spawner, tools)`` is an ``IReactorProcess`` that starts every process
  in a fresh network namespace where only the loopback interface is up (``unshare
  --net``, then ``ip link set lo up``, then ``exec`` of the command: the pid stays the
  command's).  Give it to ``pilot.localrun.start_pilot_process`` (or a
  ``ManagedProcess``) and the ``twistd -n pilot`` under test can reach nothing but
  itself and other processes of its namespace.  ``require_netns`` finds the tools and
  tries them once; where they are missing or do not work the test is skipped, except
  on CI (``CI=true``), where it fails.
* ``socket_guard()`` is for code running in the test's own process: while it is
  active, ``connect``, ``connect_ex`` and ``sendto`` of any Python socket to an address
  that is neither loopback nor ``AF_UNIX`` raise ``NetworkForbidden`` (an ``OSError``
  with ``ENETUNREACH``, which Twisted reports as a failed connection) and are recorded
  in ``guard.blocked``; loopback attempts go through and are recorded in
  ``guard.loopback``, so that a test can assert that nothing was attempted at all.
  Name resolution is not covered (the C library does it); use the namespace for that.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shlex
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, AnyStr, NoReturn

from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from pilot.util.records import record

#: Where ``ip`` and ``unshare`` live when ``PATH`` lacks the sbin directories.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@record(frozen=True)
class NetnsTools:
    """Absolute paths of the programs the namespace needs."""

    unshare: str
    ip: str
    sh: str


def find_tools() -> NetnsTools | str:
    """The tools, or why they cannot be had."""
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), SYSTEM_PATH) if p)
    found = {name: shutil.which(name, path=search) for name in ("unshare", "ip", "sh")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        return f"no {' and no '.join(missing)} on this machine (util-linux and iproute2 provide them)"
    return NetnsTools(**{name: str(path) for name, path in found.items()})


def netns_argv(argv: Sequence[str], tools: NetnsTools) -> list[str]:
    """``argv`` run in a new network namespace with only loopback up (``argv[0]`` is executed)."""
    setup = f'{shlex.quote(tools.ip)} link set lo up && exec "$@"'
    user = [] if os.geteuid() == 0 else ["--map-root-user"]  # unprivileged: a user namespace too
    return [tools.unshare, *user, "--net", tools.sh, "-c", setup, "netns", *argv]


@implementer(IReactorProcess)
class NetnsSpawner:
    """``spawner``, but every process starts in a namespace of its own with only loopback."""

    def __init__(self, spawner: IReactorProcess, tools: NetnsTools) -> None:
        self._spawner = spawner
        self.tools = tools

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport:
        command = [os.fsdecode(executable), *(os.fsdecode(a) for a in list(args)[1:])]
        argv = netns_argv(command, self.tools)
        return self._spawner.spawnProcess(
            processProtocol, argv[0], argv, env, path, uid, gid, usePTY, childFDs
        )


async def require_netns(test: SynchronousTestCase, spawner: IReactorProcess) -> NetnsTools:
    """The tools, after one trial run of ``true`` in a namespace; else skip (fail on CI)."""
    tools = find_tools()
    if isinstance(tools, str):
        unavailable(test, tools)
    argv = netns_argv(["true"], tools)
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ), reactor=spawner)
    if code != 0:
        unavailable(test, f"no network namespace here (exit {code}): {err.decode(errors='replace')[-500:]}")
    return tools


def unavailable(test: SynchronousTestCase, reason: str) -> NoReturn:
    """Skip the test for ``reason``; on CI (``CI=true``) fail it instead."""
    if os.environ.get("CI", "").lower() == "true":
        test.fail(f"required on CI: {reason}")
    raise SkipTest(reason)


class NetworkForbidden(OSError):
    """A socket of the test's process tried to reach beyond loopback under ``socket_guard``."""


@record(frozen=True)
class Attempt:
    """One connection (or datagram) attempt seen by ``socket_guard``."""

    family: int
    type: int
    address: Any
    call: str  # connect, connect_ex or sendto


@record
class SocketGuard:
    """What ``socket_guard`` saw; ``attempts`` is everything but ``AF_UNIX``."""

    blocked: list[Attempt]
    loopback: list[Attempt]

    @property
    def attempts(self) -> list[Attempt]:
        return [*self.blocked, *self.loopback]

    @property
    def loopback_tcp(self) -> list[Attempt]:
        return [a for a in self.loopback if a.type & socket.SOCK_STREAM and a.call != "sendto"]


def is_loopback(family: int, address: Any) -> bool:
    """Whether ``address`` of ``family`` stays on this host (``AF_UNIX`` or a loopback IP)."""
    if family == socket.AF_UNIX:
        return True
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple) or not address:
        return False
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a name: where it leads is not known here
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@contextmanager
def socket_guard() -> Iterator[SocketGuard]:
    """See the module docstring.  Not reentrant; patches ``socket.socket`` for all threads."""
    guard = SocketGuard([], [])
    names = ("connect", "connect_ex", "sendto")
    originals: dict[str, Callable[..., Any]] = {name: getattr(socket.socket, name) for name in names}

    def guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def method(sock: socket.socket, *args: Any) -> Any:
            address = args[-1] if name == "sendto" else args[0]
            attempt = Attempt(int(sock.family), int(sock.type), address, name)
            if sock.family == socket.AF_UNIX:
                pass
            elif is_loopback(sock.family, address):
                guard.loopback.append(attempt)
            else:
                guard.blocked.append(attempt)
                raise NetworkForbidden(errno.ENETUNREACH, f"network forbidden in this test: {address!r}")
            return original(sock, *args)

        return method

    for name, original in originals.items():
        setattr(socket.socket, name, guarded(name, original))
    try:
        yield guard
    finally:
        for name, original in originals.items():
            setattr(socket.socket, name, original)
