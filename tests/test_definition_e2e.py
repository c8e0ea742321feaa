"""Job definitions the pilot cannot run, end to end: a real pilot, the dev server, real copies.

Each broken definition must fail as a definition error, with its code, before any
process starts (the payload of every job here would leave a marker file if it ran),
and the next job must still run.  The report must name the file that is really on
storage, even when the storage path holds characters that are special in URLs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.job.staging import StagingSetup
from pilot.staging.urls import rucio_path

from .harness import file_storage, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "DEFINITION_QUEUE"


class DefinitionEndToEndTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        #: a storage path with '#' and '?': a file:// URL must keep them as part of the path
        self.site = self.base / "rse#1?x"
        self.site.mkdir(parents=True)
        self.markers = self.base / "markers"
        self.markers.mkdir()
        queuedata: dict[str, Any] = {
            "timefloor": 10,  # several jobs per pilot
            "copytools": {"cp": {}},
            "acopytools": {"pw": ["cp"], "pl": ["cp"]},
            "astorages": {"pw": ["SITE"], "pl": ["SITE"]},
        }
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: queuedata}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    def job(self, name: str, **extra: Any) -> dict[str, Any]:
        """A job whose payload writes ``out.root`` and leaves marker ``name`` if it runs."""
        job: dict[str, Any] = {
            "computingSite": QUEUE,
            "transformation": "/bin/bash",
            "jobPars": f"-c 'echo {name} > out.root; touch {self.markers / name}'",
            "outFiles": "out.root,job.log.tgz",
            "scopeOut": "mc.out",
            "logFile": "job.log.tgz",
            "scopeLog": "mc.log",
        }
        job.update(extra)
        return job

    async def run_pilot(self, jobs: int) -> None:
        pilot_dir = self.base / "pilot"
        service = pilot_service(
            self.server,
            QUEUE,
            pilot_dir,
            staging=StagingSetup(storage=file_storage({"SITE": self.site}), records_dir=pilot_dir),
            getjob_requests=jobs,
        )
        await run_to_end(service)

    async def test_broken_definitions_fail_before_anything_runs(self) -> None:
        jobs = {
            "url-special-lfn": (
                self.job("a", outFiles="data#1.root,job.log.tgz"),
                ErrorCode.BADOUTPUTFILENAME,
            ),
            "nul": (
                self.job("b", jobPars="-c 'touch {}' \x00".format(self.markers / "b")),
                ErrorCode.CONVERSIONFAILURE,
            ),
            "surrogate": (self.job("c", transformation="/bin/bash\udc80"), ErrorCode.CONVERSIONFAILURE),
            "nested-step": (self.job("d", preprocess={"command": {"a": 1}}), ErrorCode.CONVERSIONFAILURE),
            "secrets-list": (self.job("e", secrets=["s"]), ErrorCode.CONVERSIONFAILURE),
            "bad-scope": (self.job("f", scopeOut="bad/scope"), ErrorCode.CONVERSIONFAILURE),
            "host-root": (
                self.job("g", jobPars=f"--containerImage /usr/.. -c 'touch {self.markers / 'g'}'"),
                ErrorCode.IMAGENOTFOUND,
            ),  # fmt: skip
            "huge": (
                self.job("h", jobPars=f"-c 'touch {self.markers / 'h'}' " + "x" * 1024 * 1024),
                ErrorCode.CONVERSIONFAILURE,
            ),  # fmt: skip
        }
        good = self.job("good")
        ids = await self.server.submit([job for job, _code in jobs.values()] + [good])
        await self.run_pilot(len(ids))
        for (name, (_job, code)), panda_id in zip(jobs.items(), ids, strict=False):
            view = await self.server.job(panda_id)
            self.assertEqual(
                (view["jobStatus"], view["pilotErrorCode"]),
                ("failed", code),
                (name, view.get("pilotErrorDiag")),
            )
        self.assertEqual(sorted(p.name for p in self.markers.iterdir()), ["good"], "only the good job ran")
        view = await self.server.job(ids[-1])
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))

    async def test_report_names_the_file_on_storage(self) -> None:
        (panda_id,) = await self.server.submit(self.job("out"))
        await self.run_pilot(1)
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        report = json.loads(str(view["jobOutputReport"]))
        surl = report["out.root"]["surl"]
        stored = self.site / rucio_path("mc.out", "out.root")
        self.assertEqual(surl, f"file://{stored}")
        self.assertEqual(Path(surl.removeprefix("file://")).read_text(), "out\n", "the file the report names")
        self.assertEqual(
            sorted(p.name for p in self.base.iterdir()), ["markers", "pilot", "rse#1?x", "server"]
        )
