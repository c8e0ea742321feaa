"""A signal in any phase of a job stops it there: nothing new starts, only the final update goes out.

A real pilot against the dev server, with real processes that hold each phase open
(a stage-in or stage-out copytool that never finishes, a pre-process, the payload, a
post-process).  When the phase's process appears, the pilot gets SIGTERM; the test
then checks that no process was started after the signal, that the server got
exactly one more request (the final update, ``failed`` with SIGTERM's code), and
that the pilot ended with SIGTERM's exit code.  The transformation download (a
request, not a process) is the same check on a scripted server in ``test_service``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, AnyStr

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode
from pilot.job.staging import StagingSetup
from pilot.service import PilotService
from pilot.staging.urls import rucio_path

from .harness import bash_job, file_storage, pilot_service

reactor: Any = _reactor
QUEUE = "ABORT_QUEUE"

#: A copytool that holds its phase open until it is killed.
HANGING_TOOL = "#!/bin/sh\nexec sleep 600\n"


@implementer(IReactorProcess)
class RecordingSpawner:
    """The real reactor's spawnProcess, noting what was started and when."""

    def __init__(self) -> None:
        self.started: list[tuple[float, list[str]]] = []
        self._watchers: list[tuple[Callable[[list[str]], bool], Deferred[None]]] = []

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
        argv = [a.decode() if isinstance(a, bytes) else a for a in args]
        self.started.append((reactor.seconds(), argv))
        transport: IProcessTransport = reactor.spawnProcess(
            processProtocol, executable, args, env, path, uid, gid, usePTY, childFDs
        )
        for watcher in list(self._watchers):
            if watcher[0](argv):
                self._watchers.remove(watcher)
                reactor.callLater(0.2, watcher[1].callback, None)  # let it get going
        return transport

    def wait_for(self, match: Callable[[list[str]], bool]) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        self._watchers.append((match, waiting))
        return waiting

    def started_after(self, moment: float) -> list[list[str]]:
        return [argv for when, argv in self.started if when >= moment]


def _names(argv: list[str]) -> str:
    return " ".join(argv)


class SignalInEveryPhaseTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.storage_dir = self.base / "SITE"
        self.storage_dir.mkdir(parents=True)
        self.bin = self.base / "bin"
        self.bin.mkdir()
        for name in ("lsm-get", "lsm-put"):
            tool = self.bin / name
            tool.write_text(HANGING_TOOL)
            tool.chmod(0o755)
        queuedata: dict[str, Any] = {
            "copytools": {"lsm": {}},
            "acopytools": {"pr": ["lsm"], "pw": ["lsm"], "pl": ["lsm"]},
            "astorages": {"read_lan": ["SITE"], "pw": ["SITE"], "pl": ["SITE"]},
        }
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: queuedata}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    def pilot(self, spawner: RecordingSpawner) -> PilotService:
        path = f"{self.bin}:/usr/bin:/bin"
        staging = StagingSetup(
            storage=file_storage({"SITE": self.storage_dir}),
            tool_env={"PATH": path},
            records_dir=self.base / "pilot",
        )
        return pilot_service(
            self.server, QUEUE, self.base / "pilot", staging=staging, spawner=spawner, getjob_requests=1
        )

    async def signal_when(self, definition: dict[str, Any], match: Callable[[list[str]], bool]) -> None:
        """Run ``definition``; SIGTERM once ``match`` sees its process start; check the aftermath."""
        (panda_id,) = await self.server.submit(definition)
        spawner = RecordingSpawner()
        service = self.pilot(spawner)
        started = spawner.wait_for(match)
        service.startService()
        self.addCleanup(service.stopService)
        await started
        calls_before = service.source.calls
        signalled_at = reactor.seconds()
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        self.assertEqual(spawner.started_after(signalled_at), [], "nothing started after the signal")
        self.assertEqual(service.source.calls - calls_before, 1, "only the final update was sent")
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.SIGTERM)
        self.assertEqual(service.exit_code, ExitCode.SIGTERM)

    def job(self, jobpars: str, **extra: Any) -> dict[str, Any]:
        return bash_job(QUEUE, jobpars, outFiles="out.dat,job.log.tgz", scopeOut="it", **extra)

    async def test_during_stage_in(self) -> None:
        data = b"input\n"
        source = self.storage_dir / rucio_path("it", "in.dat")
        source.parent.mkdir(parents=True)
        source.write_bytes(data)
        definition = self.job(
            "-c 'cp in.dat out.dat'",
            inFiles="in.dat",
            scopeIn="it",
            ddmEndPointIn="SITE",
            fsize=str(len(data)),
            GUID="11111111-1111-1111-1111-111111111111",
        )
        await self.signal_when(definition, lambda argv: any(a.endswith("lsm-get") for a in argv))

    async def test_during_the_preprocess(self) -> None:
        definition = self.job(
            "-c 'echo x > out.dat'",
            preprocess={"command": "sleep", "args": "600"},
            postprocess={"command": "true"},
        )
        await self.signal_when(definition, lambda argv: "sleep 600" in _names(argv))

    async def test_during_the_payload(self) -> None:
        definition = self.job("-c 'sleep 600'", postprocess={"command": "true"})
        await self.signal_when(definition, lambda argv: "sleep 600" in _names(argv))

    async def test_during_the_postprocess(self) -> None:
        definition = self.job("-c 'echo x > out.dat'", postprocess={"command": "sleep", "args": "600"})
        await self.signal_when(definition, lambda argv: "sleep 600" in _names(argv))

    async def test_during_stage_out(self) -> None:
        definition = self.job("-c 'echo x > out.dat'")
        await self.signal_when(definition, lambda argv: any(a.endswith("lsm-put") for a in argv))
