"""The event service end to end: a real pilot, the dev server, the reference payload, moto S3.

An event-service job of 1,000 ranges runs with 4 payload workers (``tests/es_payload.py``)
against the dev server (both its event calls and its strictness are the real server's);
archives go to an S3 object store (moto) with the ``s3`` copytool.  The tests then read
the server's view of every range and every archive and the objects in the store:

* a normal run: every range reported exactly once, ``finished``, in exactly one archive
  whose object in S3 has the reported size and adler32 and holds that range's output;
* the payload crashing mid-job and the pilot SIGTERMed mid-job: no range is reported
  finished unless its output is in an archive stored with the right checksum, and no
  range is reported twice.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from pilot.config import EventServiceOptions
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.job.staging import StagingSetup
from pilot.server.api import ApiMode
from pilot.service import PilotService
from pilot.staging.credentials import Credentials as StagingCredentials
from pilot.staging.storage import StorageData
from pilot.staging.urls import rucio_path

from . import es_payload
from .events import log_event
from .harness import pilot_service, run_to_end
from .services import MotoServer

reactor: Any = _reactor
QUEUE = "ES_QUEUE"
PAYLOAD = Path(__file__).resolve().with_name("es_payload.py")
BUCKET = "pilot-es"
OBJSTORE_ID = 4321
INPUT = b"an EVNT file's bytes\n" * 100
EVNT = "EVNT.01234._000001.pool.root.1"


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class EventServiceSite(TestCase):
    """The site: input storage, an S3 object store for ES archives, the dev server."""

    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.site = self.base / "SITE_A"
        placed = self.site / rucio_path("mc.evnt", EVNT)
        placed.parent.mkdir(parents=True)
        placed.write_bytes(INPUT)
        self.moto = await MotoServer.start(self.base / "moto")
        self.addCleanup(self.moto.stop)
        await deferToThread(self.moto.boto3().create_bucket, Bucket=BUCKET)
        self.storage = StorageData.from_document(
            {
                "SITE_A": {
                    "arprotocols": {
                        "read_lan": [{"endpoint": "file://", "path": str(self.site)}],
                        "write_lan": [{"endpoint": "file://", "path": str(self.site)}],
                    }
                },
                "OS_ES": {
                    "id": OBJSTORE_ID,
                    "type": "OS_ES",
                    "arprotocols": {
                        "write_lan": [
                            {
                                "endpoint": f"s3://127.0.0.1:{self.moto.port}",
                                "path": f"/{BUCKET}",
                                "settings": {"secure": False},
                            }
                        ]
                    },
                },
            }
        )
        queuedata: dict[str, Any] = {
            "copytools": {"cp": {}, "s3": {}},
            "acopytools": {"pr": ["cp"], "pw": ["cp"], "pl": ["cp"], "es_events": ["s3"]},
            "astorages": {"read_lan": ["SITE_A"], "pw": ["SITE_A"], "pl": ["SITE_A"], "es_events": ["OS_ES"]},
            "corecount": 4,
        }
        self.server: DevServer = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: queuedata}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    def job(self, ranges: int, payload_args: str = "") -> dict[str, Any]:
        command = (
            f"exec {sys.executable} {PAYLOAD} --workers 4 --channel PILOT_EVENTRANGECHANNEL {payload_args}"
        )
        return {
            "computingSite": QUEUE,
            "transformation": "/bin/bash",
            "jobPars": f"-c '{command}'",
            "eventService": True,
            "jobsetID": 77,
            "jediTaskID": 4242,
            "coreCount": 4,
            "inFiles": EVNT,
            "scopeIn": "mc.evnt",
            "ddmEndPointIn": "SITE_A",
            "fsize": str(len(INPUT)),
            "checksum": f"ad:{adler(INPUT)}",
            "GUID": "0a0b0c0d-0000-1111-2222-333344445555",
            "logFile": "es.log.tgz",
            "scopeLog": "mc.log",
            "esRanges": {"count": ranges},
        }

    def pilot(self, batch: int = 100, **settings: Any) -> PilotService:
        keys = {"AWS_ACCESS_KEY_ID": self.moto.access_key, "AWS_SECRET_ACCESS_KEY": self.moto.secret_key}
        pilot_dir = self.base / "pilot"
        return pilot_service(
            self.server,
            QUEUE,
            pilot_dir,
            staging=StagingSetup(
                storage=self.storage,
                records_dir=pilot_dir,
                http=HTTPClient(Agent(reactor)),
                credentials=StagingCredentials(keys),
            ),
            getjob_requests=1,
            event_service=EventServiceOptions(batch_ranges=batch),
            **settings,
        )

    async def stored_objects(self) -> dict[str, bytes]:
        """Every object in the ES bucket, by key."""

        def read() -> dict[str, bytes]:
            client = self.moto.boto3()
            found: dict[str, bytes] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                for item in page.get("Contents", []):
                    found[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            return found

        return await deferToThread(read)

    async def check_no_finished_range_without_its_output(self, panda_id: int) -> Any:
        """The server's view, checked against the store; returns it."""
        view: Any = await self.server.events(panda_id)
        objects = await self.stored_objects()
        by_range = {r["eventRangeID"]: r for r in view["ranges"] if r["eventRangeID"]}
        for item in view["ranges"]:
            reported = item["reported"]
            self.assertLessEqual(sum(reported.values()), 1, f"{item['eventRangeID']} reported {reported}")
        archived: dict[str, str] = {}
        for archive in view["archives"]:
            key = rucio_path("transient", archive["lfn"]).lstrip("/")
            self.assertIn(key, objects, f"archive {archive['lfn']} is not in the object store")
            data = objects[key]
            self.assertEqual(len(data), archive["fsize"])
            self.assertEqual(adler(data), archive["adler32"])
            self.assertEqual(int(archive["objstoreID"]), OBJSTORE_ID)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
            for range_id in archive["eventRangeIDs"]:
                item = by_range[range_id]
                name = es_payload.output_name(range_id)
                self.assertIn(name, members, f"{range_id}: its output is not in {archive['lfn']}")
                expected = es_payload.output_content(
                    es_payload.EventRange(
                        range_id,
                        item["startEvent"],
                        item["lastEvent"],
                        item["LFN"],
                        item["GUID"],
                        item["scope"],
                    ),
                    256,
                )
                self.assertEqual(members[name], expected, f"{range_id}: wrong output content")
                archived[range_id] = archive["lfn"]
        for item in view["ranges"]:
            if item["status"] == "finished":
                self.assertIn(item["eventRangeID"], archived, "finished without an archive")
        return view

    def assert_every_range_given_to_the_job_reported_once(self, view: dict[str, Any]) -> None:
        for item in view["ranges"]:
            if item["PandaID"] is not None:
                self.assertIn(item["status"], ("finished", "failed"), item)
                self.assertEqual(sum(item["reported"].values()), 1, item)


class EventServiceEndToEndTests(EventServiceSite):
    async def test_thousand_ranges_four_workers_each_reported_once(self) -> None:
        (panda_id,) = await self.server.submit(self.job(1000))
        service = self.pilot()
        await run_to_end(service)
        summary = service.summaries[0]
        job: Any = await self.server.job(panda_id)
        self.assertEqual(job["jobStatus"], "finished", summary.pilot_error_diag)
        view = await self.check_no_finished_range_without_its_output(panda_id)
        self.assertEqual(view["counts"], {"finished": 1000})
        for item in view["ranges"]:
            self.assertEqual(item["reported"], {"finished": 1}, item["eventRangeID"])
        self.assertEqual(sum(len(a["eventRangeIDs"]) for a in view["archives"]), 1000)
        es = summary.event_service
        self.assertEqual(es["ranges_finished"], 1000)
        self.assertEqual(es["ranges_failed"], 0)
        self.assertEqual(es["workers"], 4)
        self.assertEqual(es["batches"], len(view["archives"]))
        self.assertEqual(es["bytes_stored"], sum(a["fsize"] for a in view["archives"]))
        final = job["updates"][-1]
        self.assertEqual(final["params"]["n_events"], 1000, "nEvents counted by the pilot itself")

    async def test_payload_crash_mid_job(self) -> None:
        # each worker SIGKILLs itself on taking its 60th range: 4 x 59 ranges finished
        (panda_id,) = await self.server.submit(self.job(1000, "--crash-after 60"))
        service = self.pilot(batch=20)
        await run_to_end(service)
        job: Any = await self.server.job(panda_id)
        self.assertEqual(job["jobStatus"], "failed")
        view = await self.check_no_finished_range_without_its_output(panda_id)
        self.assertEqual(view["counts"].get("finished"), 4 * 59)
        self.assert_every_range_given_to_the_job_reported_once(view)
        es = service.summaries[0].event_service
        self.assertEqual(es["ranges_finished"], 4 * 59)
        self.assertGreaterEqual(es["ranges_failed"], 4, "the ranges in the crashed workers' hands")

    async def test_pilot_sigterm_mid_job(self) -> None:
        (panda_id,) = await self.server.submit(self.job(1000, "--event-seconds 0.005"))
        service = self.pilot(batch=25)
        stored = log_event(lambda e: e.get("event") == "es.archive_stored", timeout=60)
        service.startService()
        await stored
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        job: Any = await self.server.job(panda_id)
        self.assertEqual(job["jobStatus"], "failed")
        self.assertEqual(job["pilotErrorCode"], ErrorCode.SIGTERM)
        view = await self.check_no_finished_range_without_its_output(panda_id)
        finished = view["counts"].get("finished", 0)
        self.assertGreater(finished, 0, "the archives stored before the signal were reported")
        self.assertLess(finished, 1000)
        self.assert_every_range_given_to_the_job_reported_once(view)

    async def test_end_of_the_pilots_lifetime_mid_job(self) -> None:
        # the job is stopped lifetime_margin before the pilot's lifetime ends: what finished
        # is stored and reported, the rest failed, nothing twice, nothing without its output
        from pilot.service import jobloop

        self.patch(jobloop, "MIN_REMAINING_FOR_JOB", 0.5)  # a job request with 1.5 s left
        (panda_id,) = await self.server.submit(self.job(1000, "--event-seconds 0.01"))
        service = self.pilot(batch=25, lifetime=4.0, lifetime_margin=2.5)
        await run_to_end(service)
        job: Any = await self.server.job(panda_id)
        self.assertEqual(job["jobStatus"], "failed")
        view = await self.check_no_finished_range_without_its_output(panda_id)
        self.assert_every_range_given_to_the_job_reported_once(view)
        finished = view["counts"].get("finished", 0)
        self.assertTrue(0 < finished < 1000, view["counts"])

    async def softkill_mid_job(self, **settings: Any) -> None:
        """A softkill mid-job: the workers get "No more events", finish what they hold, and
        the job ends finished with what was done."""
        (panda_id,) = await self.server.submit(self.job(1000, "--event-seconds 0.01"))
        service = self.pilot(batch=25, **settings)
        stored = log_event(lambda e: e.get("event") == "es.archive_stored", timeout=60)
        service.startService()
        await stored
        await self.server.set_command(panda_id, "softkill")
        await service.when_finished()
        await service.stopService()
        summary = service.summaries[0]
        job: Any = await self.server.job(panda_id)
        self.assertEqual(job["jobStatus"], "finished", summary.pilot_error_diag)
        self.assertIn("softkill", summary.commands)
        view = await self.check_no_finished_range_without_its_output(panda_id)
        self.assert_every_range_given_to_the_job_reported_once(view)
        finished = view["counts"].get("finished", 0)
        self.assertTrue(0 < finished < 1000, view["counts"])
        self.assertEqual(summary.event_service["ranges_finished"], finished)

    async def test_softkill_in_a_range_report_reply(self) -> None:
        # the legacy updateEventRanges answers with the job's command
        await self.softkill_mid_job(api=ApiMode.LEGACY)

    async def test_softkill_in_a_heartbeat_reply(self) -> None:
        # v1's update_event_ranges answers 500 (1.0.4), so commands come with heartbeats
        await self.softkill_mid_job(api=ApiMode.V1, heartbeat_period=0.3)


class HyperParameterLoopTests(EventServiceSite):
    """HPO jobs: pre-process → payload → post-process per point, points as event ranges."""

    def hpo_job(self, points: int, preprocess: str) -> dict[str, Any]:
        job = self.job(points)
        job.update(
            isHPO=True,
            jobPars='-c \'cat "$PILOT_HPO_POINT" > "$PILOT_HPO_RESULT"; echo pass >> payload.passes\'',
            preprocess=json.dumps({"command": "/bin/sh", "args": f"-c '{preprocess}'"}),
            postprocess=json.dumps({"command": "/bin/sh", "args": "-c 'echo post >> post.passes'"}),
        )
        return job

    async def run_hpo(self, points: int, preprocess: str) -> tuple[Any, Any, PilotService]:
        (panda_id,) = await self.server.submit(self.hpo_job(points, preprocess))
        service = self.pilot()
        await run_to_end(service)
        job: Any = await self.server.job(panda_id)
        view = await self.check_archived_points(panda_id)
        return job, view, service

    async def check_archived_points(self, panda_id: int) -> Any:
        """Each finished point's archive holds its result: here the point itself, as the payload copied it."""
        view: Any = await self.server.events(panda_id)
        objects = await self.stored_objects()
        by_range = {r["eventRangeID"]: r for r in view["ranges"] if r["eventRangeID"]}
        for archive in view["archives"]:
            data = objects[rucio_path("transient", archive["lfn"]).lstrip("/")]
            self.assertEqual(adler(data), archive["adler32"])
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                (member,) = tar.getmembers()
                result = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
            (range_id,) = archive["eventRangeIDs"]
            self.assertEqual(result["eventRangeID"], range_id)
            self.assertEqual(result["startEvent"], by_range[range_id]["startEvent"])
        return view

    async def test_the_preprocess_ends_the_loop(self) -> None:
        # the fourth pre-process exits 160: three points evaluated, the other two never fetched
        count = "n=$(cat pre.passes 2>/dev/null || echo 0); n=$((n+1)); echo $n > pre.passes; [ $n -le 3 ] || exit 160"
        job, view, service = await self.run_hpo(5, count)
        summary = service.summaries[0]
        self.assertEqual(job["jobStatus"], "finished", summary.pilot_error_diag)
        self.assertEqual(view["counts"], {"finished": 3, "ready": 2})
        self.assertEqual(len(view["archives"]), 3)
        self.assertEqual(summary.event_service["hpo_points"], 3)
        self.assertEqual([p.name for p in summary.processes].count("payload"), 3)
        self.assertEqual([p.name for p in summary.processes].count("postprocess"), 3)

    async def test_the_loop_ends_when_the_server_has_no_more_points(self) -> None:
        job, view, service = await self.run_hpo(2, "true")
        self.assertEqual(job["jobStatus"], "finished", service.summaries[0].pilot_error_diag)
        self.assertEqual(view["counts"], {"finished": 2})
        for item in view["ranges"]:
            self.assertEqual(item["reported"], {"finished": 1})
