"""Real payloads breaking real limits, through a real pilot against the dev server.

Each test runs ``PilotService`` (as ``twistd pilot`` wires it) with small limits and
short intervals, a payload that misbehaves in one way, and then a well-behaved job,
and checks the error code the server received, that the payload's processes are gone,
and that the pilot went on with the next job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent
from twisted.trial.unittest import TestCase

from pilot.config import KeepWorkdirs
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.monitor.settings import MonitorSettings
from pilot.service import PilotService

from .events import log_event
from .harness import bash_job, mount_small_tmpfs, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "MONITOR_QUEUE"

FAST: dict[str, Any] = {
    "memory_interval": 0.2,
    "disk_interval": 0.2,
    "looping_interval": 0.2,
    "looping_limit": 3600.0,
    "min_free_running": 0,
    "min_free_start": 0,
}


def job(jobpars: str, **extra: Any) -> dict[str, Any]:
    return bash_job(QUEUE, jobpars, **extra)


GOOD = job("-c 'echo fine > fine.txt'", outFiles="fine.txt,job.log.tgz", scopeOut="it")


def update_params(view: dict[str, object]) -> list[dict[str, Any]]:
    updates = view["updates"]
    assert isinstance(updates, list)
    return [u["params"] for u in updates]


def accepted_running(event: LogEvent) -> bool:
    """The pilot's event for a ``running`` update (or heartbeat) the server accepted."""
    return bool(event.get("event") == "job.update" and event.get("state") == "running")


def final_param(view: dict[str, object], name: str) -> int:
    return int(update_params(view)[-1][name])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LimitTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: {"timefloor": 10, "params": {"pilot_rss_grace": 0}}}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    def pilot(
        self, workdir: Path | None = None, *, keep_workdirs: KeepWorkdirs = KeepWorkdirs.NONE, **monitor: Any
    ) -> PilotService:
        settings = dict(FAST)
        settings.update(monitor)
        return pilot_service(
            self.server,
            QUEUE,
            workdir or self.base / "pilot",
            monitor=MonitorSettings(**settings),
            getjob_requests=1,
            heartbeat_period=0.5,
            log_file=self.base / "pilotlog.json",
            summary_file=self.base / "summary.json",
            keep_workdirs=keep_workdirs,
        )

    async def run_jobs(
        self, bad: dict[str, Any], *, workdir: Path | None = None, **monitor: Any
    ) -> list[dict[str, Any]]:
        ids = await self.server.submit([bad, GOOD])
        service = self.pilot(workdir, **monitor)
        await run_to_end(service)
        views = [await self.server.job(i) for i in ids]
        self.assertEqual(views[1]["jobStatus"], "finished", "the pilot went on with the next job")
        self.assertEqual(views[0]["jobStatus"], "failed")
        return views

    def child_pids(self) -> list[int]:
        return [int(p) for p in (self.base / "pids").read_text().split()]

    async def test_memory_above_the_limit(self) -> None:
        """PSS above minRamCount (grace 0) → PAYLOADEXCEEDMAXMEM; the whole tree is killed."""
        pids = self.base / "pids"
        # touch every page (calloc'ed memory is not resident until written); no quotes, as the
        # whole command is inside jobPars' single quotes
        hog = "import time; x = bytearray(200 << 20); x[::4096] = bytes([1]) * (len(x) // 4096); time.sleep(600)"
        bad = job(
            f"-c 'sleep 600 & echo $! $$ > {pids}; python3 -c \"{hog}\"'",
            minRamCount=60,
        )
        (view, _) = await self.run_jobs(bad)
        self.assertEqual(view["pilotErrorCode"], ErrorCode.PAYLOADEXCEEDMAXMEM, view.get("pilotErrorDiag"))
        self.assertIn("PSS", str(view["pilotErrorDiag"]))
        self.assertGreater(final_param(view, "max_pss"), 60 * 1024)
        for pid in self.child_pids():
            self.assertFalse(alive(pid), f"payload process {pid} survived")

    async def test_stdout_too_big(self) -> None:
        bad = job("-c 'head -c 300000 /dev/zero | tr \"\\\\0\" x; sleep 600'")
        (view, _) = await self.run_jobs(bad, stdout_limit=100_000)
        self.assertEqual(view["pilotErrorCode"], ErrorCode.STDOUTTOOBIG, view.get("pilotErrorDiag"))

    async def test_looping_job(self) -> None:
        pids = self.base / "pids"
        bad = job(f"-c 'echo started; echo $$ > {pids}; sleep 600'")
        (view, _) = await self.run_jobs(bad, looping_limit=1.0)
        self.assertEqual(view["pilotErrorCode"], ErrorCode.LOOPINGJOB, view.get("pilotErrorDiag"))
        self.assertFalse(any(alive(pid) for pid in self.child_pids()))

    async def test_full_disk_during_the_job(self) -> None:
        workdir = self.base / "small"
        await mount_small_tmpfs(self, workdir, "16m")
        bad = job("-c 'head -c 15500000 /dev/zero > filler.dat; sleep 600'")
        (view, _) = await self.run_jobs(
            bad, workdir=workdir, min_free_running=2_000_000, min_free_start=4_000_000
        )
        self.assertEqual(view["pilotErrorCode"], ErrorCode.NOLOCALSPACE, view.get("pilotErrorDiag"))

    async def test_segfault_is_reported_as_such(self) -> None:
        crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
        (view, _) = await self.run_jobs(job(f"-c 'exec python3 -c \"{crash}\"'"))
        self.assertEqual(view["pilotErrorCode"], ErrorCode.SIGSEGV, view.get("pilotErrorDiag"))
        self.assertIn("signal 11", str(view["pilotErrorDiag"]))

    async def test_monitor_files_are_written(self) -> None:
        (panda_id,) = await self.server.submit(
            [job("-c 'python3 -c \"x = bytearray(30 << 20); import time; time.sleep(1.5)\"; echo ok > fine.txt'",
                 outFiles="fine.txt,job.log.tgz", scopeOut="it")]
        )  # fmt: skip
        service = self.pilot(keep_workdirs=KeepWorkdirs.ALL)
        await run_to_end(service)
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        self.assertGreater(final_param(view, "max_rss"), 25 * 1024)
        assert service.pilot_dir is not None
        workdir = service.pilot_dir / f"PanDA_Pilot-{panda_id}"
        summary = json.loads((workdir / "memory_monitor_summary.json").read_text())
        self.assertGreater(summary["Max"]["rss"], 25 * 1024)
        self.assertTrue((workdir / "memory_monitor_output.txt").read_text().startswith("Time"))
        self.assertTrue((workdir / "memory_monitor_plot.svg").read_text().lstrip().startswith("<"))


class DebugModeTests(TestCase):
    timeout = 120

    async def test_debug_heartbeats_carry_the_redacted_tail(self) -> None:
        base = Path(self.mktemp()).absolute()
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: {"timefloor": 10}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwaWxvdCJ9.c2VjcmV0LXNpZ25hdHVyZQ"
        payload = f"-c 'echo \"token={secret}\"; for i in $(seq 1 600); do echo line $i; sleep 0.05; done'"
        (panda_id,) = await server.submit([job(payload)])
        service = pilot_service(
            server, QUEUE, base / "pilot", monitor=MonitorSettings(**FAST), getjob_requests=1,
            heartbeat_period=0.3, debug_heartbeat_period=0.2,
        )  # fmt: skip
        running = log_event(accepted_running)
        service.startService()
        await running
        self.assertEqual((await server.job(panda_id))["jobStatus"], "running")
        debug_on = log_event(lambda event: event.get("event") == "job.heartbeat_period")
        await server.set_debug(panda_id)
        await debug_on
        stdouts: list[str] = []
        for _ in range(3):  # look after each accepted heartbeat; the first debug one has the tail
            await log_event(accepted_running)
            view = await server.job(panda_id)
            stdouts = [str(p["stdout"]) for p in update_params(view) if p.get("stdout")]
            if stdouts:
                break
        assert service.pilot_dir is not None
        status = json.loads((service.pilot_dir / "pilot_status.json").read_text())
        await server.set_command(panda_id, "tobekilled")
        await service.when_finished()
        await service.stopService()
        self.assertTrue(stdouts, "a debug heartbeat carried the file tail")
        self.assertIn("line ", stdouts[-1])
        self.assertIn("payload.stdout", stdouts[-1])
        self.assertNotIn(secret, "".join(stdouts))
        self.assertIn("[REDACTED]", stdouts[0])
        self.assertEqual(status["job"]["pandaid"], panda_id, "the status file shows the running job")
        self.assertEqual(status["job"]["phase"], "running")
        self.assertTrue(status["job"]["debug"])
        self.assertEqual(status["pilot"]["queue"], QUEUE)


#: A stand-in for HSF prmon (not packaged for Debian): it takes prmon's options, writes
#: prmon's two files while the watched pid lives, and on SIGUSR1 writes its summary
#: and exits, as prmon does.  Its argv goes to ``prmon.argv.json`` for the test to check.
STAND_IN_PRMON = r"""#!/usr/bin/env python3
import json, os, signal, sys, time
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
with open("prmon.argv.json", "w") as handle:  # in its working directory
    json.dump(sys.argv[1:], handle)
def finish(*_):
    summary = {"Max": {"pss": 77777, "rss": 88888, "vmem": 99999, "swap": 0, "rchar": 5, "wchar": 6,
                       "read_bytes": 7, "write_bytes": 8},
               "Avg": {"pss": 11111, "rss": 22222, "vmem": 33333, "swap": 0}}
    with open(opts["--json-summary"], "w") as handle:
        json.dump(summary, handle)
    sys.exit(0)
signal.signal(signal.SIGUSR1, finish)
with open(opts["--filename"], "w") as handle:
    handle.write("Time\twtime\tpss\n")
    while True:
        try:
            os.kill(int(opts["--pid"]), 0)
        except ProcessLookupError:
            finish()
        handle.write(f"{int(time.time())}\t0\t1\n")
        handle.flush()
        time.sleep(0.05)
"""


class ExternalPrmonTests(TestCase):
    timeout = 60

    async def run_with_prmon(self, program: str, jobpars: str) -> tuple[dict[str, Any], PilotService, Path]:
        """One job on a queue asking for prmon, with ``program`` as the prmon on PATH."""
        base = Path(self.mktemp()).absolute()
        bin_dir = base / "bin"
        bin_dir.mkdir(parents=True)
        prmon = bin_dir / "prmon"
        prmon.write_text(program)
        prmon.chmod(0o755)
        queue = {"timefloor": 10, "params": {"memory_monitor": "prmon"}}
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: queue})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        (panda_id,) = await server.submit([job(jobpars)])
        environ = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        service = pilot_service(
            server, QUEUE, base / "pilot", monitor=MonitorSettings(**FAST), getjob_requests=1,
            environ=environ, keep_workdirs=KeepWorkdirs.ALL,
        )  # fmt: skip
        await run_to_end(service)
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        assert service.pilot_dir is not None
        return view, service, service.pilot_dir / f"PanDA_Pilot-{panda_id}"

    async def test_queue_asks_for_prmon(self) -> None:
        view, _, workdir = await self.run_with_prmon(STAND_IN_PRMON, "-c 'sleep 1'")
        self.assertEqual(final_param(view, "max_pss"), 77777, "prmon's summary gives the memory fields")
        self.assertEqual(final_param(view, "avg_rss"), 22222)
        argv = json.loads((workdir / "prmon.argv.json").read_text())
        self.assertEqual(
            argv,
            ["--pid", argv[1], "--filename", "memory_monitor_output.txt",
             "--json-summary", "memory_monitor_summary.json", "--interval", "1"],
        )  # fmt: skip
        self.assertEqual(
            json.loads((workdir / "memory_monitor_summary.json").read_text())["Max"]["pss"], 77777
        )
        self.assertTrue((workdir / "memory_monitor_plot.svg").exists(), "the plot comes from our own samples")

    async def test_crashed_prmon_is_restarted(self) -> None:
        """A prmon that dies at once is started again (pilot3 allows five restarts)."""
        crash_once = (
            'if not os.path.exists("crashed-once"):\n    open("crashed-once", "w").close()\n    sys.exit(9)\n'
        )
        first_line = "import json, os, signal, sys, time\n"
        program = STAND_IN_PRMON.replace(first_line, first_line + crash_once)
        view, service, _ = await self.run_with_prmon(program, "-c 'sleep 2.5'")
        (record,) = [r for r in service.summaries[0].processes if r.name == "prmon"]
        self.assertEqual(record.restarts, 1)
        self.assertEqual(final_param(view, "max_pss"), 77777, "the restarted prmon's summary is used")
