"""A real Ray cluster on this machine for the tests: a head and worker nodes, each its own raylet.

``RayCluster(...).start()`` runs ``ray start --head`` and then ``ray start --address=...`` per
extra node, each in its own session (``setsid``), all on the loopback address
``127.0.0.2``: Ray maps ``127.0.0.1`` to the machine's outward address, and a test talks
to nothing but loopback.  ``stop`` ends every process of those sessions (the raylets'
workers are their children, in the same sessions): SIGTERM, a grace, SIGKILL, and waits
until they are gone, so no Ray process outlives a test.

Ray's temporary directory is the test's own; its Unix sockets, whose paths may not be
longer than 107 bytes, go to a short directory under the system's temporary directory
(removed too).  ``require_ray()``: a missing Ray skips a test on a developer's machine and
fails it under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from .events import processes_gone

#: The loopback address the nodes use (not 127.0.0.1: see the module docstring).
NODE_IP = "127.0.0.2"
#: Seconds the processes of a stopped node get between SIGTERM and SIGKILL.
GRACE = 3.0


def require_ray() -> None:
    """Ray importable and its ``ray`` command beside this interpreter, or skip (fail under CI)."""
    # found, not imported: the drivers and nodes import it, this process has no use for it
    if importlib.util.find_spec("ray") is None:
        why = "ray is not installed (pip install 'txpilot[ray]')"
    elif ray_command() is None:
        why = "the ray command is not beside this interpreter"
    else:
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{why}: required under CI")
    raise SkipTest(why)


def ray_command() -> str | None:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray")


def ray_environment(**extra: str) -> dict[str, str]:
    """The environment for Ray processes here: no usage reports, the caller's PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def short_directory(prefix: str = "txr-") -> Path:
    """A directory with a short path (for Unix sockets) under the system's temporary directory."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- processes by session ---------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])


def session_members(sessions: Iterable[int]) -> list[int]:
    """The live (not zombie) processes of these sessions."""
    wanted = set(sessions) - {os.getsid(0)}  # never this test's own session
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z" and stat[1] in wanted:
                found.append(int(entry.name))
    return found


def sessions_mentioning(text: str) -> set[int]:
    """The sessions of live processes whose command line holds ``text`` (a Ray temp directory)."""
    needle = os.fsencode(text)
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                mentions = needle in (entry / "cmdline").read_bytes()
            except OSError:
                continue
            stat = _stat(int(entry.name))
            if mentions and stat is not None and stat[0] != "Z":
                found.add(stat[1])
    return found - {os.getsid(0)}


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


async def end_sessions(reactor: Any, sessions: Iterable[int], grace: float = GRACE) -> None:
    """SIGTERM to every process of the sessions, SIGKILL after ``grace``; returns once all are gone.

    Waits on the processes' pidfds (``tests.events.processes_gone``), never by polling; a
    round that times out moves on to SIGKILL (new members, forked meanwhile, get it too).
    """
    sessions = list(sessions)
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0), (signal.SIGKILL, 10.0)):
        members = session_members(sessions)
        if not members:
            return
        _signal_all(members, signum)
        try:
            await processes_gone(members, timeout=wait)
        except TimeoutError:
            pass
    members = session_members(sessions)
    if members:
        raise AssertionError(f"Ray processes {members} survive SIGKILL")


# -- ray start ------------------------------------------------------------------------------------


class _Started(ProcessProtocol):
    """One ``ray start``: its exit once the node's daemons run.

    Its output goes to a file, never a pipe: the daemons it leaves behind inherit its
    descriptors, and a pipe would stay open (``processEnded`` never come) for their life.
    """

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processExited(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None) or 0)


class RayCluster:
    """See the module docstring.  ``address`` is what a driver passes to ``ray.init``."""

    def __init__(self, reactor: Any, temp_dir: Path) -> None:
        self.reactor = reactor
        self.temp_dir = temp_dir
        self.sockets = short_directory()
        self.sessions: list[int] = []
        self.address = ""
        self.nodes = 0

    async def start(self, nodes: int = 2, cpus: int = 2) -> None:
        """A head and ``nodes - 1`` worker nodes of ``cpus`` CPUs each.

        ``stop`` must be a cleanup already: a node that started stays up until then.
        """
        require_ray()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        output = await self._ray_start("--head", "--port=0", "--include-dashboard=false", cpus=cpus)
        found = re.search(rf"--address='({re.escape(NODE_IP)}:\d+)'", output)
        if found is None:
            raise AssertionError(f"no cluster address in ray start's output:\n{output}")
        self.address = found.group(1)
        for _ in range(nodes - 1):
            await self._ray_start(f"--address={self.address}", cpus=cpus)

    async def _ray_start(self, *args: str, cpus: int) -> str:
        command = ray_command()
        setsid = shutil.which("setsid")
        assert command is not None and setsid is not None
        self.nodes += 1
        argv = [
            setsid,
            command,
            "start",
            *args,
            f"--node-ip-address={NODE_IP}",
            f"--num-cpus={cpus}",
            f"--temp-dir={self.temp_dir}",
            f"--plasma-store-socket-name={self.sockets / f'plasma-{self.nodes}'}",
            f"--raylet-socket-name={self.sockets / f'raylet-{self.nodes}'}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        log = self.temp_dir / f"ray-start-{self.nodes}.log"
        protocol = _Started()
        with open(log, "wb") as out, open(os.devnull, "rb") as devnull:
            transport = self.reactor.spawnProcess(
                protocol,
                setsid,
                argv,
                env=ray_environment(),
                childFDs={0: devnull.fileno(), 1: out.fileno(), 2: out.fileno()},
            )
        self.sessions.append(transport.pid)  # setsid: its pid is the session of the node's daemons
        code = await protocol.ended
        text = log.read_text(errors="replace")
        if code != 0:
            raise AssertionError(f"ray start {' '.join(args)} exited {code}:\n{text}")
        return text

    def members(self) -> list[int]:
        """The cluster's live processes now."""
        return session_members(self.sessions)

    async def stop(self) -> None:
        """Every process of the cluster gone, the socket directory removed."""
        try:
            await end_sessions(self.reactor, self.sessions)
        finally:
            shutil.rmtree(self.sockets, ignore_errors=True)
