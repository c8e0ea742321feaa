"""A whole job whose payload runs in bubblewrap, against the dev server.

The payload reads its staged-in input and writes its outputs in the work directory,
and tries what it must not manage: read the pilot's proxy and token file, write outside
its work directory (the pilot's directory, the test's directory, /etc), see or leave
files in the host's /tmp.  It records each attempt's outcome; the test checks them and
that the job still finishes with its outputs stored.
"""

from __future__ import annotations

import os
import uuid
import zlib
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.config import KeepWorkdirs
from pilot.devserver.server import start_dev_server
from pilot.job.staging import StagingSetup
from pilot.model.credentials import Credentials
from pilot.monitor.settings import MonitorSettings
from pilot.staging.urls import rucio_path

from .events import exists, file_ready
from .harness import file_storage, pilot_service, run_to_end
from .services import require_bubblewrap

reactor: Any = _reactor
QUEUE = "BWRAP_QUEUE"


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class BubblewrapJobTests(TestCase):
    timeout = 120

    async def test_job_in_bubblewrap(self) -> None:
        require_bubblewrap()
        base = Path(self.mktemp()).absolute()
        storage = base / "SITE"
        storage.mkdir(parents=True)
        data = b"input bytes\n"
        source = storage / rucio_path("mc", "in1.root")
        source.parent.mkdir(parents=True)
        source.write_bytes(data)
        queuedata = {
            "timefloor": 10,
            "container_type": "bubblewrap:payload",
            "copytools": {"cp": {}},
            "acopytools": {"pr": ["cp"], "pw": ["cp"], "pl": ["cp"]},
            "astorages": {"read_lan": ["SITE"], "pw": ["SITE"], "pl": ["SITE"]},
        }
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: queuedata})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        token = base / "pilot-token"
        token.write_text("secret-pilot-token\n")
        planted = Path("/tmp") / f"txpilot-host-{uuid.uuid4().hex}"
        planted.write_text("host tmp\n")
        self.addCleanup(planted.unlink)
        left = f"txpilot-payload-{uuid.uuid4().hex}"
        proxy = server.pki.client_proxy
        pilot_base = base / "pilot"
        script = "; ".join(
            [
                "cat in1.root > out1.root",
                f"(cat {proxy} >/dev/null 2>&1 && echo proxy:read || echo proxy:denied) >> probes.txt",
                f"(cat {token} >/dev/null 2>&1 && echo token:read || echo token:denied) >> probes.txt",
                f"(touch {pilot_base}/escape 2>/dev/null && echo pilotdir:written || echo pilotdir:denied) >> probes.txt",
                f"(touch {base}/escape 2>/dev/null && echo testdir:written || echo testdir:denied) >> probes.txt",
                "(touch /etc/escape 2>/dev/null && echo etc:written || echo etc:denied) >> probes.txt",
                f"(test -e {planted} && echo tmp:shared || echo tmp:private) >> probes.txt",
                f"touch /tmp/{left}",
                "cp probes.txt out2.txt",
            ]
        )
        (panda_id,) = await server.submit(
            [
                {
                    "computingSite": QUEUE,
                    "prodSourceLabel": "managed",
                    "transformation": "/bin/bash",
                    "jobPars": f"-c '{script}'",
                    "inFiles": "in1.root",
                    "scopeIn": "mc",
                    "ddmEndPointIn": "SITE",
                    "fsize": str(len(data)),
                    "checksum": f"ad:{adler(data)}",
                    "GUID": "11111111-1111-1111-1111-111111111111",
                    "outFiles": "out1.root,out2.txt,job.log.tgz",
                    "scopeOut": "mc",
                    "logFile": "job.log.tgz",
                    "scopeLog": "mc",
                }
            ]
        )
        storage_data = file_storage({"SITE": storage})
        service = pilot_service(
            server,
            QUEUE,
            pilot_base,
            credentials=Credentials(cacert=server.pki.ca_cert, proxy=proxy, token_file=token),
            staging=StagingSetup(storage=storage_data, records_dir=pilot_base),
            getjob_requests=1,
            keep_workdirs=KeepWorkdirs.ALL,
            monitor=MonitorSettings(min_free_start=0, min_free_running=0),
        )
        await run_to_end(service)
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        self.assertEqual(service.summaries[0].runtimes, {"payload": "bubblewrap"})
        self.assertEqual((storage / rucio_path("mc", "out1.root")).read_bytes(), data)
        probes = (storage / rucio_path("mc", "out2.txt")).read_text().split()
        self.assertEqual(
            probes,
            [
                "proxy:denied",
                "token:denied",
                "pilotdir:denied",
                "testdir:denied",
                "etc:denied",
                "tmp:private",
            ],
        )
        self.assertFalse((Path("/tmp") / left).exists(), "the payload's /tmp is private")
        self.assertFalse((pilot_base / "escape").exists())


class ApptainerJobTests(TestCase):
    """A job whose payload runs through the generated ``apptainer exec`` command.

    apptainer cannot be installed here: ``tests/data/apptainer-standin`` parses the
    command as apptainer's CLI does (and fails on anything it would reject), then runs
    it without isolation, so the whole path — queue ``container_type``, image from the
    job, options, environment passing — runs for real.
    """

    timeout = 60

    async def test_job_through_generated_apptainer_command(self) -> None:
        base = Path(self.mktemp()).absolute()
        bin_dir = base / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "apptainer").symlink_to(Path(__file__).parent / "data" / "apptainer-standin")
        queuedata = {"timefloor": 10, "container_type": "apptainer:payload", "container_options": "-B /srv"}
        Path("/srv").mkdir(exist_ok=True)
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: queuedata})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        (panda_id,) = await server.submit(
            [
                {
                    "computingSite": QUEUE,
                    "prodSourceLabel": "managed",
                    "transformation": "/bin/bash",
                    "jobPars": "-c 'pwd > where.txt; env > env.txt'",
                    "container_name": "docker://almalinux:9",
                    "logFile": "job.log.tgz",
                    "scopeLog": "mc",
                }
            ]
        )
        environ = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "LANG": "C.UTF-8"}
        service = pilot_service(
            server, QUEUE, base / "pilot", getjob_requests=1, keep_workdirs=KeepWorkdirs.ALL,
            monitor=MonitorSettings(min_free_start=0, min_free_running=0), environ=environ,
        )  # fmt: skip
        await run_to_end(service)
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        self.assertEqual(service.summaries[0].runtimes, {"payload": "apptainer"})
        assert service.pilot_dir is not None
        workdir = service.pilot_dir / f"PanDA_Pilot-{panda_id}"
        self.assertEqual(
            (workdir / "where.txt").read_text().strip(), str(workdir), "--pwd is the work directory"
        )
        env = dict(
            line.split("=", 1) for line in (workdir / "env.txt").read_text().splitlines() if "=" in line
        )
        self.assertEqual(env["PandaID"], str(panda_id), "job variables arrive through APPTAINERENV_")
        self.assertEqual(env.get("APPTAINER_CONTAINER"), "docker://almalinux:9")


class BubblewrapStopTests(TestCase):
    """Stopping a sandboxed payload gives it its grace period (SIGTERM first, not SIGKILL)."""

    timeout = 60

    async def test_sigterm_reaches_the_payload_and_it_cleans_up(self) -> None:
        require_bubblewrap()
        from pilot.container.bubblewrap import BubblewrapRuntime
        from pilot.container.spec import ContainerSpec
        from pilot.process.runner import ManagedProcess

        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        script = (
            "trap 'sleep 0.3; echo cleaned up > cleanup.txt; exit 3' TERM; touch started; sleep 100 & wait"
        )
        spec = ContainerSpec(
            role="payload", argv=["/bin/bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, workdir=workdir
        )
        launch = BubblewrapRuntime().wrap(spec, os.environ)
        process = ManagedProcess(
            reactor, reactor, launch.argv, env=launch.env, cwd=workdir, stdout=workdir / "out",
            stderr=workdir / "err", kill_grace=20.0, soft_stop_depth=launch.shield_levels,
        )  # fmt: skip
        process.start()
        await file_ready(workdir / "started", ready=exists, timeout=20.0, unless=process.wait())
        outcome = await process.terminate("test")
        self.assertEqual((workdir / "cleanup.txt").read_text(), "cleaned up\n", "the trap ran")
        self.assertEqual(outcome.exit_code, 3, "the payload's own exit status, not a SIGKILL")
        self.assertLess(outcome.ended - outcome.started, 10.0, "ended within the grace, no escalation")


class BubblewrapStagingTests(TestCase):
    """Copytools in the queue's middleware container: ``bubblewrap:middleware``."""

    timeout = 120

    async def test_stage_in_and_out_in_bubblewrap(self) -> None:
        require_bubblewrap()
        base = Path(self.mktemp()).absolute()
        storage = base / "SITE"
        data = b"input for a contained copytool\n"
        source = storage / rucio_path("mc", "in1.root")
        source.parent.mkdir(parents=True)
        source.write_bytes(data)
        queuedata = {
            "timefloor": 10,
            "container_type": "bubblewrap:middleware",
            "copytools": {"cp": {}},
            "acopytools": {"pr": ["cp"], "pw": ["cp"], "pl": ["cp"]},
            "astorages": {"read_lan": ["SITE"], "pw": ["SITE"], "pl": ["SITE"]},
        }
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: queuedata})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        (panda_id,) = await server.submit(
            [
                {
                    "computingSite": QUEUE, "prodSourceLabel": "managed", "transformation": "/bin/bash",
                    "jobPars": "-c 'cp in1.root out1.root'", "inFiles": "in1.root", "scopeIn": "mc",
                    "ddmEndPointIn": "SITE", "fsize": str(len(data)), "checksum": f"ad:{adler(data)}",
                    "GUID": "11111111-1111-1111-1111-111111111111", "outFiles": "out1.root,job.log.tgz",
                    "scopeOut": "mc", "logFile": "job.log.tgz", "scopeLog": "mc",
                }
            ]
        )  # fmt: skip
        storage_data = file_storage({"SITE": storage})
        pilot_base = base / "pilot"
        service = pilot_service(
            server, QUEUE, pilot_base, staging=StagingSetup(storage=storage_data, records_dir=pilot_base),
            getjob_requests=1, monitor=MonitorSettings(min_free_start=0, min_free_running=0),
        )  # fmt: skip
        await run_to_end(service)
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        self.assertEqual(service.summaries[0].runtimes, {"stagein": "bubblewrap", "stageout": "bubblewrap"})
        self.assertEqual((storage / rucio_path("mc", "out1.root")).read_bytes(), data)
        self.assertTrue((storage / rucio_path("mc", "job.log.tgz")).exists(), "the log went out too")
