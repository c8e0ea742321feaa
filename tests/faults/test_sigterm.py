"""SIGTERM in every phase of a job: nothing new starts, the job is reported once.

A real pilot in-process against the dev server; each phase is held open by a real
process that never ends on its own (a copytool, the pre-process, the payload, the
post-process) or, for the final update, by the fault proxy holding the request.
Once the phase's process has noted its pid, the pilot gets SIGTERM the way its
signal handler hands it over (``PilotService.handle_signal``).  The job must be
reported ``failed`` with SIGTERM's code exactly once (``finished`` when the signal
comes during the final update of a finished job), no process may start after the
signal, and the process that held the phase must be gone.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import reactor as _reactor

from pilot.errorcodes import ErrorCode

from ..events import file_ready
from ..test_abort import RecordingSpawner
from .proxy import Hold, Rule
from .scenario import FaultCase, alive

reactor: Any = _reactor


class SigtermInEveryPhaseTests(FaultCase):
    queue = "SIGTERM_FAULTS"
    group = "sigterm"
    copytools = {"pr": "lsm", "pw": "lsm", "pl": "lsm"}

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        await super().setUp()
        self.tool("lsm-get", hang=True)
        self.tool("lsm-put", hang=True)

    async def terminate_in(self, phase: str, definition: dict[str, Any], holder: str) -> tuple[int, Any]:
        """Run ``definition``; SIGTERM once ``marks/holder`` names the process holding ``phase``."""
        self.scenario(
            f"SIGTERM during {phase}",
            "SIGTERM to the pilot",
            phase.removeprefix("the "),
            "failed SIGTERM; 1 final update; nothing started after; holder gone",
        )
        (panda_id,) = await self.server.submit(definition)
        spawner = RecordingSpawner()
        service = self.pilot(spawner=spawner)
        service.startService()
        self.addCleanup(service.stopService)
        await file_ready(self.marks / holder)
        signalled_at = reactor.seconds()
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        holders = self.pids(holder)
        started = spawner.started_after(signalled_at)
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.SIGTERM,
            checks=[
                (started == [], f"started after the signal: {started}"),
                (not any(alive(pid) for pid in holders), f"the {holder} process is still there"),
            ],
        )
        return panda_id, service

    async def test_during_setup(self) -> None:
        self.scenario(
            "SIGTERM during setup",
            "SIGTERM to the pilot; the transformation download held by the proxy",
            "setup",
            "failed SIGTERM; 1 final update; nothing started after",
        )
        proxy = await self.start_proxy()
        held = proxy.add(Rule("run.sh", Hold()))
        (panda_id,) = await self.server.submit(self.downloaded_job("echo result > out.dat"))
        spawner = RecordingSpawner()
        service = self.pilot(spawner=spawner)
        service.startService()
        self.addCleanup(service.stopService)
        await held.hit()
        signalled_at = reactor.seconds()
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.SIGTERM,
            checks=[(spawner.started_after(signalled_at) == [], "a process started after the signal")],
        )

    async def test_during_stage_in(self) -> None:
        fields = self.place_input("in.dat", b"input\n")
        await self.terminate_in("stage-in", self.job("cp in.dat out.dat", **fields), "lsm-get.started")

    async def test_during_the_preprocess(self) -> None:
        definition = self.job(
            "echo result > out.dat",
            preprocess={"command": str(self.hold), "args": "preprocess"},
            postprocess={"command": "true"},
        )
        await self.terminate_in("the pre-process", definition, "preprocess")

    async def test_during_the_payload(self) -> None:
        definition = self.job(f"exec {self.hold} payload", postprocess={"command": "true"})
        await self.terminate_in("the payload", definition, "payload")

    async def test_during_the_postprocess(self) -> None:
        definition = self.job(
            "echo result > out.dat", postprocess={"command": str(self.hold), "args": "postprocess"}
        )
        await self.terminate_in("the post-process", definition, "postprocess")

    async def test_during_stage_out(self) -> None:
        await self.terminate_in("stage-out", self.job("echo result > out.dat"), "lsm-put.started")

    async def test_real_sigterm_to_twistd_during_the_payload(self) -> None:
        self.scenario(
            "SIGTERM to twistd during the payload",
            "SIGTERM to a real twistd -n pilot",
            "payload",
            "failed SIGTERM; 1 final update; payload gone; pilot exits",
        )
        (panda_id,) = await self.server.submit(self.job(f"exec {self.hold} payload"))
        pilot = self.pilot_process("pilot.log")
        await file_ready(self.marks / "payload")
        assert pilot.pid is not None
        os.kill(pilot.pid, signal.SIGTERM)
        outcome = await pilot.wait()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.SIGTERM,
            checks=[
                (not any(alive(pid) for pid in self.pids("payload")), "the payload is still there"),
                (outcome.exit_code is not None or outcome.signal is not None, "the pilot did not end"),
            ],
            notes=f"pilot exit code {outcome.exit_code}, signal {outcome.signal}",
        )

    async def test_during_the_final_update(self) -> None:
        self.scenario(
            "SIGTERM during the final update",
            "SIGTERM to the pilot; the final update held by the proxy",
            "final update",
            "finished; 1 final update; outputs stored once",
        )
        self.tool("lsm-put")  # stage-out works here
        proxy = await self.start_proxy()
        held = proxy.add(Rule("update_job", Hold(), state="finished"))
        (panda_id,) = await self.server.submit(self.job("echo result > out.dat"))
        service = self.pilot()
        service.startService()
        self.addCleanup(service.stopService)
        await held.hit()
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        await self.verdict(
            panda_id,
            state="finished",
            outputs={"out.dat": b"result\n", "job.log.tgz": None},
            notes=f"final update attempts: {proxy.log.count(('update_job', 'finished', 'forward')) + 1}",
        )
