"""What every fault scenario shares: a dev server, file storage, pilots, and the verdict.

``FaultCase.scenario`` names the scenario; ``FaultCase.verdict`` looks at the server
and the storage once the pilot is done, records the outcome (``outcomes.record``) and
then fails the test if anything is wrong.  A test that breaks before its verdict is
recorded as such by a cleanup.  A scenario that fails because of a known pilot bug is
marked ``todo = "known pilot bug: ..."`` (trial's expected failure, so CI stays green
and a fix shows up as an unexpected success); the table shows it failing, with the reason.

"No update lost or duplicated": the server accepted exactly one final-state update
for the job (repeats it answered with ``alreadydone`` are counted apart).  "No file lost
or duplicated": every expected file is on storage exactly once, with the checksum
the final update reported; nothing else (no partial or second copy) is there.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import TestCase

from pilot.config import PilotConfig
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.experiments.generic import GenericExperiment
from pilot.job.staging import StagingSetup
from pilot.localrun import child_environment, pilot_arguments, twistd_argv
from pilot.model.credentials import Credentials
from pilot.process.runner import ManagedProcess
from pilot.server.client import PandaClient, RetryPolicy
from pilot.server.connection import ServerConnection
from pilot.server.tls import PilotTLSPolicy
from pilot.service import PilotService
from pilot.staging.urls import rucio_path

from ..harness import file_storage
from .outcomes import Outcome, record
from .proxy import FaultProxy

reactor: Any = _reactor

#: States a job ends in (holding: failed with a recoverable error); an update carrying one is final.
FINAL = ("finished", "failed", "holding")
#: How the server answers a final update it does not apply (a repeat, a job it no longer runs).
REFUSED = ("alreadydone", "tobekilled")


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def tool_script(marks: Path, name: str, *, delay: float = 0.0, hang: bool = False) -> str:
    """An ``lsm-get``/``lsm-put`` (``... SOURCE DESTINATION``) for ``file://`` storage.

    It notes its pid in ``marks/<name>.started`` first; ``hang`` never copies,
    ``delay`` copies (``cp``, straight to the destination) after that many seconds.
    """
    body = (
        "exec sleep 600"
        if hang
        else (
            f"sleep {delay}\n"
            'mkdir -p "$(dirname "$dst")" && cp "$src" "$dst" || exit 1\n'
            f'echo "$$" >> "{marks}/{name}.done"'
        )
    )
    return (
        "#!/bin/sh\n"
        f'echo "$$" >> "{marks}/{name}.started"\n'
        "eval src=\\${$(($# - 1))}\n"
        "eval dst=\\${$#}\n"
        "src=${src#file://}\n"
        "dst=${dst#file://}\n"
        f"{body}\n"
    )


#: A process that holds a phase open: notes its pid in ``marks/<its argument>``, then sleeps.
HOLD = '#!/bin/sh\necho "$$" >> "{marks}/$1"\nexec sleep 600\n'


class FaultCase(TestCase):
    """A dev server with one queue staging to ``SITE`` (a directory), and the verdict."""

    timeout = 120
    queue = "FAULT_QUEUE"
    #: The table section of this class's scenarios (``tools/reliability_table.py``).
    group = ""
    #: Copytools per activity: ``pr`` (stage-in), ``pw`` (outputs), ``pl`` (log).
    copytools: Mapping[str, str] = {"pr": "cp", "pw": "cp", "pl": "cp"}

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.storage_dir = self.base / "SITE"
        self.storage_dir.mkdir(parents=True)
        self.bin = self.base / "bin"
        self.bin.mkdir()
        self.marks = self.base / "marks"
        self.marks.mkdir()
        self.hold = self.bin / "hold"
        self.hold.write_text(HOLD.format(marks=self.marks))
        self.hold.chmod(0o755)
        self.workdir = self.base / "pilot"
        self.inputs: set[Path] = set()
        self.outcome: Outcome | None = None
        self.proxy: FaultProxy | None = None
        tools = sorted(set(self.copytools.values()))
        queuedata: dict[str, Any] = {
            "copytools": {tool: {} for tool in tools},
            "acopytools": {activity: [tool] for activity, tool in self.copytools.items()},
            "astorages": {"read_lan": ["SITE"], "pr": ["SITE"], "pw": ["SITE"], "pl": ["SITE"]},
        }
        self.trf_dir = self.base / "trf"  # served as /trf/ (transformations)
        self.trf_dir.mkdir()
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={self.queue: queuedata}, files=self.trf_dir
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        self.storagedata = self.base / "storagedata.json"
        protocol = [{"endpoint": "file://", "path": str(self.storage_dir)}]
        self.storagedata.write_text(
            json.dumps({"SITE": {"arprotocols": {"read_lan": protocol, "write_lan": protocol}}})
        )

    # -- the scenario and its verdict -----------------------------------------------------

    def scenario(self, name: str, fault: str, phase: str, expected: str) -> None:
        todo = getattr(getattr(self, self._testMethodName, None), "todo", None) or ""
        self.outcome = Outcome(
            scenario=name, fault=fault, phase=phase, expected=expected, group=self.group, known_bug=str(todo)
        )
        outcome = self.outcome

        def write() -> None:
            if outcome.state is None and not outcome.notes:
                outcome.notes = "the test broke before its verdict"
            record(outcome)

        self.addCleanup(write)

    async def verdict(
        self,
        panda_id: int,
        *,
        state: str,
        error: ErrorCode | None = None,
        outputs: Mapping[str, bytes | None] = {},
        checks: Iterable[tuple[bool, str]] = (),
        notes: str = "",
        final_updates: int = 1,
    ) -> dict[str, Any]:
        """Look, record, then assert: ``state`` and ``error`` on the server, ``final_updates``
        (one) accepted, ``outputs`` (LFN -> content, None: any) stored once, ``checks``."""
        assert self.outcome is not None, "call scenario() first"
        view: dict[str, Any] = await self.server.job(panda_id)
        finals = [u for u in view["updates"] if u["state"] in FINAL]
        accepted = [u for u in finals if u["command"] not in REFUSED]
        code = view.get("pilotErrorCode") or 0
        lost, duplicated, file_problems = self.files(view, outputs)
        outcome = self.outcome
        outcome.state = str(view["jobStatus"])
        outcome.error = _code_name(code)
        outcome.final_updates = len(accepted)
        outcome.final_updates_received = len(finals)
        outcome.files_lost = lost
        outcome.files_duplicated = duplicated
        problems = []
        if outcome.state != state:
            problems.append(f"state {outcome.state}, expected {state} ({view.get('pilotErrorDiag')})")
        if error is not None and code != error:
            problems.append(
                f"pilot error {outcome.error}, expected {error.name} ({view.get('pilotErrorDiag')})"
            )
        if len(accepted) != final_updates:
            problems.append(f"{len(accepted)} final updates accepted, expected {final_updates}")
        problems += file_problems
        problems += [what for ok, what in checks if not ok]
        outcome.passed = not problems
        outcome.notes = "; ".join(filter(None, [notes, *problems]))
        self.assertEqual(problems, [], f"{outcome.scenario}: {view.get('pilotErrorDiag')}")
        return view

    def files(
        self, view: Mapping[str, Any], outputs: Mapping[str, bytes | None]
    ) -> tuple[int, int, list[str]]:
        """(lost, duplicated, problems) for ``outputs`` on storage against the job's report."""
        report = json.loads(view.get("jobOutputReport") or "{}")
        stored = [p for p in self.storage_dir.rglob("*") if p.is_file() and p not in self.inputs]
        problems: list[str] = []
        lost = duplicated = 0
        for lfn, content in outputs.items():
            copies = [p for p in stored if p.name == lfn]
            entry = report.get(lfn)
            if not copies or not isinstance(entry, dict):
                lost += 1
                problems.append(f"{lfn} lost ({len(copies)} on storage, reported: {entry is not None})")
                continue
            duplicated += len(copies) - 1
            data = copies[0].read_bytes()
            if adler32(data) != entry.get("adler32") or (content is not None and data != content):
                lost += 1
                problems.append(f"{lfn} on storage does not match what was reported")
        strays = [p for p in stored if p.name not in outputs]
        duplicated += len(strays)
        if duplicated:
            problems.append(f"{duplicated} extra file(s) on storage: {sorted(p.name for p in stored)}")
        for lfn in report:
            if lfn not in outputs:
                problems.append(f"the final update reports {lfn}, which should not be stored")
        return lost, duplicated, problems

    # -- building blocks --------------------------------------------------------------------

    def tool(self, name: str, **how: Any) -> None:
        """Install a copytool (a new file renamed into place: a running copy keeps its own)."""
        path = self.bin / name
        new = path.with_name(f".{name}.new")
        new.write_text(tool_script(self.marks, name, **how))
        new.chmod(0o755)
        new.replace(path)

    def place_input(self, lfn: str, data: bytes, scope: str = "it") -> dict[str, Any]:
        """Put an input on storage; the job fields that name it."""
        path = self.storage_dir / rucio_path(scope, lfn).lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.inputs.add(path)
        return {
            "inFiles": lfn,
            "scopeIn": scope,
            "ddmEndPointIn": "SITE",
            "fsize": str(len(data)),
            "checksum": "ad:" + adler32(data),
            "GUID": "11111111-2222-3333-4444-555555555555",
        }

    def job(self, script: str, *, outputs: str = "out.dat", **extra: Any) -> dict[str, Any]:
        """``/bin/bash -c script``, with ``outputs`` and the log tarball staged out."""
        definition: dict[str, Any] = {
            "computingSite": self.queue,
            "prodSourceLabel": "managed",
            "transformation": "/bin/bash",
            "jobPars": f"-c '{script}'",
            "outFiles": ",".join(filter(None, [outputs, "job.log.tgz"])),
            "scopeOut": "it",
            "logFile": "job.log.tgz",
            "scopeLog": "it",
        }
        definition.update(extra)
        return definition

    def downloaded_job(self, script: str) -> dict[str, Any]:
        """A job whose transformation is downloaded from the server (``/trf/run.sh``)."""
        (self.trf_dir / "run.sh").write_text(f"#!/bin/bash\n{script}\n")
        return self.job("", transformation=f"{self.url}/trf/run.sh", jobPars="")

    async def start_proxy(self) -> FaultProxy:
        self.proxy = FaultProxy(reactor, self.server)
        await self.proxy.start()
        proxy = self.proxy
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
        return proxy

    @property
    def url(self) -> str:
        return self.proxy.url if self.proxy is not None else self.server.url

    def pilot(
        self,
        *,
        clock: IReactorTime | None = None,
        spawner: IReactorProcess | None = None,
        client_timeout: float = 120.0,
        **settings: Any,
    ) -> PilotService:
        """A pilot service wired as ``pilot.tap`` wires it, against the proxy (if any) or the server.

        As ``tests.harness.pilot_service``, with the server's URL, the client's time-out
        and the clock (``clock`` and ``wall``) chosen by the scenario.
        """
        clock = clock or reactor
        credentials = Credentials(cacert=self.server.pki.ca_cert, proxy=self.server.pki.client_proxy)
        connection = ServerConnection(reactor, PilotTLSPolicy(credentials))
        client = PandaClient(
            connection.http,
            self.url,
            clock,
            retry=RetryPolicy(attempts=2, initial=0.1, jitter=lambda: 0.0),
            timeout=client_timeout,
            connection=connection,
        )
        path = f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        settings.setdefault("getjob_requests", 1)
        settings.setdefault("report_worker_node", False)
        config = PilotConfig(
            queue=self.queue,
            server_url=self.url,
            workdir=self.workdir,
            queuedata_source=f"{self.url}/cache/schedconfig/{self.queue}.all.json",
            log_file=self.base / "pilotlog.json",
            summary_file=self.base / "summary.json",
            job_label="managed",
            nojob_backoff=0.1,
            nojob_backoff_max=0.2,
            node="fault-node",
            credentials=credentials,
            **settings,
        )
        return PilotService(
            config,
            clock=clock,
            wall=clock.seconds,
            spawner=spawner or reactor,
            client=client,
            experiment=GenericExperiment(),
            in_thread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
            environ={"PATH": path},
            close_connections=connection.close,
            staging=StagingSetup(
                storage=file_storage({"SITE": self.storage_dir}),
                tool_env={"PATH": path},
                records_dir=self.workdir,
            ),
        )

    def pilot_process(self, log_name: str, *extra: str) -> ManagedProcess:
        """``twistd -n pilot`` with the same command every time (a batch system's restart)."""
        args = pilot_arguments(
            self.url,
            str(self.server.pki.ca_cert),
            queue=self.queue,
            workdir=self.workdir,
            summary_file=self.base / "summary.json",
            extra=["--storagedata", str(self.storagedata), "--getjob-requests", "1", *extra],
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = child_environment(
            {
                "X509_USER_PROXY": str(self.server.pki.client_proxy),
                "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            }
        )
        process = ManagedProcess(
            reactor,
            reactor,
            twistd_argv("pilot", *args),
            env=env,
            cwd=self.workdir,
            stdout=self.base / log_name,
            stderr=self.base / log_name,
            kill_grace=30.0,
            name="pilot",
        )
        process.start()

        async def gone() -> None:
            if process.running:
                await process.terminate("test over")

        self.addCleanup(lambda: Deferred.fromCoroutine(gone()))
        return process

    def pids(self, name: str) -> list[int]:
        """The pids a tool or payload noted in ``marks/<name>``."""
        path = self.marks / name
        return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_quietly(pids: Iterable[int]) -> None:
    """End what a test left running (orphaned tools, payloads) by pid."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _code_name(code: int) -> str:
    if not code:
        return ""
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
