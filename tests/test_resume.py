"""A pilot SIGKILLed mid-job, and a successor started on the same work area (issue 13).

The first pilot is a real ``twistd -n pilot`` process; the test SIGKILLs it while its
payload runs (the payload, supervised and in its own session, goes on).  A second pilot
on the same work area reads the dead one's journal before it asks for work and:

* adopts the still-running payload (same pid, start time and boot), waits for it
  through a pidfd, stages its output out and sends the final update: the job ends
  finished, its payload ran once, and the final update follows the payload's end at once;
* when the payload was killed with the pilot (a node's slot torn down), reports the
  job failed with PREEMPTION straight away instead of leaving it to the server's
  heartbeat timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.job.staging import StagingSetup
from pilot.localrun import pilot_arguments, start_pilot_process
from pilot.staging.urls import rucio_path
from pilot.util.journal import journal_dir, read_journal

from .events import file_ready, processes_gone
from .harness import file_storage, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "RESUME_QUEUE"


class ResumeAfterSigkillTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.storage_dir = self.base / "SITE_A"
        self.storage_dir.mkdir(parents=True)
        queuedata = {
            "copytools": {"cp": {}},
            "acopytools": {"pw": ["cp"], "pl": ["cp"]},
            "astorages": {"pw": ["SITE_A"], "pl": ["SITE_A"]},
        }
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: queuedata}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        self.storagedata = self.base / "storagedata.json"
        protocol = [{"endpoint": "file://", "path": str(self.storage_dir)}]
        self.storagedata.write_text(
            json.dumps({"SITE_A": {"arprotocols": {"read_lan": protocol, "write_lan": protocol}}})
        )
        self.workdir = self.base / "work"
        self.marks = self.base / "marks"
        self.marks.mkdir()

    def job(self, seconds: float, before: str = "") -> dict[str, Any]:
        # the payload notes each start outside its work directory (to count runs), then works,
        # writes its output and notes when it ended
        script = (
            f"echo $$ >> {self.marks}/starts; {before}sleep {seconds}; echo result > out.dat; "
            f"date +%s.%N > {self.marks}/ended"
        )
        return {
            "computingSite": QUEUE,
            "prodSourceLabel": "managed",
            "transformation": "/bin/bash",
            "jobPars": f"-c '{script}'",
            "outFiles": "out.dat,job.log.tgz",
            "scopeOut": "mc.out",
            "logFile": "job.log.tgz",
            "scopeLog": "mc.log",
        }

    def pilot_process(self, log_name: str, env: dict[str, str] | None = None) -> Any:
        """``twistd -n pilot`` with the same command every time (a batch system's restart)."""
        args = pilot_arguments(
            self.server.url,
            str(self.server.pki.ca_cert),
            queue=QUEUE,
            workdir=self.workdir,
            summary_file=self.base / "summary.json",
            extra=["--storagedata", str(self.storagedata), "--getjob-requests", "1"],
        )
        return start_pilot_process(
            reactor,
            reactor,
            args,
            proxy=str(self.server.pki.client_proxy),
            workdir=self.workdir,
            log_path=self.base / log_name,
            extra_env=env,
        )

    async def first_pilot_killed_while_the_payload_runs(self, into_payload: float = 0.0) -> int:
        """Start a real pilot process, SIGKILL it ``into_payload`` s after its payload started."""
        pilot = self.pilot_process("pilot-1.log")
        await file_ready(self.marks / "starts")
        started = time.time()
        (journal,) = list(journal_dir(self.workdir).glob("*.jsonl"))
        await file_ready(journal, ready=lambda p: '"kind":"payload.started"' in p.read_text())
        payload = next(e for e in read_journal(journal) if e["kind"] == "payload.started")
        await deferLater(reactor, max(0.0, into_payload - (time.time() - started)), lambda: None)
        assert pilot.pid is not None
        os.kill(pilot.pid, signal.SIGKILL)
        await pilot.wait()
        return int(payload["pid"])

    def successor(self) -> Any:
        return pilot_service(
            self.server,
            QUEUE,
            self.workdir,
            staging=StagingSetup(
                storage=file_storage({"SITE_A": self.storage_dir}), records_dir=self.workdir
            ),
            getjob_requests=1,
        )

    async def test_the_successor_adopts_the_payload_and_finishes_the_job(self) -> None:
        # the acceptance: SIGKILL 10 s into a 40 s payload, the same command 3 s later
        (panda_id,) = await self.server.submit(self.job(40.0))
        payload_pid = await self.first_pilot_killed_while_the_payload_runs(into_payload=10.0)
        self.assertTrue(_alive(payload_pid), "the supervised payload outlives its pilot")
        await deferLater(reactor, 3.0, lambda: None)  # the batch system restarts the pilot
        outcome = await self.pilot_process("pilot-2.log").wait()
        self.assertEqual(outcome.exit_code, 0, (self.base / "pilot-2.log").read_text()[-3000:])
        view: Any = await self.server.job(panda_id)
        summary = json.loads((self.base / "summary.json").read_text())["jobs"][0]
        self.assertEqual(
            view["jobStatus"], "finished", (summary["pilot_error_diag"], view.get("pilotErrorDiag"))
        )
        self.assertIn("resumed:adopt", summary["commands"])
        self.assertEqual(len((self.marks / "starts").read_text().split()), 1, "the payload ran once")
        stored = self.storage_dir / rucio_path("mc.out", "out.dat").lstrip("/")
        self.assertEqual(stored.read_text(), "result\n")
        ended = float((self.marks / "ended").read_text())
        final = _update_time(view["updates"][-1]["time"])
        self.assertEqual(view["updates"][-1]["state"], "finished")
        self.assertLess(final - ended, 10.0, "the final update follows the payload's end at once")
        self.assertEqual(list(journal_dir(self.workdir).glob("*.jsonl")), [], "every journal settled")

    async def test_payload_killed_with_its_pilot_is_reported_failed_at_once(self) -> None:
        (panda_id,) = await self.server.submit(self.job(60.0))
        payload_pid = await self.first_pilot_killed_while_the_payload_runs()
        os.killpg(payload_pid, signal.SIGKILL)  # the slot is torn down: payload and all
        await processes_gone([payload_pid])
        restarted = time.time()
        service = self.successor()
        await run_to_end(service)
        view: Any = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(
            view["pilotErrorCode"],
            ErrorCode.PREEMPTION,
            (view["pilotErrorDiag"], service.summaries[0].commands),
        )
        final = _update_time(view["updates"][-1]["time"])
        self.assertLess(final - restarted, 10.0, "reported within 10 s of the restart")
        self.assertEqual(len((self.marks / "starts").read_text().split()), 1, "never run again")
        left = sorted(p.name for p in self.workdir.glob("txpilot_*"))
        self.assertEqual(left, [], "the dead pilot's directory (and the lost job's) is removed")

    async def test_what_the_adopted_payload_left_is_swept_by_the_dead_pilots_marker(self) -> None:
        # a daemon of the payload (own session, TERM ignored) carries only the job's marker:
        # the successor's final sweep must know the dead pilot's marker to find it
        script = self.base / "daemon.sh"
        script.write_text(f'#!/bin/sh\necho $$ > {self.marks}/daemon\ntrap "" TERM\nexec sleep 300\n')
        script.chmod(0o755)
        daemon = f"setsid {script} & "
        (panda_id,) = await self.server.submit(self.job(3.0, before=daemon))
        await self.first_pilot_killed_while_the_payload_runs()
        await file_ready(self.marks / "daemon")
        daemon_pid = int((self.marks / "daemon").read_text())
        self.addCleanup(_kill_quietly, daemon_pid)
        outcome = await self.pilot_process("pilot-2.log").wait()
        self.assertEqual(outcome.exit_code, 0, (self.base / "pilot-2.log").read_text()[-3000:])
        view: Any = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        await processes_gone([daemon_pid])

    async def test_a_copytool_left_running_is_stopped_and_the_output_stored_once(self) -> None:
        # the first pilot dies while a (slow) cp uploads the output; in its own session the cp
        # would finish later and nothing would ever report it: the successor stops it first
        slowbin = self.base / "slowbin"
        slowbin.mkdir()
        (slowbin / "cp").write_text(
            f'#!/bin/sh\necho $$ > {self.marks}/cp-started\nsleep 60\ntouch {self.marks}/cp-done\nexec /bin/cp "$@"\n'
        )
        (slowbin / "cp").chmod(0o755)
        (panda_id,) = await self.server.submit(self.job(0.1))
        env = {"PATH": f"{slowbin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        pilot = self.pilot_process("pilot-1.log", env=env)
        await file_ready(self.marks / "cp-started")
        (journal,) = list(journal_dir(self.workdir).glob("*.jsonl"))
        await file_ready(journal, ready=lambda p: '"kind":"copytool.started"' in p.read_text())
        cp_pid = int((self.marks / "cp-started").read_text())
        assert pilot.pid is not None
        os.kill(pilot.pid, signal.SIGKILL)
        await pilot.wait()
        self.assertTrue(_alive(cp_pid), "the copytool outlives its pilot")
        outcome = await self.pilot_process("pilot-2.log").wait()
        self.assertEqual(outcome.exit_code, 0, (self.base / "pilot-2.log").read_text()[-3000:])
        await processes_gone([cp_pid])
        self.assertFalse((self.marks / "cp-done").exists(), "the orphaned upload was stopped")
        view: Any = await self.server.job(panda_id)
        summary = json.loads((self.base / "summary.json").read_text())["jobs"][0]
        self.assertEqual(view["jobStatus"], "finished", summary["pilot_error_diag"])
        self.assertTrue(any(c.startswith("resumed:stopped-copytool") for c in summary["commands"]))
        stored = self.storage_dir / rucio_path("mc.out", "out.dat").lstrip("/")
        self.assertEqual(stored.read_text(), "result\n")
        finals = [u for u in view["updates"] if u["state"] in ("finished", "failed")]
        self.assertEqual(len(finals), 1, "one final update")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _update_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()
