"""Pre-, co- and post-processes, utilities and the payload's environment, end to end.

Real processes through a real pilot against the dev server.  Ordering is asserted
from timestamps the processes write themselves (``date +%s.%N``), not from the pilot's
view of them.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.config import KeepWorkdirs
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.experiments.base import BaseExperiment
from pilot.job.composition import fetch_step
from pilot.model.documents import Step
from pilot.model.job import Job, parse_job
from pilot.model.processes import UtilitySpec
from pilot.monitor.settings import MonitorSettings
from pilot.queuedata import QueueData
from pilot.service import PilotService

from .fakes import run_sync
from .harness import bash_job, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "COMPOSITION_QUEUE"
NOW = "date +%s.%N"


def job(jobpars: str, **extra: Any) -> dict[str, Any]:
    return bash_job(QUEUE, jobpars, **extra)


def step(command: str, args: str = "", **extra: Any) -> str:
    return json.dumps({"command": command, "args": args, **extra})


class CrashingUtilityExperiment(BaseExperiment):
    """A test plug-in whose utility dies at once, every time."""

    name = "crashing-utility"

    def utilities(self, job: Job, queuedata: QueueData, workdir: Path) -> Sequence[UtilitySpec]:
        return [
            UtilitySpec(
                name="crasher",
                argv=["/bin/sh", "-c", "echo run $0 >> crasher.log; exit 3", "{payload_pid}"],
                when="with",
                max_restarts=2,
            )
        ]


class CompositionTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: {"timefloor": 10}}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    def pilot(self, **settings: Any) -> PilotService:
        self.runs = getattr(self, "runs", 0) + 1
        return pilot_service(
            self.server,
            QUEUE,
            self.base / f"pilot{self.runs}",
            getjob_requests=1,
            keep_workdirs=KeepWorkdirs.ALL,
            monitor=MonitorSettings(min_free_start=0, min_free_running=0),
            **settings,
        )

    async def run_one(
        self, definition: dict[str, Any], **settings: Any
    ) -> tuple[dict[str, Any], Path, PilotService]:
        (panda_id,) = await self.server.submit([definition])
        service = self.pilot(**settings)
        await run_to_end(service)
        assert service.pilot_dir is not None
        return await self.server.job(panda_id), service.pilot_dir / f"PanDA_Pilot-{panda_id}", service

    async def test_pre_co_post_order_and_coprocess_stop(self) -> None:
        view, workdir, service = await self.run_one(
            job(
                f"-c '{NOW} > payload.start; sleep 1; {NOW} > payload.end'",
                preprocess=step("/bin/sh", f"-c '{NOW} > pre.start; sleep 0.3; {NOW} > pre.end'"),
                coprocess=step("/bin/sh", f"-c 'while :; do {NOW} >> co.ticks; sleep 0.1; done'"),
                postprocess=step("/bin/sh", f"-c '{NOW} > post.start'"),
            )
        )
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))

        def stamp(name: str) -> float:
            return float((workdir / name).read_text().split()[-1])

        ticks = [float(t) for t in (workdir / "co.ticks").read_text().split()]
        self.assertLessEqual(stamp("pre.end"), stamp("payload.start"), "pre-process before the payload")
        self.assertGreaterEqual(ticks[0], stamp("pre.end"), "co-process starts with the payload")
        self.assertGreater(len(ticks), 3, "co-process ran while the payload ran")
        self.assertLess(ticks[-1], stamp("payload.end") + 1.0, "co-process stopped when the payload ended")
        self.assertGreaterEqual(stamp("post.start"), stamp("payload.end"), "post-process after the payload")
        records = {r.name: r for r in service.summaries[0].processes}
        self.assertEqual(set(records), {"preprocess", "payload", "coprocess", "postprocess"})
        self.assertEqual(records["preprocess"].exit_code, 0)
        self.assertTrue(records["coprocess"].stopped_by_pilot)
        for name in records:
            self.assertTrue((workdir / f"{name}.stdout").exists(), f"{name} has its own stdout")

    async def test_failing_preprocess(self) -> None:
        view, workdir, _ = await self.run_one(
            job("-c 'touch payload.ran'", preprocess=step("/bin/sh", "-c 'exit 3'"))
        )
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.PREPROCESSFAILURE)
        self.assertIn("code 3", str(view["pilotErrorDiag"]))
        self.assertFalse((workdir / "payload.ran").exists(), "the payload did not run")

    async def test_preprocess_ends_the_hpo_loop(self) -> None:
        view, workdir, _ = await self.run_one(
            job("-c 'touch payload.ran'", preprocess=step("/bin/sh", "-c 'exit 161'"))
        )
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        self.assertFalse((workdir / "payload.ran").exists())

    async def test_postprocess_failure_and_ignore_failure(self) -> None:
        failing, _, _ = await self.run_one(job("-c true", postprocess=step("/bin/sh", "-c 'exit 4'")))
        self.assertEqual(failing["pilotErrorCode"], ErrorCode.POSTPROCESSFAILURE)
        ignored, _, _ = await self.run_one(
            job("-c true", postprocess=step("/bin/sh", "-c 'exit 4'", ignore_failure=True))
        )
        self.assertEqual(ignored["jobStatus"], "finished", ignored.get("pilotErrorDiag"))

    async def test_crashing_utility_is_restarted_up_to_the_limit(self) -> None:
        view, workdir, service = await self.run_one(
            job("-c 'sleep 4'"), experiment=CrashingUtilityExperiment()
        )
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        runs = (workdir / "crasher.log").read_text().splitlines()
        self.assertEqual(len(runs), 3, "first run plus 2 restarts")
        self.assertTrue(all(line.split()[1].isdigit() for line in runs), "{payload_pid} was replaced")
        (record,) = [r for r in service.summaries[0].processes if r.name == "crasher"]
        self.assertEqual((record.restarts, record.exit_code), (2, 3))

    async def test_payload_environment_has_no_pilot_credentials(self) -> None:
        secrets = {"MY_DB_PASSWORD": "p4ss"}
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "X509_USER_PROXY": "/pilot/proxy.pem",
            "PANDA_AUTH_TOKEN": "tok",
            "BEARER_TOKEN": "tok2",
            "AWS_SECRET_ACCESS_KEY": "aws",
            "AWS_ACCESS_KEY_ID": "AKIA",
            "GCS_ACCESS_TOKEN": "g",
            "S3_CREDENTIALS_FILE": "/pilot/s3.json",
            "LANG": "C.UTF-8",
        }
        view, workdir, _ = await self.run_one(
            job(
                '-c \'env > env.txt; stat -c %a "$PANDA_JOB_SECRETS_FILE" > mode.txt; cat "$PANDA_JOB_SECRETS_FILE" > seen.txt\'',
                secrets=json.dumps(secrets),
            ),
            environ=environ,
        )
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        names = {
            line.split("=", 1)[0] for line in (workdir / "env.txt").read_text().splitlines() if "=" in line
        }
        denied = {"X509_USER_PROXY", "PANDA_AUTH_TOKEN", "BEARER_TOKEN", "AWS_SECRET_ACCESS_KEY",
                  "AWS_ACCESS_KEY_ID", "GCS_ACCESS_TOKEN", "S3_CREDENTIALS_FILE"}  # fmt: skip
        self.assertEqual(names & denied, set(), "no pilot credential reaches the payload")
        self.assertIn("LANG", names)
        self.assertIn("PandaID", names)
        self.assertEqual((workdir / "mode.txt").read_text().strip(), "600")
        self.assertEqual(json.loads((workdir / "seen.txt").read_text()), secrets)
        self.assertFalse((workdir / ".pilot-secrets").exists(), "job secrets removed after the job")
        env_text = (workdir / "env.txt").read_text()
        self.assertNotIn("p4ss", env_text, "secrets are in a file, not in the environment")


class StepTests(SynchronousTestCase):
    def test_parse_steps(self) -> None:
        parsed = parse_job(
            {
                "PandaID": 1,
                "transformation": "t",
                "preprocess": {"command": "a", "args": ["x", "y"]},
                "postprocess": step("b", "z", ignore_failure="True"),
                "coprocess": "NULL",
            }
        ).steps
        self.assertEqual(parsed["preprocess"], Step("preprocess", "a", "x y"))
        self.assertTrue(parsed["postprocess"].ignore_failure)
        self.assertNotIn("coprocess", parsed)
        with self.assertRaises(PilotError) as raised:
            parse_job({"PandaID": 1, "transformation": "t", "preprocess": "{bad"})
        self.assertEqual(raised.exception.code, ErrorCode.CONVERSIONFAILURE)

    def test_url_commands_are_fetched_and_checked(self) -> None:
        workdir = Path(self.mktemp())
        workdir.mkdir()
        script = b"#!/bin/sh\necho hi\n"
        ad = f"ad:{zlib.adler32(script) & 0xFFFFFFFF:08x}"

        async def download(url: str) -> bytes:
            return script

        good = Step("preprocess", "https://example.org/tools/prep.sh", "-v", checksum=ad)
        result = self.successResultOf(Deferred.fromCoroutine(fetch_step(good, workdir, download, run_sync)))
        local, digest = result
        self.assertEqual(local.command, "./preprocess-prep.sh")
        self.assertTrue((workdir / "preprocess-prep.sh").stat().st_mode & stat.S_IXUSR)
        self.assertEqual(len(digest), 64)
        bad = Step("preprocess", "https://example.org/tools/prep.sh", checksum="ad:00000000")
        failure = self.failureResultOf(Deferred.fromCoroutine(fetch_step(bad, workdir, download, run_sync)))
        self.assertEqual(failure.value.code, ErrorCode.PREPROCESSFAILURE)


class CoprocessStartFailureTests(TestCase):
    timeout = 60

    async def test_payload_is_stopped_when_the_coprocess_cannot_start(self) -> None:
        """apptainer for the co-process, not installed: the job fails, no payload is left running."""
        base = Path(self.mktemp()).absolute()
        queue = {"timefloor": 10, "container_type": "apptainer:coprocess"}
        server = await start_dev_server(reactor, base / "server", queues={QUEUE: queue})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        pids = base / "payload.pid"
        (panda_id,) = await server.submit(
            [
                job(
                    f"-c 'echo $$ > {pids}; sleep 600'",
                    coprocess=step("/bin/true"),
                    container_name="docker://x",
                )
            ]
        )
        environ = {"PATH": "/usr/bin:/bin"}  # no apptainer, no singularity
        service = pilot_service(
            server, QUEUE, base / "pilot", getjob_requests=1, environ=environ,
            monitor=MonitorSettings(min_free_start=0, min_free_running=0), kill_grace=2.0,
        )  # fmt: skip
        await run_to_end(service)
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.APPTAINERNOTINSTALLED, view.get("pilotErrorDiag"))
        written = pids.read_text().strip() if pids.exists() else ""
        if written:  # the payload may have been stopped before it wrote its pid
            with self.assertRaises(ProcessLookupError):
                os.kill(int(written), 0)
        (payload,) = [r for r in service.summaries[0].processes if r.name == "payload"]
        self.assertTrue(payload.stopped_by_pilot, "the payload was stopped, not left running")
