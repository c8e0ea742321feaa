"""Test doubles for what cannot be real in clock-driven tests.

* ``ScriptedPanda``: a twisted.web resource speaking both PanDA API generations
  (enough of them for the pilot's calls), recording every request exactly as it
  arrived, with scripted failures.  Used behind ``treq.testing.StubTreq``.
* ``FakeSpawner``/``FakeProcess``: an ``IReactorProcess`` whose processes end when
  the test says so (pids far above Linux's ``pid_max``, so never a real process).
* ``FakeProcessControl``: records the signals the runner sends instead of sending them.
* ``ManualRunner``: a ThreadRunner whose calls wait until the test runs them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, AnyStr
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from pilot.process.runner import Descendant
from pilot.process.supervisor import supervised_argv


def run_sync(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """A ThreadRunner that runs the function at once (tests only)."""
    return succeed(f(*args, **kwargs))


class ManualRunner:
    """A ThreadRunner whose calls wait until the test runs them, in the order it chooses.

    Worker threads finish in any order: ``run_one``/``run_all`` run the oldest call first,
    ``run_newest_first`` shows what happens when a later call overtakes an earlier one.
    A function that raises hands the failure to its waiter, as a thread pool does.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.calls = 0

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        d: Deferred[Any] = Deferred()
        self.queue.append((d, partial(f, **kwargs), args))
        return d

    def _run(self, entry: tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]) -> None:
        d, f, args = entry
        try:
            result = f(*args)
        except Exception:  # noqa: BLE001 - handed to the waiter, as a thread pool does
            d.errback()
        else:
            d.callback(result)

    @property
    def names(self) -> list[str]:
        """The names of the functions waiting to run, oldest first."""
        return [getattr(f, "func", f).__name__ for _, f, _ in self.queue]

    def run_one(self) -> None:
        self._run(self.queue.pop(0))

    def run_all(self) -> None:
        while self.queue:
            self.run_one()

    def run_newest_first(self) -> None:
        """Run queued calls, newest first, until none is left (calls may queue more)."""
        while self.queue:
            self._run(self.queue.pop())


@dataclass
class Call:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    params: dict[str, Any]
    time: float


@dataclass
class Scripted:
    """A canned raw reply: HTTP status, body, content type."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"


class ScriptedPanda(Resource):
    """A scripted PanDA server for clock-driven tests (see module docstring)."""

    isLeaf = True

    def __init__(self, clock: Clock | None = None, *, legacy_only: bool = False) -> None:
        super().__init__()
        self.clock = clock
        self.legacy_only = legacy_only
        self.calls: list[Call] = []
        self.jobs: list[dict[str, Any]] = []
        self.scripted: list[Scripted] = []
        self.commands: dict[int, str] = {}
        self.update_status: list[int] = []
        self.files: dict[str, bytes] = {}
        #: Paths that never answer (a stuck mirror or server): their requests wait here.
        self.hold: set[str] = set()
        self.held: list[Request] = []
        self.on_call: Callable[[Call], None] | None = None

    # -- inspection ----------------------------------------------------------------

    def updates(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        """Update parameters received, normalised to legacy names (jobId, state, ...)."""
        result = []
        for call in self.calls:
            if call.path.endswith(("/updateJob", "/update_job")):
                params = dict(call.params)
                if "job_id" in params:
                    params["jobId"] = params["job_id"]
                    params["state"] = params["job_status"]
                    if "pilot_error_code" in params:
                        params["pilotErrorCode"] = params["pilot_error_code"]
                    if "job_output_report" in params:
                        params["xml"] = params["job_output_report"]
                if panda_id is None or int(params["jobId"]) == panda_id:
                    result.append(params)
        return result

    def states(self, panda_id: int) -> list[str]:
        return [u["state"] for u in self.updates(panda_id)]

    def acquires(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith(("/getJob", "/acquire_jobs"))]

    # -- serving -------------------------------------------------------------------

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        raw = request.content.read() if request.content is not None else b""
        headers = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        body = raw
        if path.startswith("/server/panda/") or "gzip" in headers.get("content-encoding", []):
            try:
                body = gzip.decompress(raw)
            except OSError:
                request.setResponseCode(500)
                return b"Not a gzipped file"
        try:
            params = json.loads(body) if body else {}
        except ValueError:
            params = {}
        call = Call(
            request.method.decode(), path, headers, raw, params, self.clock.seconds() if self.clock else 0.0
        )
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)
        if path in self.hold:
            self.held.append(request)
            return NOT_DONE_YET  # type: ignore[return-value]  # twisted.web: "not done yet"
        if request.method == b"GET" and path in self.files:
            request.setHeader(b"content-type", b"application/octet-stream")
            return self.files[path]
        if self.scripted:
            canned = self.scripted.pop(0)
            request.setResponseCode(canned.status)
            request.setHeader(b"content-type", canned.content_type.encode())
            return canned.body
        legacy = path.startswith("/server/panda/")
        if self.legacy_only and not legacy:
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain")
            return f"ERROR : method {path.rsplit('/', 1)[-1]} is forbidden".encode()
        request.setHeader(b"content-type", b"application/json")
        if path.endswith(("/getJob", "/acquire_jobs")):
            return self._acquire(legacy)
        if path.endswith(("/updateJob", "/update_job")):
            job_id = int(params.get("jobId", params.get("job_id", 0)))
            return self._update(legacy, job_id)
        request.setResponseCode(403)
        return b"ERROR : method is forbidden"

    def _acquire(self, legacy: bool) -> bytes:
        if not self.jobs:
            if legacy:
                return json.dumps({"StatusCode": 20, "errorDialog": "no jobs in PanDA"}).encode()
            return json.dumps({"success": False, "message": "No jobs in PanDA", "data": None}).encode()
        job = dict(self.jobs.pop(0), StatusCode=0, nSent=1)
        if legacy:
            return json.dumps(job).encode()
        return json.dumps({"success": True, "message": "", "data": {"StatusCode": 0, "jobs": [job]}}).encode()

    def _update(self, legacy: bool, job_id: int) -> bytes:
        status = self.update_status.pop(0) if self.update_status else 0
        data = {"StatusCode": status, "command": self.commands.pop(job_id, "NULL")}
        if legacy:
            return json.dumps(data).encode()
        return json.dumps({"success": True, "message": "", "data": data}).encode()


def urlencoded(values: Mapping[str, Any]) -> bytes:
    return urlencode({k: str(v) for k, v in values.items()}).encode()


# ------------------------------------------------------------------------------------
# Processes


@implementer(IProcessTransport)
class FakeProcess:
    """A process that exists only in the test; ``end`` makes it exit."""

    def __init__(
        self,
        spawner: FakeSpawner,
        protocol: IProcessProtocol,
        pid: int,
        args: Sequence[str],
        env: Mapping[str, str],
        path: str | None,
    ) -> None:
        self.spawner = spawner
        self.protocol = protocol
        self.pid = pid
        self.args = list(args)
        self.env = dict(env)
        self.path = path
        self.ended = False

    @property
    def command(self) -> list[str]:
        """argv without the ``setsid`` prefix, and without the payload supervisor's."""
        command = self.args[1:]
        if len(command) > _SUPERVISOR_PREFIX and command[1:3] == _SUPERVISOR_MARK:
            return command[_SUPERVISOR_PREFIX:]
        return command

    def end(self, exit_code: int = 0, signal: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        reason: Failure
        if exit_code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=None if signal else exit_code, signal=signal))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)

    # IProcessTransport (unused parts)
    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Any) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...

    def signalProcess(self, signalID: str | int) -> None: ...


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@implementer(IReactorProcess)
class FakeSpawner:
    """An IReactorProcess for clock-driven tests.

    ``tar`` processes (the log tarball) complete by themselves on the next clock
    tick, creating the archive file; payloads end only when the test ends them.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.processes: list[FakeProcess] = []
        self._next_pid = 5_000_000

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
        self._next_pid += 1
        argv = [str(a) for a in args]
        if len(argv) > 2 and argv[1].startswith("--chdir="):  # the runner's ``env --chdir=DIR setsid ...``
            path = argv[1].removeprefix("--chdir=")
            argv = argv[2:]
        process = FakeProcess(
            self,
            processProtocol,
            self._next_pid,
            argv,
            {_text(k): _text(v) for k, v in (env or {}).items()},
            str(path) if path is not None else None,
        )
        processProtocol.makeConnection(process)
        self.processes.append(process)
        if len(process.command) > 0 and process.command[0] == "tar":
            target = next(a.split("=", 1)[1] for a in process.command if a.startswith("--file="))
            Path(target).write_bytes(b"\x1f\x8b fake tarball")
            self.clock.callLater(0, process.end, 0)
        return process

    def payloads(self) -> list[FakeProcess]:
        return [p for p in self.processes if p.command[:2] == ["/bin/bash", "-c"]]

    def last_payload(self) -> FakeProcess:
        return self.payloads()[-1]


@dataclass
class FakeProcessControl:
    """Records signals; a fake process group ends on SIGKILL (or on SIGTERM if ``obey_term``).

    ``members`` are a group's leftovers (processes other than its leader): they make
    the group alive, die with the group's signal like the leader, and answer
    ``signal_process`` while alive.  ``scans`` names the threads the scans ran in.
    """

    spawner: FakeSpawner | None = None
    obey_term: bool = True
    signals: list[tuple[int, int, float]] = field(default_factory=list)
    members: dict[int, set[Descendant]] = field(default_factory=dict)
    process_signals: list[tuple[int, int]] = field(default_factory=list)
    scans: list[tuple[str, str]] = field(default_factory=list)

    def _scanned(self, what: str) -> None:
        import threading

        self.scans.append((what, threading.current_thread().name))

    def _process(self, pgid: int) -> FakeProcess | None:
        if self.spawner is None:
            return None
        return next((p for p in self.spawner.processes if p.pid == pgid), None)

    def signal_group(self, pgid: int, signum: int) -> None:
        import signal as _signal

        clock = self.spawner.clock if self.spawner else None
        self.signals.append((pgid, signum, clock.seconds() if clock else 0.0))
        deadly = signum == _signal.SIGKILL or (signum == _signal.SIGTERM and self.obey_term)
        if deadly:
            self.members.pop(pgid, None)
        process = self._process(pgid)
        if process is not None and not process.ended and deadly:
            process.spawner.clock.callLater(0, process.end, 0, signum)

    def group_alive(self, pgid: int) -> bool:
        return bool(self.members.get(pgid))

    def descendants(self, pid: int) -> set[Descendant]:
        self._scanned("descendants")
        return set()

    def descendants_below(self, pid: int, depth: int) -> set[Descendant]:
        self._scanned("descendants_below")
        return set()

    def group_members(self, pgid: int) -> set[Descendant]:
        self._scanned("group_members")
        return set(self.members.get(pgid, ()))

    def signal_process(self, process: Descendant, signum: int) -> bool:
        self.process_signals.append((process.pid, signum))
        return any(process in alive for alive in self.members.values())


#: How the payload supervisor's wrapper looks at the front of an argv (``pilot.process.supervisor``).
_SUPERVISOR_SAMPLE = supervised_argv(Path("/status"), ["payload"])
_SUPERVISOR_PREFIX = len(_SUPERVISOR_SAMPLE) - 1
_SUPERVISOR_MARK = _SUPERVISOR_SAMPLE[1:3]
