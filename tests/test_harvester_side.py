"""``HarvesterSide`` behaves like Harvester's shared-file messenger; its files fit the schemas.

The test plays the pilot by hand (writing its files atomically, each checked against
its schema first) and drives the model cycle by cycle on ``task.Clock``, so that each
of Harvester's rules is seen on its own: the job feed, the ``.read`` handshake, the
deletions, the acknowledgement, the hazards (stale attributes, range statuses written
over, torn writes).  The last tests check ``tests.netns``: a process in the namespace
reaches loopback and nothing else; ``socket_guard`` stops and records the rest.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.server.api import ApiMode
from pilot.server.messages import JobUpdate, encode_job_update
from pilot.source import filebox

from .harvester_side import HarvesterSide, StagedFile, adler32
from .netns import NetnsSpawner, NetworkForbidden, require_netns, socket_guard

reactor: Any = _reactor
INTERFACES = Path(__file__).parent.parent / "interfaces"
SCHEMAS = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(INTERFACES.glob("**/*.schema.json"))]
REGISTRY: Registry[Any] = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in SCHEMAS)
GUID = "5f0d2c1e-0000-4000-8000-00000000abcd"
#: Which schema each exchange file follows.
SCHEMA_OF = {
    "HPCJobs.json": "HPCJobs",
    "worker_pandaids.json": "worker_pandaids",
    "worker_requestjob.json": "worker_requestjob",
    "worker_attributes.json": "worker_attributes",
    "event_status.dump.json": "event_status.dump",
    "worker_requestevents.json": "worker_requestevents",
    "JobsEventRanges.json": "JobsEventRanges",
    "worker_updateevents.json": "worker_updateevents",
    "kill_worker.json": "kill_worker",
    "worker_heartbeat.json": "worker_heartbeat",
}

#: The files Harvester writes (``worker_updateevents.json`` from the ranges of a dump).
HARVESTER_WRITES = (
    "HPCJobs.json",
    "worker_pandaids.json",
    "JobsEventRanges.json",
    "worker_updateevents.json",
)


def schema_of(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((INTERFACES / "harvester" / f"{name}.schema.json").read_text())
    return document


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = schema_of(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=REGISTRY)


def job(panda_id: int, **extra: Any) -> dict[str, Any]:
    return {"PandaID": panda_id, "transformation": "/bin/true", "jobPars": "", "logFile": "log.tgz", **extra}


def es_range(panda_id: int, n: int) -> dict[str, Any]:
    return {
        "eventRangeID": f"77-{panda_id}-5-{n}-1",
        "startEvent": n,
        "lastEvent": n,
        "LFN": "EVNT.pool.root",
        "GUID": GUID,
        "scope": "mc23",
    }


class HarvesterSideTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.access = Path(self.mktemp()).absolute()
        self.clock = Clock()

    def side(self, *jobs: dict[str, Any], **options: Any) -> HarvesterSide:
        side = HarvesterSide(self.access, clock=self.clock, jobs=jobs, **options)
        self.access.mkdir(parents=True, exist_ok=True)
        return side

    def cycle(self, side: HarvesterSide) -> None:
        self.successResultOf(Deferred.fromCoroutine(side.cycle()))
        self.assert_files_valid()

    def file(self, name: str) -> Path:
        return self.access / name

    def read(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def write(self, name: str, document: Any) -> None:
        """What the pilot writes: valid, and atomic."""
        validator(SCHEMA_OF[name]).validate(document)
        filebox.write_json(self.file(name), document)

    def output(self, name: str, data: bytes = b"payload output") -> dict[str, Any]:
        """A real file and its dump entry."""
        path = self.access / "outbox" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {
            "type": "output",
            "path": str(path),
            "guid": GUID,
            "fsize": len(data),
            "chksum": adler32(path),
        }

    def assert_files_valid(self) -> None:
        """Every file the model writes (also once taken or acknowledged) fits its schema."""
        for path in self.access.iterdir():
            base = re.sub(r"\.read(\..*)?$", "", path.name)
            if base in HARVESTER_WRITES and path.is_file():
                validator(SCHEMA_OF[base]).validate(json.loads(path.read_text()))

    # -- jobs ----------------------------------------------------------------------------

    def test_a_preplaced_job_comes_with_its_catalogue_links_and_pandaids(self) -> None:
        source = Path(self.mktemp()).absolute()
        source.write_bytes(b"input")
        side = self.side(job(1, inFiles="EVNT.1", GUID=GUID), inputs={1: [source]}, preplace=True)
        side.start()
        self.addCleanup(lambda: self.successResultOf(Deferred.fromCoroutine(side.stop())))
        self.assertEqual(self.read("HPCJobs.json"), {"1": job(1, inFiles="EVNT.1", GUID=GUID)})
        self.assertEqual(self.read("worker_pandaids.json"), [1])
        self.assertEqual(os.readlink(self.file(source.name)), str(source))
        catalogue = self.file("PoolFileCatalog_H.xml").read_text()
        self.assertIn(f'<File ID="{GUID}">', catalogue)
        self.assertIn('name="EVNT.1"', catalogue)
        self.assertEqual(side.jobs_fed, [1])
        self.assert_files_valid()

    def test_a_request_is_fed_then_deleted_and_an_unreadable_one_asks_for_one_job(self) -> None:
        side = self.side(job(1), job(2))
        self.write("worker_requestjob.json", {"nJobs": 3})
        self.cycle(side)
        self.assertEqual((side.job_requests, side.jobs_fed), ([3], [1]))  # one job per feed
        self.assertFalse(self.file("worker_requestjob.json").exists())
        self.file("worker_requestjob.json").write_text('{"nJ')  # half-written
        self.cycle(side)
        self.assertEqual((side.job_requests, side.jobs_fed), ([3, 1], [1, 2]))
        self.assertEqual(list(self.read("HPCJobs.json")), ["2"], "the next job overwrites the file")

    def test_without_jobs_the_request_stays_and_is_fed_when_one_comes(self) -> None:
        side = self.side()
        self.write("worker_requestjob.json", {"nJobs": 1})
        self.cycle(side)
        self.cycle(side)
        self.assertEqual((side.jobs_fed, side.job_requests), ([], [1]))
        self.assertTrue(self.file("worker_requestjob.json").exists())
        side.add_job(job(5))
        self.cycle(side)
        self.assertEqual(side.jobs_fed, [5])
        self.assertFalse(self.file("worker_requestjob.json").exists())

    def test_a_request_once_read_is_fed_even_when_withdrawn(self) -> None:
        side = self.side(job(1), feed_delay=1)
        self.write("worker_requestjob.json", {"nJobs": 1})
        self.cycle(side)
        self.assertEqual(side.jobs_fed, [])
        self.file("worker_requestjob.json").unlink()  # the pilot gave up
        self.cycle(side)
        self.assertEqual(side.jobs_fed, [1])

    def test_a_torn_write_is_half_a_file_for_the_pause(self) -> None:
        side = self.side(job(1, jobPars="x" * 1000), torn_writes=True, tear_pause=2.0)
        self.write("worker_requestjob.json", {"nJobs": 1})
        cycle = Deferred.fromCoroutine(side.cycle())
        self.assertNoResult(cycle)
        with self.assertRaises(ValueError):
            json.loads(self.file("HPCJobs.json").read_text())
        self.assertTrue(self.file("worker_requestjob.json").exists(), "deleted only after the feed")
        self.clock.advance(2.0)
        self.successResultOf(cycle)
        self.assertEqual(self.read("HPCJobs.json")["1"]["PandaID"], 1)
        self.assertFalse(self.file("worker_requestjob.json").exists())

    # -- attributes ----------------------------------------------------------------------

    def attributes(self, panda_id: int, status: str) -> dict[str, Any]:
        return {"jobId": panda_id, "state": status, "jobStatus": status, "pilotErrorCode": 0}

    def test_attributes_go_to_the_running_job_and_a_stale_finished_ends_the_next_one(self) -> None:
        side = self.side(job(1), job(2))
        side.preplace()
        self.write("worker_attributes.json", self.attributes(1, "running"))
        self.cycle(side)
        self.write("worker_attributes.json", self.attributes(1, "holding"))
        self.cycle(side)
        self.assertEqual(side.running, [1], "holding is not final for Harvester")
        self.write("worker_attributes.json", self.attributes(1, "finished"))
        filebox.write_json(self.file("jobReport.json"), {"exitCode": 0})
        self.write("worker_requestjob.json", {"nJobs": 1})
        self.cycle(side)
        self.assertEqual(side.final_states[1][0], "finished")
        self.assertEqual(side.final_states[1][1]["metaData"], {"exitCode": 0})
        self.assertEqual(
            [a["jobStatus"] for a in side.attributes_seen[1]], ["running", "holding", "finished"]
        )
        self.assertEqual(side.jobs_fed, [1, 2])
        self.assertEqual(side.problems, [])
        self.cycle(side)  # the pilot has not removed job 1's file
        self.assertEqual(
            side.final_states[2],
            ("finished", {**self.attributes(1, "finished"), "metaData": {"exitCode": 0}}),
        )
        self.assertEqual(side.problems, ["cycle 4: attributes of job 1 applied to job 2"])

    def test_attribute_keys_are_merged_and_a_removed_file_changes_nothing(self) -> None:
        side = self.side(job(1))
        side.preplace()
        self.write("worker_attributes.json", {**self.attributes(1, "running"), "nEvents": 5})
        self.cycle(side)
        self.write("worker_attributes.json", self.attributes(1, "running"))
        self.cycle(side)
        self.file("worker_attributes.json").unlink()
        self.cycle(side)
        self.assertEqual(side.job_attributes[1]["nEvents"], 5)
        self.assertEqual(len(side.attributes_seen[1]), 2)

    # -- files to stage out --------------------------------------------------------------

    def test_a_dump_is_renamed_read_staged_and_acknowledged(self) -> None:
        side = self.side(job(1))
        side.preplace()
        entry = self.output("out.root")
        self.write(
            "event_status.dump.json", {"1": [entry, {**self.output("log.tgz", b"log"), "type": "log"}]}
        )
        self.cycle(side)
        self.assertEqual([s.lfn for s in side.staged[1]], ["out.root", "log.tgz"])
        self.assertEqual(
            side.staged[1][0],
            StagedFile("out.root", entry["path"], "output", entry["fsize"], entry["chksum"], GUID, cycle=1),
        )
        self.assertFalse(self.file("event_status.dump.json").exists())
        self.assertFalse(self.file("event_status.dump.json.read").exists())
        [acknowledged] = side.acknowledged
        self.assertRegex(
            acknowledged, r"^event_status\.dump\.json\.read\.\d{4}-\d\d-\d\d_\d\d_\d\d_\d\d\.\d{6}$"
        )
        self.assertTrue(self.file(acknowledged).exists())
        self.assertEqual(side.problems, [])

    def test_an_unacknowledged_read_is_read_again_and_a_new_dump_waits(self) -> None:
        side = self.side(job(1))
        side.preplace()
        filebox.write_json(self.file("event_status.dump.json.read"), {"1": [self.output("a")]})
        self.write("event_status.dump.json", {"1": [self.output("b")]})
        self.cycle(side)
        self.assertEqual([s.lfn for s in side.staged[1]], ["a"])
        self.assertTrue(self.file("event_status.dump.json").exists(), "not looked at while a .read waits")
        self.cycle(side)
        self.assertEqual([s.lfn for s in side.staged[1]], ["a", "b"])

    def test_an_invalid_or_empty_dump_is_deleted_unused(self) -> None:
        side = self.side(job(1))
        side.preplace()
        for content in ('{"1": [{"type"', "[1, 2]", "{}"):
            self.file("event_status.dump.json").write_text(content)
            self.cycle(side)
            self.assertEqual([p.name for p in self.access.glob("event_status*")], [], content)
        self.assertEqual((side.staged, side.acknowledged), ({}, []))
        self.assertEqual(len(side.problems), 2)  # the empty one is no problem

    def test_a_file_unlike_its_declaration_is_a_problem(self) -> None:
        side = self.side(job(1))
        side.preplace()
        entry = self.output("out.root")
        wrong = [
            {**entry, "chksum": "00000001"},
            {**self.output("b"), "fsize": 1},
            {**self.output("gone"), "guid": GUID},
        ]
        Path(wrong[2]["path"]).unlink()
        self.write("event_status.dump.json", {"1": wrong})
        self.cycle(side)
        self.assertEqual(len(side.staged[1]), 3)
        self.assertEqual(len(side.problems), 3, side.problems)
        self.assertIn("declared adler32 '00000001'", side.problems[0])
        self.assertIn("declared 1 bytes", side.problems[1])
        self.assertIn("missing", side.problems[2])

    def test_files_after_the_final_state_are_dropped_and_still_acknowledged(self) -> None:
        side = self.side(job(1))
        side.preplace()
        self.write("worker_attributes.json", self.attributes(1, "failed"))
        self.cycle(side)
        self.write("event_status.dump.json", {"1": [self.output("late")]})
        self.cycle(side)
        self.assertEqual(side.staged, {})
        self.assertEqual(side.problems, ["cycle 2: files of job 1 dropped: not running"])
        self.assertEqual(len(side.acknowledged), 1)

    def test_a_pandaid_that_is_no_integer_fails_every_check(self) -> None:
        side = self.side(job(1))
        side.preplace()
        self.file("event_status.dump.json").write_text('{"one": []}')
        self.write("worker_attributes.json", self.attributes(1, "running"))
        self.cycle(side)
        self.cycle(side)
        self.assertEqual(side.attributes_seen, {})
        self.assertTrue(self.file("event_status.dump.json.read").exists())
        self.assertEqual(len(side.problems), 2)

    # -- event ranges --------------------------------------------------------------------

    def es_side(self, n: int = 4, **options: Any) -> HarvesterSide:
        side = self.side(
            job(9, eventService="True"), ranges={9: [es_range(9, i) for i in range(n)]}, **options
        )
        side.preplace()
        return side

    def request_ranges(self, n: int) -> None:
        self.write(
            "worker_requestevents.json", {"9": {"nRanges": n, "pandaID": 9, "taskID": 77, "jobsetID": 3}}
        )

    def test_ranges_are_fed_up_to_n_then_an_empty_list(self) -> None:
        side = self.es_side(3)
        for expected in (2, 1, 0):
            self.request_ranges(2)
            self.cycle(side)
            self.assertEqual(len(self.read("JobsEventRanges.json")["9"]), expected)
            self.assertFalse(self.file("worker_requestevents.json").exists())
        self.assertEqual(side.ranges_fed[9], [f"77-9-5-{i}-1" for i in range(3)])
        self.assertEqual(len(side.event_requests), 3)

    def test_a_job_without_event_service_has_its_range_files_ignored(self) -> None:
        side = self.side(job(1))
        side.preplace()
        self.write(
            "worker_requestevents.json", {"1": {"nRanges": 1, "pandaID": 1, "taskID": 7, "jobsetID": 3}}
        )
        self.write(
            "worker_updateevents.json", {"1": [{"eventRangeID": "7-1-1-1-1", "eventStatus": "finished"}]}
        )
        self.cycle(side)
        self.assertTrue(self.file("worker_requestevents.json").exists())
        self.assertTrue(self.file("worker_updateevents.json").exists())
        self.assertEqual((side.event_requests, side.range_updates), ([], {}))

    def test_range_statuses_are_recorded_duplicates_counted_and_the_first_final_kept(self) -> None:
        side = self.es_side()
        self.request_ranges(2)
        self.cycle(side)
        first, second = self.read("JobsEventRanges.json")["9"]
        for status in ("running", "finished", "finished", "failed"):
            update = [{"eventRangeID": first["eventRangeID"], "eventStatus": status}]
            self.write("worker_updateevents.json", {"9": update})
            self.cycle(side)
        self.assertEqual(
            side.range_updates[9], {first["eventRangeID"]: ["running", "finished", "finished", "failed"]}
        )
        self.assertEqual(side.duplicate_updates, 1)
        self.assertEqual(side.range_status[9], {first["eventRangeID"]: "finished"})
        self.assertEqual(len([a for a in side.acknowledged if a.startswith("worker_updateevents")]), 4)
        self.assertEqual(side.problems, [])

    def test_ranges_in_a_dump_overwrite_the_pilots_unread_statuses(self) -> None:
        side = self.es_side()
        self.request_ranges(3)
        self.cycle(side)
        r1, r2, r3 = (r["eventRangeID"] for r in self.read("JobsEventRanges.json")["9"])
        self.write("worker_updateevents.json", {"9": [{"eventRangeID": r1, "eventStatus": "failed"}]})
        archive = {**self.output("archive.zip"), "type": "zip_output", "eventStatus": "finished"}
        self.write("event_status.dump.json", {"9": [{**archive, "eventRangeID": r} for r in (r2, r3)]})
        self.cycle(side)
        self.assertEqual(side.range_updates[9], {r2: ["finished"], r3: ["finished"]}, f"{r1} lost")
        self.assertEqual(
            [(s.lfn, s.event_range_id) for s in side.staged[9]], [("archive.zip", r2), ("archive.zip", r3)]
        )
        [written] = [a for a in side.acknowledged if a.startswith("worker_updateevents")]
        self.assertEqual(
            self.read(written), {"9": [{"eventRangeID": r, "eventStatus": "finished"} for r in (r2, r3)]}
        )

    # -- the worker ----------------------------------------------------------------------

    def test_kill_request_and_heartbeat(self) -> None:
        now = [1000.0]
        side = self.side(job(1), heartbeat_limit=60.0, wall=lambda: now[0])
        side.start()
        self.addCleanup(lambda: self.successResultOf(Deferred.fromCoroutine(side.stop())))
        self.write("worker_heartbeat.json", {"time": 1.0})
        os.utime(self.file("worker_heartbeat.json"), (990.0, 990.0))
        self.clock.advance(0.2)
        self.assertEqual((side.last_heartbeat, side.heartbeat_expired, side.killed), (990.0, False, False))
        now[0] = 1100.0
        self.write("kill_worker.json", {"time": 2.0})
        os.utime(self.file("worker_heartbeat.json"), (990.0, 990.0))
        self.clock.advance(0.2)
        self.assertEqual((side.heartbeat_expired, side.killed), (True, True))
        self.assertEqual(side.problems, ["cycle 3: heartbeat expired: Harvester kills the worker"])

    def test_it_cycles_on_the_clock_and_stops_after_the_cycle_under_way(self) -> None:
        side = self.side(job(1), torn_writes=True, tear_pause=1.0)
        side.start()
        self.assertEqual(side.cycles, 1)
        self.clock.advance(0.2)
        self.assertEqual(side.cycles, 2)
        self.write("worker_requestjob.json", {"nJobs": 1})
        self.clock.advance(0.2)  # cycle 3 feeds, torn: it pauses
        stopped = Deferred.fromCoroutine(side.stop())
        self.assertNoResult(stopped)
        self.clock.advance(1.0)
        self.successResultOf(stopped)
        self.assertEqual((side.cycles, side.jobs_fed), (3, [1]))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SchemaTests(SynchronousTestCase):
    def test_every_schema_is_valid_and_every_update_field_is_known(self) -> None:
        for schema in SCHEMAS:
            jsonschema.Draft202012Validator.check_schema(schema)
        values: dict[str, Any] = {f.name: 1 for f in dataclasses.fields(JobUpdate)}
        del values["job_id"], values["state"]
        full = encode_job_update(JobUpdate(job_id=1, state="finished", **values), ApiMode.LEGACY)
        known = set(schema_of("heartbeat")["properties"])
        self.assertEqual(set(full) | {"jobStatus"}, known)
        self.assertEqual(set(schema_of("worker_attributes")["properties"]), known - {"xml"})


#: Run in the namespace: a connection beyond loopback, then a round trip over loopback.
PROBE = """
import json, socket
out = {}
try:
    socket.create_connection(("192.0.2.1", 9), timeout=5)
    out["remote"] = "connected"
except OSError as e:
    out["remote"] = e.errno
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
client = socket.create_connection(server.getsockname(), timeout=5)
client.sendall(b"ping")
out["loopback"] = server.accept()[0].recv(4).decode()
print(json.dumps(out))
"""


class NetnsTests(TestCase):
    async def test_a_process_in_the_namespace_reaches_loopback_only(self) -> None:
        tools = await require_netns(self, reactor)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", PROBE], env=dict(os.environ), reactor=NetnsSpawner(reactor, tools)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"remote": errno.ENETUNREACH, "loopback": "ping"})

    async def test_the_socket_guard_stops_and_records_what_leaves_the_host(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        with socket_guard() as guard:
            remote = socket.socket()
            self.addCleanup(remote.close)
            with self.assertRaises(NetworkForbidden) as raised:
                remote.connect(("192.0.2.1", 9))
            self.assertEqual(raised.exception.errno, errno.ENETUNREACH)
            local = socket.create_connection(server.getsockname(), timeout=5)
            self.addCleanup(local.close)
            endpoint = TCP4ClientEndpoint(reactor, "192.0.2.1", 9, timeout=5)
            with self.assertRaises(ConnectError):
                await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(
            [(a.address, a.call) for a in guard.blocked],
            [(("192.0.2.1", 9), "connect"), (("192.0.2.1", 9), "connect_ex")],
        )
        self.assertEqual([a.address for a in guard.loopback_tcp], [server.getsockname()])
        self.assertEqual(len(guard.attempts), 3)
        self.assertIs(socket.socket.connect, _ORIGINAL_CONNECT, "restored")


_ORIGINAL_CONNECT = socket.socket.connect
