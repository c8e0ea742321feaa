"""SIGKILL of a real ``twistd -n pilot`` in each phase, then a restart with the same command.

The first pilot is SIGKILLed once the phase's process has noted its pid (a copytool
that takes its time, the payload) or once the fault proxy holds its final update;
processes it started in their own sessions live on.  A second ``twistd -n pilot``
with the same command reads the dead pilot's journal before it asks for work
(``pilot.job.recovery``): before the payload the job is reported failed with
PREEMPTION; a running payload is adopted; after the payload the outputs are staged
(checked against what the orphaned copytool left) and the final update sent; a final
update sent but not acknowledged is sent again.

Each scenario checks the job's final state on the server, that the payload ran at
most once, that the server accepted one final update, that outputs are on storage
once with the reported checksum, and that no copytool of the dead pilot is left.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import reactor as _reactor

from pilot.errorcodes import ErrorCode
from pilot.process.runner import ManagedProcess
from pilot.util.journal import journal_dir, read_journal

from ..events import file_ready, processes_gone
from .proxy import Hold, Rule
from .scenario import FaultCase, alive, kill_quietly

reactor: Any = _reactor

#: How long an orphaned copytool of the dead pilot goes on copying.
ORPHAN_COPY = 6.0


class SigkillAndRestartTests(FaultCase):
    queue = "SIGKILL_FAULTS"
    group = "sigkill"
    timeout = 150
    copytools = {"pr": "lsm", "pw": "lsm", "pl": "cp"}

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        await super().setUp()
        self.tool("lsm-get")
        self.tool("lsm-put")
        self.addCleanup(lambda: kill_quietly(self.orphans()))

    def orphans(self) -> list[int]:
        return [
            p
            for n in ("lsm-get.started", "lsm-put.started", "preprocess", "payload")
            for p in self.pids(n)
            if alive(p)
        ]

    def payload(self, seconds: float = 0.0) -> dict[str, Any]:
        """A payload that notes each start (to count runs) and writes ``out.dat``."""
        return self.job(f"echo $$ >> {self.marks}/payload; sleep {seconds}; echo result > out.dat")

    async def journaled(self, kind: str) -> dict[str, Any]:
        """The first entry of ``kind`` in the running pilot's journal, once it is there."""
        (journal,) = list(journal_dir(self.workdir).glob("*.jsonl"))
        await file_ready(journal, ready=lambda p: f'"kind":"{kind}"' in p.read_text())
        return next(e for e in read_journal(journal) if e["kind"] == kind)

    async def kill(self, pilot: ManagedProcess) -> None:
        assert pilot.pid is not None
        os.kill(pilot.pid, signal.SIGKILL)
        await pilot.wait()

    async def restart(self) -> list[tuple[bool, str]]:
        """The same command again, run to its end; checks on how it ended."""
        outcome = await self.pilot_process("pilot-2.log").wait()
        log = (self.base / "pilot-2.log").read_text(errors="replace")[-2000:]
        left = self.orphans()
        return [
            (outcome.exit_code == 0, f"the successor exited with {outcome.exit_code}: {log}"),
            (left == [], f"processes of the dead pilot left running: {left}"),
        ]

    def runs(self) -> int:
        return len(self.pids("payload"))

    async def test_during_setup(self) -> None:
        self.scenario(
            "SIGKILL during setup, restart",
            "transformation download held by the proxy; SIGKILL of twistd; restart",
            "setup",
            "failed PREEMPTION at restart; payload never runs; 1 final update",
        )
        proxy = await self.start_proxy()
        held = proxy.add(Rule("run.sh", Hold()))
        script = f"echo $$ >> {self.marks}/payload; echo result > out.dat"
        (panda_id,) = await self.server.submit(self.downloaded_job(script))
        first = self.pilot_process("pilot-1.log")
        await held.hit()
        await self.kill(first)
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.PREEMPTION,
            checks=[*checks, (self.runs() == 0, f"the payload ran {self.runs()} times")],
        )

    async def test_during_stage_in(self) -> None:
        self.scenario(
            "SIGKILL during stage-in, restart",
            "SIGKILL of twistd; restart with the same command",
            "stage-in",
            "failed PREEMPTION at restart; payload never runs; 1 final update",
        )
        self.tool("lsm-get", delay=ORPHAN_COPY)
        fields = self.place_input("in.dat", b"input\n")
        (panda_id,) = await self.server.submit(self.job("cp in.dat out.dat", **fields))
        first = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "lsm-get.started")
        await self.kill(first)
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.PREEMPTION,
            checks=[*checks, (self.runs() == 0, f"the payload ran {self.runs()} times")],
        )

    async def test_during_the_preprocess(self) -> None:
        self.scenario(
            "SIGKILL during the pre-process, restart",
            "SIGKILL of twistd; restart with the same command",
            "pre-process",
            "failed PREEMPTION at restart; payload never runs; pre-process ended; 1 final update",
        )
        definition = self.payload()
        definition["preprocess"] = {"command": str(self.hold), "args": "preprocess"}
        (panda_id,) = await self.server.submit(definition)
        first = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "preprocess")
        await self.kill(first)
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.PREEMPTION,
            checks=[*checks, (self.runs() == 0, f"the payload ran {self.runs()} times")],
        )

    async def test_while_the_payload_runs(self) -> None:
        self.scenario(
            "SIGKILL while the payload runs, restart",
            "SIGKILL of twistd; restart with the same command",
            "payload",
            "finished (payload adopted); ran once; outputs stored once; 1 final update",
        )
        (panda_id,) = await self.server.submit(self.payload(3.0))
        first = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "payload")
        await self.journaled("payload.started")
        await self.kill(first)
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="finished",
            outputs={"out.dat": b"result\n", "job.log.tgz": None},
            checks=[*checks, (self.runs() == 1, f"the payload ran {self.runs()} times")],
        )

    async def test_pilot_and_payload_killed(self) -> None:
        self.scenario(
            "SIGKILL of the pilot and its payload, restart",
            "SIGKILL of twistd and the payload's group; restart",
            "payload",
            "failed PREEMPTION at restart; never rerun; its log stored once; 1 final update",
        )
        (panda_id,) = await self.server.submit(self.payload(60.0))
        first = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "payload")
        started = await self.journaled("payload.started")
        await self.kill(first)
        os.killpg(int(started["pid"]), signal.SIGKILL)
        await processes_gone([int(started["pid"])])
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.PREEMPTION,
            outputs={"job.log.tgz": None},
            checks=[*checks, (self.runs() == 1, f"the payload ran {self.runs()} times")],
        )

    async def test_during_stage_out(self) -> None:
        self.scenario(
            "SIGKILL during stage-out, restart",
            f"SIGKILL of twistd; its copytool finishes {ORPHAN_COPY:.0f} s later; restart",
            "stage-out",
            "finished; ran once; outputs stored once; 1 final update; no orphan left",
        )
        self.tool("lsm-put", delay=ORPHAN_COPY)
        (panda_id,) = await self.server.submit(self.payload())
        first = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "lsm-put.started")
        await self.kill(first)
        self.tool("lsm-put")  # the successor's copies are quick
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="finished",
            outputs={"out.dat": b"result\n", "job.log.tgz": None},
            checks=[*checks, (self.runs() == 1, f"the payload ran {self.runs()} times")],
        )

    async def final_update_killed(self, *, forwarded: bool) -> None:
        (panda_id,) = await self.server.submit(self.payload())
        proxy = await self.start_proxy()
        held = proxy.add(Rule("update_job", Hold(forward=forwarded), state="finished"))
        first = self.pilot_process("pilot-1.log")
        await (held.server_answered() if forwarded else held.hit())
        await self.kill(first)
        checks = await self.restart()
        await self.verdict(
            panda_id,
            state="finished",
            outputs={"out.dat": b"result\n", "job.log.tgz": None},
            checks=[*checks, (self.runs() == 1, f"the payload ran {self.runs()} times")],
        )

    async def test_during_the_final_update_before_the_server_saw_it(self) -> None:
        self.scenario(
            "SIGKILL during the final update (not received), restart",
            "final update held by the proxy; SIGKILL of twistd; restart",
            "final update",
            "finished; the successor resends it; 1 final update",
        )
        await self.final_update_killed(forwarded=False)

    async def test_during_the_final_update_after_the_server_applied_it(self) -> None:
        self.scenario(
            "SIGKILL during the final update (applied, reply lost), restart",
            "server applied the final update, reply held; SIGKILL of twistd; restart",
            "final update",
            "finished; a resend is answered alreadydone; 1 final update accepted",
        )
        await self.final_update_killed(forwarded=True)
