"""Data staging end to end: a job with 3 inputs (one missing at the first endpoint) and
2 outputs through a real pilot against the dev server, with real copies.

Storage here is two directories laid out as Rucio deterministic RSEs and reached
with ``cp`` (the copytool sites use for shared file systems); the same flow over
XRootD, gfal2, S3, GCS and Rucio servers is in ``test_copytools.py``.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode
from pilot.job.staging import StagingSetup
from pilot.service import PilotService
from pilot.staging.urls import rucio_path

from .harness import file_storage, mount_small_tmpfs, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "STAGING_QUEUE"
FULL_QUEUE = "FULL_DISK_QUEUE"


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class StagingEndToEndTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.storage_dirs = {name: self.base / name for name in ("SITE_A", "SITE_B", "SITE_FULL")}
        for directory in self.storage_dirs.values():
            directory.mkdir(parents=True)
        self.storage = file_storage(self.storage_dirs)
        astorages = {"read_lan": ["SITE_A", "SITE_B"], "pw": ["SITE_A"], "pl": ["SITE_B"]}
        queuedata: dict[str, Any] = {
            "timefloor": 10,
            "copytools": {"cp": {}},
            "acopytools": {"pr": ["cp"], "pw": ["cp"], "pl": ["cp"]},
            "astorages": astorages,
        }
        full_queue = {**queuedata, "astorages": {**astorages, "pw": ["SITE_FULL"]}}
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: queuedata, FULL_QUEUE: full_queue}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    async def run_pilot(self, queue: str, pilot_dir: Path) -> PilotService:
        """A pilot for ``queue`` staging against the test storage, run until it ends."""
        service = pilot_service(
            self.server,
            queue,
            pilot_dir,
            staging=StagingSetup(storage=self.storage, records_dir=pilot_dir),
            getjob_requests=1,
        )
        await run_to_end(service)
        return service

    def place(self, endpoint: str, scope: str, lfn: str, data: bytes) -> None:
        path = self.storage_dirs[endpoint] / rucio_path(scope, lfn)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def job(self, **extra: Any) -> dict[str, Any]:
        inputs = {"in1.root": b"first input\n", "in2.root": b"second input\n", "in3.root": b"third input\n"}
        job: dict[str, Any] = {
            "computingSite": QUEUE,
            "transformation": "/bin/bash",
            "jobPars": '-c \'cat in1.root in2.root in3.root > out1.root && wc -c in1.root in2.root in3.root > out2.txt && test "$(head -1 $PILOT_FILE_CATALOG | cut -c1-5)" = "<?xml"\'',
            "inFiles": ",".join(inputs),
            "scopeIn": "mc.in,mc.in,mc.in",
            "ddmEndPointIn": "SITE_A,SITE_A,SITE_A",
            "fsize": ",".join(str(len(d)) for d in inputs.values()),
            "checksum": ",".join(f"ad:{adler(d)}" for d in inputs.values()),
            "GUID": "11111111-1111-1111-1111-111111111111,22222222-2222-2222-2222-222222222222,33333333-3333-3333-3333-333333333333",
            "outFiles": "out1.root,out2.txt,job.log.tgz",
            "scopeOut": "mc.out,mc.out",
            "logFile": "job.log.tgz",
            "scopeLog": "mc.log",
        }
        job.update(extra)
        return job

    async def test_three_inputs_one_missing_at_the_first_endpoint(self) -> None:
        self.place("SITE_A", "mc.in", "in1.root", b"first input\n")
        self.place("SITE_B", "mc.in", "in2.root", b"second input\n")  # only at the second endpoint
        self.place("SITE_A", "mc.in", "in3.root", b"third input\n")
        (panda_id,) = await self.server.submit(self.job())
        pilot_dir = self.base / "pilot"
        service = await self.run_pilot(QUEUE, pilot_dir)
        self.assertEqual(service.exit_code, ExitCode.OK)
        view = await self.server.job(panda_id)
        summary = service.summaries[0]
        self.assertEqual(view["jobStatus"], "finished", (summary.pilot_error_diag, view.get("adderDiag")))
        transfers = {(t["direction"], t["lfn"]): t for t in summary.transfers}
        self.assertEqual(transfers[("in", "in2.root")]["endpoint"], "SITE_B")
        self.assertEqual(transfers[("in", "in2.root")]["tries"], 2, "tried SITE_A first, found at SITE_B")
        self.assertEqual(transfers[("in", "in1.root")]["endpoint"], "SITE_A")
        report = json.loads(str(view["jobOutputReport"]))
        self.assertEqual(set(report), {"out1.root", "out2.txt", "job.log.tgz"})
        out1 = b"first input\nsecond input\nthird input\n"
        self.assertEqual(report["out1.root"]["fsize"], len(out1))
        self.assertEqual(report["out1.root"]["adler32"], adler(out1))
        self.assertEqual(report["out1.root"]["endpoint"], "SITE_A")
        stored = self.storage_dirs["SITE_A"] / rucio_path("mc.out", "out1.root")
        self.assertEqual(stored.read_bytes(), out1, "the output is at its deterministic path")
        self.assertEqual(report["out1.root"]["surl"], f"file:///{stored}".replace("////", "///"))
        definition = view["job"]
        assert isinstance(definition, dict)
        self.assertEqual(report["job.log.tgz"]["guid"], definition["logGUID"])
        self.assertEqual(report["job.log.tgz"]["endpoint"], "SITE_B", "logs go to the pl endpoint")
        log_copy = self.storage_dirs["SITE_B"] / rucio_path("mc.log", "job.log.tgz")
        self.assertEqual(adler(log_copy.read_bytes()), report["job.log.tgz"]["adler32"])
        with tarfile.open(log_copy) as tarball:
            names = {Path(n).name for n in tarball.getnames()}
            root = {n.split("/")[0] for n in tarball.getnames()}
        self.assertEqual(root, {f"tarball_PandaJob_{panda_id}_{QUEUE}"})
        self.assertTrue({"payload.stdout", "out1.root", "PoolFileCatalog.xml"} <= names, names)
        self.assertFalse({"in1.root", "in2.root", "in3.root"} & names, "staged-in inputs are not in the log")
        records = (pilot_dir / "transfer-records" / f"PanDA-{panda_id}-0.jsonl").read_text().splitlines()
        self.assertEqual(len(records), 6, "3 inputs, 2 outputs, 1 log recorded durably")
        updates = view["updates"]
        assert isinstance(updates, list)
        final = next(u["params"] for u in updates if u["state"] == "finished")
        self.assertIn("nInputs=3", final.get("job_metrics") or final.get("jobMetrics"))

    async def test_failures_give_the_right_code_and_the_pilot_goes_on(self) -> None:
        """Missing everywhere, wrong checksum: each job fails with its code; the next job still runs."""
        self.place("SITE_A", "mc.in", "in1.root", b"first input\n")
        self.place("SITE_A", "mc.in", "in2.root", b"SECOND input\n")  # right size, wrong bytes
        self.place("SITE_B", "mc.in", "in2.root", b"second INPUT\n")
        self.place("SITE_A", "mc.in", "in3.root", b"third input\n")
        missing = self.job(inFiles="in1.root,nowhere.root,in3.root")
        corrupt = self.job()
        good = self.job(
            inFiles="in1.root",
            scopeIn="mc.in",
            ddmEndPointIn="SITE_A",
            fsize="12",
            checksum="ad:" + adler(b"first input\n"),
            GUID="g",
            jobPars="-c 'cp in1.root out1.root; echo x > out2.txt'",
        )
        ids = await self.server.submit([missing, corrupt, good])
        pilot_dir = self.base / "pilot2"
        await self.run_pilot(QUEUE, pilot_dir)
        views = [await self.server.job(i) for i in ids]
        self.assertEqual([v["jobStatus"] for v in views], ["failed", "failed", "finished"])
        self.assertEqual(views[0]["pilotErrorCode"], ErrorCode.REPLICANOTFOUND)
        self.assertEqual(views[1]["pilotErrorCode"], ErrorCode.GETADMISMATCH)
        for directory in (pilot_dir,):
            leftovers = [p for p in directory.rglob("in2.root")]
            self.assertEqual(leftovers, [], "bad copies are removed")

    async def test_full_destination_fails_that_job_and_the_next_one_runs(self) -> None:
        """Stage-out to a full file system: NOREMOTESPACE, no partial file, next job finishes."""
        full = self.storage_dirs["SITE_FULL"]
        await mount_small_tmpfs(self, full, "64k")
        self.place("SITE_A", "mc.in", "in1.root", b"first input\n")
        common = {
            "computingSite": FULL_QUEUE,
            "inFiles": "in1.root",
            "scopeIn": "mc.in",
            "ddmEndPointIn": "SITE_A",
            "fsize": "12",
            "checksum": "ad:" + adler(b"first input\n"),
            "GUID": "g",
        }
        too_big = self.job(
            **common, jobPars="-c 'head -c 300000 /dev/urandom > out1.root; echo x > out2.txt'"
        )
        small = self.job(**common, jobPars="-c 'cp in1.root out1.root; echo x > out2.txt'")
        ids = await self.server.submit([too_big, small])
        pilot_dir = self.base / "pilot-full"
        await self.run_pilot(FULL_QUEUE, pilot_dir)
        views = [await self.server.job(i) for i in ids]
        self.assertEqual([v["jobStatus"] for v in views], ["failed", "finished"])
        self.assertEqual(views[0]["pilotErrorCode"], ErrorCode.NOREMOTESPACE, views[0].get("pilotErrorDiag"))
        stored = full / rucio_path("mc.out", "out1.root")
        self.assertEqual(stored.read_bytes(), b"first input\n", "only the second job's output is there")
        leftovers = [p.name for p in full.rglob("*") if p.is_file() and p != stored]
        self.assertEqual(sorted(leftovers), ["out2.txt"], "the partial copy was removed")
