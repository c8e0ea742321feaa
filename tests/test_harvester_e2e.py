"""A real pilot under Harvester's push mode, with no network (issue 14's acceptance).

``twistd -n pilot`` runs in a fresh network namespace with only loopback up (``unshare
--net``), with a ``sitecustomize`` that records every Internet-socket ``connect`` and
every name lookup the pilot's interpreters make (and refuses them): the file mode must
make none at all.  Harvester's side is ``tests/harvester_side.HarvesterSide``, cycling
every 0.2 s in this test's reactor: it pre-places the first job and feeds the next ones
on request, feeds event ranges, reads the pilot's attributes and reports, "stages out"
what is declared (checking size and adler32 against the file) and acknowledges.

Three jobs go through one pilot: a job with an input (linked from the access point, where
Harvester's preparator put it) and an output, an event-service job with 10 ranges on the
reference payload (4 workers), and a third job.  Every job must end finished in Harvester's
eyes, every output and log must be declared once with the
right size and checksum, every range reported once (finished, in an archive Harvester
stages), the kill file written at the end, and no connection attempted.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from pilot.localrun import child_environment, twistd_argv
from pilot.process.runner import ManagedProcess

from .harvester_side import HarvesterSide
from .netns import netns_argv, require_netns

reactor: Any = _reactor
QUEUE = "HPC_PUSH"
PAYLOAD = Path(__file__).with_name("es_payload.py")
TASK = 4242

#: Imported by every Python process of the pilot (PYTHONPATH): Internet connections and
#: name lookups are written to $TXPILOT_NET_LOG and refused.
GUARD = """
import os, socket
_log = os.environ.get("TXPILOT_NET_LOG")
def _note(what):
    if _log:
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {what}\\n")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _note(f"connect {address!r}")
        raise OSError(101, "refused by the test: no network in file mode")
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _note(f"connect_ex {address!r}")
        return 101
    return _connect_ex(self, address)
def getaddrinfo(host, *args, **kwargs):
    _note(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class HarvesterPushModeTests(TestCase):
    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.tools = await require_netns(self, reactor)
        self.base = Path(self.mktemp()).absolute()
        self.access = self.base / "harvester" / "worker-17"
        self.access.mkdir(parents=True)
        self.workdir = self.base / "pilot"
        self.workdir.mkdir()
        self.guard = self.base / "guard"
        self.guard.mkdir()
        (self.guard / "sitecustomize.py").write_text(GUARD)
        self.net_log = self.base / "net.log"
        self.queuedata = self.base / "queuedata.json"
        self.queuedata.write_text(json.dumps({QUEUE: {"name": QUEUE, "timefloor": 30, "corecount": 4}}))
        self.input = self.base / "data" / "in.dat"
        self.input.parent.mkdir()
        self.input.write_bytes(b"input data\n" * 100)

    def jobs(self) -> list[dict[str, Any]]:
        common = {"computingSite": QUEUE, "prodSourceLabel": "managed", "transformation": "/bin/bash"}
        data = self.input.read_bytes()
        plain = {
            **common,
            "PandaID": 1001,
            "jobPars": "-c 'tr a-z A-Z < in.dat > out.dat'",
            "inFiles": "in.dat",
            "scopeIn": "mc.in",
            "fsize": str(len(data)),
            "checksum": f"ad:{adler(data)}",
            "GUID": "0a0b0c0d-0000-1111-2222-333344445555",
            "outFiles": "out.dat,job1.log.tgz",
            "scopeOut": "mc.out",
            "logFile": "job1.log.tgz",
            "logGUID": "11111111-2222-3333-4444-000000001001",
            "scopeLog": "mc.log",
        }
        command = f"exec {sys.executable} {PAYLOAD} --workers 4 --channel PILOT_EVENTRANGECHANNEL"
        events = {
            **common,
            "PandaID": 1002,
            "jobPars": f"-c '{command}'",
            "eventService": "True",
            "jobsetID": 77,
            "jediTaskID": TASK,
            "coreCount": 4,
            "logFile": "job2.log.tgz",
            "logGUID": "11111111-2222-3333-4444-000000001002",
            "scopeLog": "mc.log",
        }
        third = {
            **common,
            "PandaID": 1003,
            "jobPars": "-c 'seq 1 1000 > numbers.txt'",
            "outFiles": "numbers.txt,job3.log.tgz",
            "scopeOut": "mc.out",
            "logFile": "job3.log.tgz",
            "logGUID": "11111111-2222-3333-4444-000000001003",
            "scopeLog": "mc.log",
        }
        return [plain, events, third]

    def ranges(self) -> list[dict[str, Any]]:
        return [
            {
                "eventRangeID": f"{TASK}-1002-555-{n}-1",
                "startEvent": 10 * n + 1,
                "lastEvent": 10 * n + 10,
                "LFN": "EVNT.pool.root.1",
                "GUID": "0a0b0c0d-0000-1111-2222-333344445555",
                "scope": "mc.evnt",
            }
            for n in range(10)
        ]

    def pilot(self, *mode: str) -> ManagedProcess:
        mode = mode or (
            "-z", "--harvester-submit-mode", "PUSH", "--harvester-workdir", str(self.access),
            "--harvester-interval", "0.2", "--harvester-job-wait", "8",
        )  # fmt: skip
        args = [
            "-q", QUEUE, "-w", "generic", *mode, "--getjob-requests", "1", "--queuedata", str(self.queuedata),
            "--workdir", str(self.workdir), "--summary-file", str(self.base / "summary.json"),
            "--log-file", str(self.workdir / "pilotlog.json"), "--es-zip-time-gap", "1",
            "--nojob-backoff", "0.1", "--nojob-backoff-max", "0.1",
        ]  # fmt: skip
        env = child_environment({"TXPILOT_NET_LOG": str(self.net_log)})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.guard), env.get("PYTHONPATH", "")) if p)
        argv = netns_argv(twistd_argv("pilot", *args), self.tools)
        process = ManagedProcess(
            reactor, reactor, argv, env=env, cwd=self.workdir,
            stdout=self.base / "pilot.log", stderr=self.base / "pilot.log", kill_grace=10.0, name="pilot",
        )  # fmt: skip
        process.start()
        self.addCleanup(lambda: process.terminate("test over") if process.running else None)
        return process

    async def test_three_jobs_one_of_them_event_service_without_network(self) -> None:
        jobs = self.jobs()
        side = HarvesterSide(
            self.access,
            clock=reactor,
            jobs=jobs,
            inputs={1001: [self.input]},
            ranges={1002: self.ranges()},
            interval=0.2,
            preplace=True,
        )
        side.start()
        self.addCleanup(side.stop)
        outcome = await self.pilot().wait()
        await side.cycle()
        await side.cycle()
        log = (self.base / "pilot.log").read_text()[-4000:]
        self.assertEqual(outcome.exit_code, 0, log)
        self.assertEqual(side.jobs_fed, [1001, 1002, 1003], log)
        states = {panda_id: state for panda_id, (state, _) in side.final_states.items()}
        self.assertEqual(states, {1001: "finished", 1002: "finished", 1003: "finished"}, (side.problems, log))
        self.assertEqual(side.problems, [])
        # every output and log declared once, with its size and checksum (checked by the side)
        declared = {p: sorted(s.lfn for s in files) for p, files in side.staged.items()}
        self.assertEqual(declared[1001], ["job1.log.tgz", "out.dat"])
        self.assertEqual(declared[1003], ["job3.log.tgz", "numbers.txt"])
        self.assertIn("job2.log.tgz", declared[1002], "the event-service job's log too")
        (out,) = [s for s in side.staged[1001] if s.lfn == "out.dat"]
        self.assertEqual(Path(out.path).read_bytes(), self.input.read_bytes().upper())
        # every range reported once, finished, its archive declared for stage-out
        self.assertEqual(side.range_status[1002], {r["eventRangeID"]: "finished" for r in self.ranges()})
        self.assertEqual(side.duplicate_updates, 0)
        self.assertTrue(all(len(h) == 1 for h in side.range_updates[1002].values()), side.range_updates)
        archives = [s for s in side.staged[1002] if s.type == "zip_output"]
        self.assertEqual({s.event_range_id for s in archives}, {r["eventRangeID"] for r in self.ranges()})
        self.assertTrue(side.killed, "the kill file at the end")
        self.assertIsNotNone(side.last_heartbeat)
        attempts = self.net_log.read_text() if self.net_log.exists() else ""
        self.assertEqual(attempts, "", "no connection attempted, no name looked up")

    async def test_arc_one_job_from_its_file_without_network(self) -> None:
        job = self.jobs()[0]
        job.pop("PandaID")
        fields = {"PandaID": "2001", **{k: str(v) for k, v in job.items()}}
        (self.workdir / "pandaJobData.out").write_text(urlencode(fields))
        (self.workdir / "in.dat").symlink_to(self.input)  # staged in by the CE
        outcome = await self.pilot("-z").wait()
        log = (self.base / "pilot.log").read_text()[-4000:]
        self.assertEqual(outcome.exit_code, 0, log)
        heartbeat = json.loads((self.workdir / "heartbeat.json").read_text())
        self.assertEqual((heartbeat["jobId"], heartbeat["jobStatus"]), (2001, "finished"), log)
        report = json.loads(heartbeat["xml"])
        self.assertEqual(sorted(report), ["job1.log.tgz", "out.dat"])
        out = self.workdir / "out.dat"
        self.assertEqual(out.read_bytes(), self.input.read_bytes().upper(), "where the CE collects it")
        self.assertEqual(report["out.dat"]["adler32"], adler(out.read_bytes()))
        self.assertTrue((self.workdir / "job1.log.tgz").is_file())
        attempts = self.net_log.read_text() if self.net_log.exists() else ""
        self.assertEqual(attempts, "", "no connection attempted, no name looked up")
