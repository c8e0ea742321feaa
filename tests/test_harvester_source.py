"""``HarvesterSource`` and ``ArcSource`` on ``task.Clock``: the exchange rules, one by one.

The files are real (a temporary access point); Harvester's side is played by the test,
step by step, so that each rule of ``pilot.source.harvester`` is seen at the moment it
matters: a half-written job file, the request file, the wait for Harvester to take a
final report before the stale attributes go, one report file at a time, ranges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from pilot.server.events import ArchiveChunk, EventRangeRequest, EventRangeUpdate, RangeStatus
from pilot.server.messages import JobRequest, JobUpdate, StatusCode
from pilot.source import filebox
from pilot.source.arc import ArcSource, parse_job_file
from pilot.source.harvester import HarvesterSource, MessengerFiles

from .harvester_side import HarvesterSide

REQUEST = JobRequest(site_name="Q", computing_element="Q", prod_source_label="managed", node="n")


def inline(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class HarvesterSourceTests(TestCase):
    def setUp(self) -> None:
        self.access = Path(self.mktemp()).absolute()
        self.access.mkdir(parents=True)
        self.clock = Clock()
        self.files = MessengerFiles(self.access)
        self.source = HarvesterSource(
            self.files, clock=self.clock, in_thread=inline, interval=10.0, job_wait=60.0, ack_wait=60.0
        )

    def file(self, name: str) -> Path:
        return self.access / name

    def read(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def feed(self, panda_id: int, **job: Any) -> None:
        self.file("HPCJobs.json").write_text(json.dumps({str(panda_id): {"PandaID": panda_id, **job}}))

    def test_a_preplaced_job_is_taken_at_once_and_renamed(self) -> None:
        self.feed(7, logFile="log.tgz")
        result = self.successResultOf(self.source.acquire_jobs(REQUEST))
        self.assertEqual((result.status, result.jobs[0]["PandaID"]), (StatusCode.SUCCESS, 7))
        self.assertFalse(self.file("HPCJobs.json").exists())
        self.assertTrue(self.file("HPCJobs.json.read").exists())
        self.assertFalse(self.file("worker_requestjob.json").exists(), "no request for a job already there")

    def test_a_half_written_job_file_is_read_again_at_the_next_look(self) -> None:
        self.file("HPCJobs.json").write_text('{"8": {"PandaID": 8, "jobPars": "trunc')
        asked = self.source.acquire_jobs(REQUEST)
        self.assertNoResult(asked)
        self.assertEqual(self.read("worker_requestjob.json"), {"nJobs": 1})
        self.feed(8)  # Harvester finished writing
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(asked).jobs[0]["PandaID"], 8)

    def test_no_job_within_the_wait_is_no_job(self) -> None:
        asked = self.source.acquire_jobs(REQUEST)
        self.clock.pump([10.0] * 6)
        result = self.successResultOf(asked)
        self.assertEqual(result.status, StatusCode.NO_JOBS)
        self.assertIn("60 s", result.message)

    def test_the_same_job_is_never_taken_twice(self) -> None:
        self.feed(9)
        self.successResultOf(self.source.acquire_jobs(REQUEST))
        self.feed(9)  # Harvester rewrote the same job
        asked = self.source.acquire_jobs(REQUEST)
        self.clock.pump([10.0] * 6)
        self.assertEqual(self.successResultOf(asked).status, StatusCode.NO_JOBS)

    def test_updates_and_the_final_report(self) -> None:
        self.feed(11, logFile="job.log.tgz")
        self.successResultOf(self.source.acquire_jobs(REQUEST))
        self.successResultOf(
            self.source.update_job(JobUpdate(job_id=11, state="running"), final=False, timeout=None)
        )
        self.assertEqual(self.read("worker_attributes.json")["jobStatus"], "running")
        report = {
            "out.dat": {"guid": "g1", "fsize": 5, "adler32": "05c801f0", "surl": "file:///outbox/out.dat"},
            "job.log.tgz": {
                "guid": "g2",
                "fsize": 9,
                "adler32": "0aaa0111",
                "surl": "file:///outbox/job.log.tgz",
            },
        }
        final = JobUpdate(
            job_id=11, state="finished", job_output_report=json.dumps(report), meta_data='{"exitCode": 0}'
        )
        self.successResultOf(self.source.update_job(final, final=True, timeout=None))
        attributes = self.read("worker_attributes.json")
        self.assertEqual(attributes["jobStatus"], "finished")
        self.assertNotIn("xml", attributes, "the output report goes to the dump, not the attributes")
        self.assertEqual(self.read("jobReport.json"), {"exitCode": 0})
        declared = {e["path"]: e for e in self.read("event_status.dump.json")["11"]}
        self.assertEqual(declared["/outbox/job.log.tgz"]["type"], "log")
        self.assertEqual(
            declared["/outbox/out.dat"],
            {"type": "output", "path": "/outbox/out.dat", "guid": "g1", "fsize": 5, "chksum": "05c801f0"},
        )

    def test_the_next_job_waits_until_harvester_took_the_final_report(self) -> None:
        self.feed(12)
        self.successResultOf(self.source.acquire_jobs(REQUEST))
        final = JobUpdate(job_id=12, state="failed", pilot_error_code=1305)
        self.successResultOf(self.source.update_job(final, final=True, timeout=None))
        asked = self.source.acquire_jobs(REQUEST)
        self.clock.advance(10.0)
        self.assertTrue(self.file("worker_attributes.json").exists(), "Harvester has not read it yet")
        self.assertFalse(self.file("worker_requestjob.json").exists(), "no request before Harvester has it")
        os.rename(self.file("event_status.dump.json"), self.file("event_status.dump.json.read.1"))
        self.clock.advance(10.0)  # the dump taken; one interval later the empty probe dump
        self.clock.advance(10.0)
        self.assertEqual(self.read("event_status.dump.json"), {"12": []})
        self.assertTrue(self.file("worker_attributes.json").exists(), "Harvester may not have read it yet")
        os.unlink(self.file("event_status.dump.json"))  # Harvester takes the probe: it read the attributes
        self.clock.advance(10.0)
        self.assertFalse(self.file("worker_attributes.json").exists(), "no stale state for the next job")
        self.assertTrue(self.file("worker_requestjob.json").exists())
        self.feed(13)
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(asked).jobs[0]["PandaID"], 13)

    def test_one_report_file_at_a_time(self) -> None:
        self.file("event_status.dump.json").write_text("{}")  # not taken by Harvester yet
        update = EventRangeUpdate(7, statuses=(RangeStatus("r1", "failed", error_code=1220),))
        reported = self.source.update_event_ranges(update)
        self.clock.advance(10.0)
        self.assertNoResult(reported)
        self.assertFalse(self.file("worker_updateevents.json").exists())
        os.rename(self.file("event_status.dump.json"), self.file("event_status.dump.json.read"))
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(reported).accepted, {"r1": True})
        (item,) = self.read("worker_updateevents.json")["7"]
        self.assertEqual((item["eventRangeID"], item["eventStatus"]), ("r1", "failed"))

    def test_archives_are_declared_with_their_ranges(self) -> None:
        chunk = ArchiveChunk(
            lfn="a.tar",
            fsize=100,
            adler32="0badcafe",
            num_events=2,
            ranges=(RangeStatus("r1", "finished"), RangeStatus("r2", "finished")),
            objstore_id=1,
            url="file:///outbox/a.tar",
        )
        result = self.successResultOf(self.source.update_event_ranges(EventRangeUpdate(7, chunks=(chunk,))))
        self.assertEqual(result.accepted, {"r1": True, "r2": True})
        entries = self.read("event_status.dump.json")["7"]
        self.assertEqual([e["eventRangeID"] for e in entries], ["r1", "r2"])
        self.assertEqual({e["path"] for e in entries}, {"/outbox/a.tar"})
        self.assertEqual({e["type"] for e in entries}, {"zip_output"})
        self.assertEqual(len({e["guid"] for e in entries}), 1, "one file, one GUID")

    def test_ranges_are_requested_and_the_answer_taken_when_complete(self) -> None:
        asked = self.source.acquire_event_ranges(EventRangeRequest(7, jobset_id=3, task_id=5, n_ranges=4))
        request = self.read("worker_requestevents.json")
        self.assertEqual(request, {"7": {"nRanges": 4, "pandaID": 7, "taskID": 5, "jobsetID": 3}})
        self.file("JobsEventRanges.json").write_text('{"7": [{"eventRangeID": "r1"')  # being written
        self.clock.advance(10.0)
        self.assertNoResult(asked)
        self.file("JobsEventRanges.json").write_text('{"7": [{"eventRangeID": "r1", "startEvent": 1}]}')
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(asked), [{"eventRangeID": "r1", "startEvent": 1}])
        self.assertTrue(self.file("JobsEventRanges.json.read").exists())

    def test_a_job_fed_as_the_pilot_ends_is_reported_failed_not_finished(self) -> None:
        self.file("worker_requestjob.json").write_text('{"nJobs": 1}')
        self.feed(31)  # Harvester read the request before the pilot withdrew it
        self.successResultOf(self.source.kill_worker())
        self.assertFalse(self.file("worker_requestjob.json").exists())
        attributes = self.read("worker_attributes.json")
        self.assertEqual((attributes["jobId"], attributes["jobStatus"]), (31, "failed"))
        self.assertEqual(attributes["pilotErrorCode"], 1213)
        self.assertTrue(self.file("kill_worker.json").exists())

    def test_holding_is_failed_for_harvester_and_the_report_not_in_the_attributes(self) -> None:
        update = JobUpdate(job_id=5, state="holding", meta_data='{"a": 1}')
        self.successResultOf(self.source.update_job(update, final=True, timeout=None))
        attributes = self.read("worker_attributes.json")
        self.assertEqual(attributes["jobStatus"], "failed")
        self.assertNotIn("metaData", attributes)
        self.assertEqual(self.read("jobReport.json"), {"a": 1})

    def test_heartbeat_and_kill_files(self) -> None:
        self.successResultOf(self.source.touch_heartbeat())
        self.assertTrue(self.file("worker_heartbeat.json").exists())
        self.successResultOf(self.source.kill_worker())
        self.assertTrue(self.file("kill_worker.json").exists())

    def test_a_pilot_killed_between_write_and_rename_leaves_a_consistent_view(self) -> None:
        # a real process writes the temporary file and is SIGKILLed before its rename
        self.file("worker_attributes.json").write_text('{"jobStatus": "running"}')
        script = (
            "import os, signal, sys, pathlib\n"
            "from pilot.util import files\n"
            "def stop(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "os.replace = stop\n"
            "files.os.replace = stop\n"
            f"from pilot.source import filebox\n"
            f"filebox.write_json(pathlib.Path({str(self.file('worker_attributes.json'))!r}), "
            "{'jobStatus': 'finished'})\n"
        )
        done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        self.assertEqual(self.read("worker_attributes.json"), {"jobStatus": "running"}, "the old file, whole")
        leftovers = [p.name for p in self.access.iterdir() if p.name.endswith(".tmp")]
        self.assertEqual(len(leftovers), 1, leftovers)
        # Harvester's view: the job's attributes as they were, the temporary file unseen
        side = HarvesterSide(self.access, clock=Clock(), jobs=[{"PandaID": 51}], preplace=True)
        side.preplace()
        self.successResultOf(Deferred.fromCoroutine(side.cycle()))
        self.assertEqual(side.job_attributes[51]["jobStatus"], "running")
        self.assertEqual(side.problems, [])
        for name in ("HPCJobs.json", "PoolFileCatalog_H.xml", "worker_pandaids.json"):
            (self.access / name).unlink(missing_ok=True)
        self.assertEqual(self.successResultOf(self.source.clean_leftovers()), 1)
        self.assertEqual(sorted(p.name for p in self.access.iterdir()), ["worker_attributes.json"])


class FileboxTests(TestCase):
    def test_tolerant_reads(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        path = base / "x.json"
        self.assertIsNone(filebox.read_json(path, dict))
        path.write_text("[1, 2]")
        self.assertIsNone(filebox.read_json(path, dict), "another type")
        path.write_text('{"a": ')
        self.assertIsNone(filebox.read_json(path, dict), "half-written")
        (base / "target.json").write_text("{}")
        (base / "link.json").symlink_to(base / "target.json")
        self.assertIsNone(filebox.read_json(base / "link.json", dict), "a symlink is refused")
        path.write_text('{"a": 1}')
        self.assertEqual(filebox.read_json(path, dict), {"a": 1})


class ArcSourceTests(TestCase):
    def test_job_file_formats(self) -> None:
        self.assertEqual(parse_job_file(b"PandaID=5&jobPars=-c+true")["jobPars"], "-c true")  # type: ignore[index]
        self.assertEqual(parse_job_file(b'{"6": {"jobPars": "x"}}')["PandaID"], 6)  # type: ignore[index]
        self.assertEqual(parse_job_file(b'{"PandaID": 7}'), {"PandaID": 7})
        self.assertIsNone(parse_job_file(b'{"PandaID": '))
        self.assertIsNone(parse_job_file(b"nothing=here"))

    def test_one_job_then_none_and_the_heartbeat_file(self) -> None:
        session = Path(self.mktemp()).absolute()
        session.mkdir()
        (session / "pandaJobData.out").write_text("PandaID=21&logFile=log.tgz")
        outbox = session / ".txpilot-outbox"
        outbox.mkdir()
        (outbox / "out.dat").write_text("result\n")
        source = ArcSource(session / "pandaJobData.out", session, in_thread=inline)
        first = self.successResultOf(source.acquire_jobs(REQUEST))
        self.assertEqual(first.jobs[0]["PandaID"], "21")
        self.assertEqual(self.successResultOf(source.acquire_jobs(REQUEST)).status, StatusCode.NO_JOBS)
        report = {
            "out.dat": {"guid": "g", "fsize": 7, "adler32": "0b1e02b6", "surl": (outbox / "out.dat").as_uri()}
        }
        final = JobUpdate(job_id=21, state="finished", job_output_report=json.dumps(report))
        self.successResultOf(source.update_job(final, final=True, timeout=None))
        heartbeat = json.loads((session / "heartbeat.json").read_text())
        self.assertEqual((heartbeat["jobStatus"], heartbeat["jobId"]), ("finished", 21))
        self.assertIn("xml", heartbeat, "aCT passes the output report on")
        self.assertEqual((session / "out.dat").read_text(), "result\n", "the output where the CE collects it")


class WireContractTests(TestCase):
    """Every file the pilot writes follows its schema in ``interfaces/harvester/``."""

    def test_the_files_follow_their_schemas(self) -> None:
        from .test_harvester_side import validator

        access = Path(self.mktemp()).absolute()
        access.mkdir()
        clock = Clock()
        source = HarvesterSource(MessengerFiles(access), clock=clock, in_thread=inline, interval=1.0)
        written: list[tuple[str, Any]] = []

        def snapshot(*names: str) -> None:
            for name in names:
                written.append((name, json.loads((access / name).read_text())))
                os.unlink(access / name)  # as Harvester takes it

        self.successResultOf(source.touch_heartbeat())
        snapshot("worker_heartbeat.json")
        asked = source.acquire_jobs(REQUEST)
        snapshot("worker_requestjob.json")
        (access / "HPCJobs.json").write_text('{"41": {"PandaID": 41, "logFile": "l.tgz"}}')
        clock.advance(1.0)
        self.successResultOf(asked)
        running = JobUpdate(job_id=41, state="running", node="n1", cpu_consumption_time=3, core_count=4)
        self.successResultOf(source.update_job(running, final=False, timeout=None))
        snapshot("worker_attributes.json")
        ranges = source.acquire_event_ranges(EventRangeRequest(41, jobset_id=2, task_id=3, n_ranges=8))
        snapshot("worker_requestevents.json")
        (access / "JobsEventRanges.json").write_text('{"41": []}')
        clock.advance(1.0)
        self.successResultOf(ranges)
        failed = EventRangeUpdate(41, statuses=(RangeStatus("3-41-1-1-1", "failed", error_code=1220),))
        self.successResultOf(source.update_event_ranges(failed))
        snapshot("worker_updateevents.json")
        chunk = ArchiveChunk(
            "a.tar", 10, "0badcafe", 1, (RangeStatus("3-41-1-2-1", "finished"),), 1, url="/o/a.tar"
        )
        self.successResultOf(source.update_event_ranges(EventRangeUpdate(41, chunks=(chunk,))))
        snapshot("event_status.dump.json")
        report = {
            "l.tgz": {
                "guid": "5f0d2c1e-0000-4000-8000-00000000abcd",
                "fsize": 9,
                "adler32": "0aaa0111",
                "surl": "file:///o/l.tgz",
            }
        }
        final = JobUpdate(
            job_id=41, state="finished", pilot_error_code=0, trans_exit_code=0,
            job_output_report=json.dumps(report), end_time="2026-12-05 12:00:00",
        )  # fmt: skip
        self.successResultOf(source.update_job(final, final=True, timeout=None))
        snapshot("event_status.dump.json", "worker_attributes.json")
        self.successResultOf(source.kill_worker())
        snapshot("kill_worker.json")
        for name, document in written:
            schema = name.removesuffix(".json")
            errors = [e.message for e in validator(schema).iter_errors(document)]
            self.assertEqual(errors, [], (name, document))
        session = Path(self.mktemp()).absolute()
        session.mkdir()
        (session / "pandaJobData.out").write_text("PandaID=5")
        arc = ArcSource(session / "pandaJobData.out", session, in_thread=inline)
        self.successResultOf(arc.update_job(running, final=False, timeout=None))
        heartbeat = json.loads((session / "heartbeat.json").read_text())
        self.assertEqual([e.message for e in validator("heartbeat").iter_errors(heartbeat)], [])
