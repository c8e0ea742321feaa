"""End to end: the pilot against the embedded dev server over real TLS.

The in-process tests build the pilot service exactly as ``pilot.tap`` does (real
reactor, real processes, treq over a verifying TLS policy presenting the dev
server's RFC 3820 proxy) and check what the server's database says afterwards.
The process tests run ``twistd -n pilot`` itself, for signals and exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode
from pilot.localrun import child_environment, pilot_arguments, start_pilot_process, twistd_argv
from pilot.model.credentials import Credentials
from pilot.queuedata import QueueData
from pilot.server.api import ApiMode
from pilot.server.client import ServerUnavailable
from pilot.service import PilotService
from pilot.service.requests import job_request

from .harness import pilot_service

QUEUE = "IT_QUEUE"
reactor: Any = _reactor


def payload_job(n: int, **extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "computingSite": QUEUE,
        "prodSourceLabel": "managed",
        "transformation": "/bin/bash",
        "jobPars": f"-c 'printf \"result of job {n}\\n\" > result_{n}.txt'",
        "outFiles": f"result_{n}.txt,job_{n}.log.tgz",
        "scopeOut": "it",
        "logFile": f"job_{n}.log.tgz",
        "scopeLog": "it",
    }
    job.update(extra)
    return job


def adler32_hex(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class PilotAgainstDevServerTests(TestCase):
    timeout = 120

    async def _server(self, **queues: Any) -> DevServer:
        server = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: queues})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def _pilot(self, server: DevServer, credentials: Credentials, **settings: Any) -> PilotService:
        return pilot_service(server, QUEUE, Path(self.mktemp()), credentials=credentials, **settings)

    async def _run_pilot(self, service: PilotService) -> ExitCode:
        service.startService()
        await _finished(service)
        assert service.exit_code is not None
        return service.exit_code

    async def _three_jobs(self, api: ApiMode, *, ca_directory: bool = False) -> None:
        server = await self._server(timefloor=10)
        ids = await server.submit([payload_job(1), payload_job(2), payload_job(3)])
        if ca_directory:
            creds = Credentials(capath=server.pki.ca_dir, proxy=server.pki.client_proxy)
        else:
            creds = Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
        service = self._pilot(server, creds, api=api)
        self.assertEqual(await self._run_pilot(service), ExitCode.OK)
        for n, panda_id in enumerate(ids, start=1):
            view = await server.job(panda_id)
            self.assertEqual(view["jobStatus"], "finished", view.get("adderDiag"))
            report = json.loads(str(view["jobOutputReport"]))
            content = f"result of job {n}\n".encode()
            self.assertEqual(report[f"result_{n}.txt"]["fsize"], len(content))
            self.assertEqual(report[f"result_{n}.txt"]["adler32"], adler32_hex(content))
            definition = view["job"]
            assert isinstance(definition, dict)
            self.assertEqual(report[f"job_{n}.log.tgz"]["guid"], definition["logGUID"])
            updates = view["updates"]
            assert isinstance(updates, list)
            states = [u["state"] for u in updates]
            self.assertEqual(states, ["starting", "running", "finished"])
        self.assertEqual(len(service.summaries), 3)
        expected_prefix = "/server/panda/" if api is ApiMode.LEGACY else "/api/v1/"
        pilot_calls = [e for e in server.request_log.entries if e.uri.startswith(("/server/", "/api/"))]
        self.assertTrue(all(e.uri.startswith(expected_prefix) for e in pilot_calls))
        self.assertTrue(all(e.dn == server.user_dn for e in pilot_calls), "the proxy's bare DN")
        nodes = await server.worker_nodes()
        if api is ApiMode.LEGACY:
            self.assertEqual(nodes, [], "legacy servers have no update_worker_node")
        else:
            self.assertEqual([n["host_name"] for n in nodes], [service.config.node], "reported once")
            self.assertGreater(int(str(nodes[0]["n_logical_cpus"])), 0)

    async def test_three_jobs_v1(self) -> None:
        await self._three_jobs(ApiMode.V1)

    async def test_three_jobs_legacy(self) -> None:
        await self._three_jobs(ApiMode.LEGACY)

    async def test_three_jobs_with_a_ca_directory(self) -> None:
        await self._three_jobs(ApiMode.AUTO, ca_directory=True)

    async def test_untrusted_server_is_refused(self) -> None:
        server = await self._server()
        other = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(other.stop()))
        service = self._pilot(server, Credentials(cacert=other.pki.ca_cert, proxy=server.pki.client_proxy))
        request = job_request(service.config, QueueData.default(QUEUE), (None, 1024, None), 3600)
        failure = await _expect_failure(service.client.acquire_job(request))
        self.assertIsInstance(failure, ServerUnavailable)
        self.assertIn("TLS", str(failure))
        await service.close_connections()

    async def test_server_kill_and_payload_failure(self) -> None:
        server = await self._server(timefloor=10)
        slow, failing = await server.submit(
            [payload_job(1, jobPars="-c 'sleep 600'"), payload_job(2, jobPars="-c 'exit 7'")]
        )
        service = self._pilot(
            server,
            Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy),
            heartbeat_period=0.5,
        )
        service.startService()
        await _until(lambda: _state(server, slow), "running")
        await server.set_command(slow, "tobekilled")
        await _finished(service)
        killed = await server.job(slow)
        self.assertEqual(killed["jobStatus"], "failed")
        self.assertEqual(killed["pilotErrorCode"], ErrorCode.PANDAKILL)
        failed = await server.job(failing)
        self.assertEqual((failed["jobStatus"], failed["transExitCode"]), ("failed", 7))
        self.assertEqual(failed["pilotErrorCode"], ErrorCode.PAYLOADEXECUTIONFAILURE)


async def _finished(service: PilotService) -> None:
    await service.when_finished()
    await service.stopService()


async def _expect_failure(coroutine: Any) -> BaseException:
    try:
        await coroutine
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError("no failure")


async def _state(server: DevServer, panda_id: int) -> str:
    return str((await server.job(panda_id))["jobStatus"])


async def _until(probe: Any, value: str, limit: float = 30.0) -> None:
    waited = 0.0
    while await probe() != value:
        if waited > limit:
            raise AssertionError(f"never reached {value!r}")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class TwistdPilotTests(TestCase):
    """``twistd -n pilot`` as a real process: signals, exit codes, one-line errors."""

    timeout = 120

    async def test_sigterm_reports_the_job_and_exits_143(self) -> None:
        server = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: {"timefloor": 10}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        scratch = Path(self.mktemp()).resolve()
        scratch.mkdir()
        pids = scratch / "pids"
        script = f'(trap "" TERM; exec sleep 600) & echo $! >> {pids}; echo $$ >> {pids}; sleep 600'
        (panda_id,) = await server.submit([payload_job(1, jobPars=f"-c '{script}'")])
        workdir = scratch / "pilot"
        args = pilot_arguments(
            server.url,
            str(server.pki.ca_cert),
            queue=QUEUE,
            workdir=workdir,
            summary_file=scratch / "summary.json",
        )
        pilot = start_pilot_process(
            reactor,
            reactor,
            [*args, "--kill-grace", "1"],
            proxy=str(server.pki.client_proxy),
            workdir=workdir,
            log_path=scratch / "pilot.log",
        )
        self.addCleanup(lambda: pilot.kill() if pilot.running else None)
        await _until(lambda: _state(server, panda_id), "running")
        await _until_file(pids, lines=2)
        assert pilot.pid is not None
        os.kill(pilot.pid, signal.SIGTERM)
        outcome = await pilot.wait()
        log = (scratch / "pilot.log").read_text()
        self.assertEqual((outcome.exit_code, outcome.signal), (143, None), log[-3000:])
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.SIGTERM)
        for pid in map(int, pids.read_text().split()):
            self.assertFalse(
                psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, pid
            )
        summary = json.loads((scratch / "summary.json").read_text())
        self.assertEqual(summary["pilot"]["exit_code"], 143)

    async def test_startup_errors_are_one_line_with_documented_codes(self) -> None:
        queuedata = Path(self.mktemp()).absolute()
        queuedata.write_text(json.dumps({"nickname": "OFF", "status": "offline"}))
        cases = [
            (
                ["-q", "X", "--pilot-user", "nosuchvo"],
                ExitCode.USAGE,
                "no experiment plug-in named 'nosuchvo'",
            ),
            (["-q", "X", "--url", "http://insecure.example"], ExitCode.USAGE, "must be reached over https"),
            (["-q", "OFF", "--queuedata", str(queuedata)], ExitCode.PANDAQUEUENOTONLINE, "offline"),
        ]
        cwd = Path(self.mktemp())
        cwd.mkdir()
        for args, code, text in cases:
            argv = twistd_argv("pilot", *args)
            out, err, status = await getProcessOutputAndValue(
                argv[0], argv[1:], env=child_environment(), path=str(cwd), reactor=reactor
            )
            self.assertEqual(status, int(code), (args, err))
            if code is ExitCode.USAGE:
                lines = err.decode().strip().splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertIn(text, lines[0])
            else:
                self.assertIn(text, out.decode() + err.decode())


async def _until_file(path: Path, lines: int, limit: float = 30.0) -> None:
    waited = 0.0
    while not path.exists() or len(path.read_text().split()) < lines:
        if waited > limit:
            raise AssertionError(f"{path} incomplete")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
