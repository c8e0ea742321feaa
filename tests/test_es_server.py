"""The event-service calls end to end: the pilot's client and source against the dev server.

Real HTTPS on loopback with the generated PKI, for both API generations: ranges handed
out and refused, version-0 and version-1 reports, panda-server 1.0.4's HTTP 500 after
the commit (sent once, the statuses in the server's store), the per-job command, and
what the development server records (``/dev/jobs/<id>/events``).  Replies the real
server never sends (truncated, wrongly shaped) come from a scripted resource.  The wire
documents on both sides are validated against the schemas in ``interfaces/``.
"""

from __future__ import annotations

import gzip
import json
import urllib.parse
from pathlib import Path
from typing import Any, cast

import jsonschema
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.devserver.event_api import EventAPI
from pilot.devserver.events import EventStore
from pilot.devserver.server import DevServer, start_dev_server
from pilot.devserver.tap import Options
from pilot.eventservice.ranges import parse_event_ranges
from pilot.eventservice.reporting import RangeReporter
from pilot.interfaces import IEventSource
from pilot.model.credentials import Credentials
from pilot.server import event_calls
from pilot.server.api import ApiMode
from pilot.server.client import (
    JobRequest,
    MethodNotFound,
    PandaClient,
    ReplyTooLarge,
    RetryPolicy,
    ServerProtocolError,
    ServerRefused,
    ServerUnavailable,
    decode_reply,
)
from pilot.server.event_calls import CommittedThenFailed, EventCallFailed
from pilot.server.events import (
    ArchiveChunk,
    EventRangeRequest,
    EventRangeUpdate,
    RangesNotRecorded,
    RangeStatus,
)
from pilot.server.tls import PilotTLSPolicy
from pilot.source.panda import PandaServerSource

from .fakes import Scripted, ScriptedPanda

reactor: Any = _reactor
QUEUE = "ES_QUEUE"
TASK, JOBSET = 4242, 77
LFN, GUID, SCOPE = "EVNT.01234._000001.pool.root.1", "5f0d2c1e-0000-4000-8000-00000000abcd", "mc23_13p6TeV"
INTERFACES = Path(__file__).parent.parent / "interfaces"
NO_JITTER = RetryPolicy(attempts=3, initial=0.1, jitter=lambda: 0.0)
STATUS_QUERY = "/api/v1/event/get_event_range_statuses"


def schema(name: str) -> jsonschema.Draft202012Validator:
    document = json.loads((INTERFACES / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


def capture_logs(test: TestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(test, globalLogPublisher)


def workarounds(logged: EventLoggingObserver) -> list[str]:
    events: list[LogEvent] = list(logged)
    return [str(e["how"]) for e in events if e.get("event") == "server.es_workaround"]


def es_job(**extra: Any) -> dict[str, Any]:
    """An event-service job for the development server: five one-event ranges of one EVNT file."""
    job: dict[str, Any] = {
        "computingSite": QUEUE,
        "transformation": "/bin/true",
        "inFiles": [LFN],
        "GUID": [GUID],
        "scopeIn": SCOPE,
        "eventService": True,
        "taskID": TASK,
        "jobsetID": JOBSET,
        "esRanges": {"count": 5},
    }
    job.update(extra)
    return job


def chunk(
    ranges: list[dict[str, Any]], lfn: str = "EventService_premerge_1.tar", **extra: Any
) -> ArchiveChunk:
    """An archive of ``ranges``' outputs in object store 1 (the real server needs its id)."""
    statuses = tuple(RangeStatus(r["eventRangeID"], "finished") for r in ranges)
    values: dict[str, Any] = {
        "fsize": 1024,
        "adler32": "0a1b2c3d",
        "num_events": len(ranges),
        "objstore_id": 1,
    }
    values.update(extra)
    return ArchiveChunk(lfn=lfn, ranges=statuses, **values)


class ServerCase(TestCase):
    """Starts a development server and the pilot's client for it."""

    timeout = 60
    api = ApiMode.V1

    async def start(self, **kwargs: Any) -> DevServer:
        kwargs.setdefault("queues", {QUEUE: {}})
        server = await start_dev_server(reactor, Path(self.mktemp()), **kwargs)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def http(self, server: DevServer) -> HTTPClient:
        credentials = Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, contextFactory=PilotTLSPolicy(credentials), pool=pool))

    def client(self, server: DevServer, api: ApiMode | None = None, **kwargs: Any) -> PandaClient:
        kwargs.setdefault("retry", NO_JITTER)
        return PandaClient(self.http(server), server.url, reactor, api=api or self.api, **kwargs)

    async def dispatched(self, server: DevServer, client: PandaClient, **job: Any) -> int:
        """Submit an event-service job and take it as a pilot does (it becomes ``sent``)."""
        await server.submit(es_job(**job))
        return await self.take(client)

    async def take(self, client: PandaClient) -> int:
        request = JobRequest(
            site_name=QUEUE, computing_element=QUEUE, prod_source_label="managed", node="wn1"
        )
        result = await client.acquire_job(request)
        return int(result.jobs[0]["PandaID"])

    async def ranges(self, client: PandaClient, panda_id: int, n: int) -> list[dict[str, Any]]:
        return await client.acquire_event_ranges(EventRangeRequest(panda_id, JOBSET, TASK, n))

    async def raw(
        self, server: DevServer, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, bytes]:
        """A request as another client would send it (for calls the pilot does not make)."""
        sent: dict[bytes | str, list[bytes | str]] = {
            name.replace("_", "-").encode(): [value.encode()] for name, value in headers.items()
        }
        response = await self.http(server).request(method, f"{server.url}{path}", data=body, headers=sent)
        return response.code, await response.content()


def sent(body: bytes, api: ApiMode) -> dict[str, Any]:
    """A report as the pilot put it on the wire (gzipped JSON), its list under ``ranges``."""
    params: dict[str, Any] = json.loads(gzip.decompress(body))
    params["ranges"] = params["eventRanges" if api is ApiMode.LEGACY else "event_ranges"]
    return params


def statuses(view: dict[str, Any]) -> dict[str | None, str]:
    return {r["eventRangeID"]: r["status"] for r in view["ranges"]}


class _BothGenerations:
    """Tests run once with the legacy API (0.8.1) and once with v1 (1.0.4)."""

    async def test_ranges_in_order_as_the_server_makes_them(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 3)
        view: Any = await server.events(panda_id)
        file_id = view["ranges"][0]["eventRangeID"].split("-")[2]
        self.assertEqual(
            [r["eventRangeID"] for r in ranges], [f"{TASK}-{panda_id}-{file_id}-{n}-10" for n in (1, 2, 3)]
        )
        self.assertEqual(
            ranges[0], dict(ranges[0], startEvent=1, lastEvent=1, LFN=LFN, GUID=GUID, scope=SCOPE)
        )
        self.assertEqual(list(ranges[0]), ["eventRangeID", "startEvent", "lastEvent", "LFN", "GUID", "scope"])
        self.assertEqual(len(parse_event_ranges(ranges)), 3)  # what the pilot checks before a payload
        self.assertEqual(view["counts"], {"sent": 3, "ready": 2})
        for item in ranges:
            schema("event-range").validate(item)

    async def test_no_more_ranges_is_an_empty_list(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        self.assertEqual(len(await self.ranges(client, panda_id, 10)), 5)
        self.assertEqual(await self.ranges(client, panda_id, 10), [])

    async def test_ranges_only_while_the_job_is_dispatched(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        [panda_id] = await server.submit(es_job())
        self.assertEqual(await self.ranges(client, panda_id, 2), [])  # activated
        self.assertEqual(await self.take(client), panda_id)
        await server.set_command(panda_id, "tobekilled")
        self.assertEqual(await self.ranges(client, panda_id, 2), [])  # being killed
        self.assertEqual((await server.events(panda_id))["counts"], {"ready": 5})
        self.assertEqual(await client.acquire_event_ranges(EventRangeRequest(10**9, JOBSET, TASK, 2)), [])

    async def test_version_0_report(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        source = PandaServerSource(client)
        panda_id = await self.dispatched(server, client)
        first, second, third = (r["eventRangeID"] for r in await self.ranges(client, panda_id, 3))
        update = EventRangeUpdate(
            panda_id,
            statuses=(
                RangeStatus(first, "failed", error_code=1220, error_diag="bad", core_count=1, cpu_seconds=3),
                RangeStatus(second, "fatal", error_code=1220),
                RangeStatus(third, "running"),
            ),
        )
        result = await source.update_event_ranges(update)
        how = "bulk" if self.api is ApiMode.LEGACY else "single"
        self.assertEqual(
            (result.accepted, result.command, result.how),
            ({first: True, second: True, third: None}, None, how),
        )
        view: Any = await server.events(panda_id)
        self.assertEqual(statuses(view), {first: "failed", second: "fatal", third: "sent", None: "ready"})
        self.assertEqual(
            [r["reported"] for r in view["ranges"][:3]], [{"failed": 1}, {"fatal": 1}, {"running": 1}]
        )
        # the single call cannot carry error codes: only the legacy bulk report keeps them
        self.assertEqual(view["ranges"][0]["errorCode"], "1220" if self.api is ApiMode.LEGACY else None)
        self.assertEqual(
            len(server.request_log.matching(_path(self.api, "single" if how == "single" else "bulk"))),
            3 if how == "single" else 1,
        )

    async def test_version_1_report_once(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        source = PandaServerSource(client)
        logged = capture_logs(self)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 4)
        first = EventRangeUpdate(panda_id, chunks=(chunk(ranges[:2]),))
        second = EventRangeUpdate(panda_id, chunks=(chunk(ranges[2:], lfn="EventService_premerge_3.tar"),))
        results = [await source.update_event_ranges(first), await source.update_event_ranges(second)]
        ids = [r["eventRangeID"] for r in ranges]
        if self.api is ApiMode.LEGACY:
            self.assertEqual([r.how for r in results], ["bulk", "bulk"])
            self.assertEqual(results[0].accepted, {ids[0]: True, ids[1]: True})
        else:
            self.assertEqual([r.how for r in results], ["confirmed-after-500"] * 2)
            self.assertEqual(results[0].accepted, {ids[0]: True, ids[1]: True})
            self.assertEqual(workarounds(logged), ["confirmed-after-500"])
            self.assertEqual(len(server.request_log.matching(STATUS_QUERY)), 2)  # read back each time
        self.assertEqual(len(server.request_log.matching(_path(self.api, "bulk"))), 2)  # each sent once
        view: Any = await server.events(panda_id)
        self.assertEqual([r["reported"] for r in view["ranges"][:4]], [{"finished": 1}] * 4)
        self.assertEqual(view["counts"], {"finished": 4, "ready": 1})
        archive = view["archives"][0]
        self.assertEqual(
            {k: archive[k] for k in ("lfn", "fsize", "adler32", "numEvents", "objstoreID", "pathConvention")},
            {"lfn": "EventService_premerge_1.tar", "fsize": 1024, "adler32": "0a1b2c3d", "numEvents": "2",
             "objstoreID": "1", "pathConvention": "1000"},
        )  # fmt: skip
        self.assertEqual(archive["eventRangeIDs"], ids[:2])
        for entry in server.request_log.matching(_path(self.api, "bulk")):
            schema("event-update-v1").validate(json.loads(sent(entry.body, self.api)["ranges"]))

    async def test_a_final_range_is_not_changed_again(self: Any) -> None:
        server = await self.start()
        client = self.client(server, ApiMode.LEGACY)  # Returns are read from the legacy reply
        panda_id = await self.dispatched(server, client)
        [item] = await self.ranges(client, panda_id, 1)
        done = RangeStatus(item["eventRangeID"], "finished")
        await client.update_event_ranges(EventRangeUpdate(panda_id, statuses=(done,)))
        again = await client.update_event_ranges(
            EventRangeUpdate(panda_id, statuses=(RangeStatus(item["eventRangeID"], "failed"),))
        )
        # the real server never counts the rows it changed: True, and nothing changed
        self.assertEqual(again.accepted, {item["eventRangeID"]: True})
        view: Any = await server.events(panda_id)
        self.assertEqual(
            (view["ranges"][0]["status"], view["ranges"][0]["reported"]),
            ("finished", {"finished": 1, "failed": 1}),
        )
        self.assertEqual(
            [u["outcome"] for u in view["updates"]],
            ["applied", "unchanged: not handed out to this job, or already final"],
        )

    async def test_commands_and_refusals(self: Any) -> None:
        server = await self.start()
        client = self.client(server)
        source = PandaServerSource(client)
        panda_id = await self.dispatched(server, client)
        [item] = await self.ranges(client, panda_id, 1)
        await server.set_command(panda_id, "tobekilled")
        result = await source.update_event_ranges(
            EventRangeUpdate(panda_id, statuses=(RangeStatus(item["eventRangeID"], "failed"),))
        )
        self.assertEqual((result.accepted, result.command), ({item["eventRangeID"]: True}, "tobekilled"))
        stranger = f"{TASK}-{10**9}-1-1-10"  # a range of a job the server does not know
        result = await source.update_event_ranges(
            EventRangeUpdate(10**9, statuses=(RangeStatus(stranger, "failed"),))
        )
        # a refused single call says only "database error": its command is lost
        command = "tobekilled" if self.api is ApiMode.LEGACY else None
        self.assertEqual((result.accepted, result.command), ({stranger: False}, command))

    async def test_no_production_role(self: Any) -> None:
        server = await self.start(production_dns=["/CN=somebody-else"])
        client = self.client(server)
        request = EventRangeRequest(1, JOBSET, TASK, 1)
        if self.api is ApiMode.LEGACY:
            # 0.8.1 answers a bare line of text ("production or pilot role is required")
            await self.assertFailure(
                Deferred.fromCoroutine(client.acquire_event_ranges(request)), ServerProtocolError
            )
        else:
            error = await self.assertFailure(
                Deferred.fromCoroutine(client.acquire_event_ranges(request)), EventCallFailed
            )
            self.assertIn("production or pilot role required", str(error))


def _path(api: ApiMode, call: str) -> str:
    legacy = {"bulk": "updateEventRanges", "single": "updateEventRange"}
    v1 = {"bulk": "update_event_ranges", "single": "update_single_event_range"}
    if api is ApiMode.LEGACY:
        return f"/server/panda/{legacy[call]}"
    return f"/api/v1/event/{v1[call]}"


class LegacyEventTests(_BothGenerations, ServerCase):
    api = ApiMode.LEGACY

    async def test_urlencoded_ranges_are_a_json_string(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        form = urllib.parse.urlencode({"pandaID": panda_id, "jobsetID": JOBSET, "nRanges": 2}).encode()
        code, body = await self.raw(
            server,
            "POST",
            "/server/panda/getEventRanges",
            form,
            Content_Type="application/x-www-form-urlencoded",
        )
        document = decode_reply(body, "text/plain", "getEventRanges")
        self.assertIsInstance(document["eventRanges"], str)
        ranges = event_calls.parse_acquire_reply(document, ApiMode.LEGACY, "getEventRanges")
        self.assertEqual((code, [r["startEvent"] for r in ranges]), (200, [1, 2]))

    async def test_single_range_call(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        first, second = (r["eventRangeID"] for r in await self.ranges(client, panda_id, 2))
        running = await client.update_single_event_range(RangeStatus(first, "running"), panda_id)
        done = await client.update_single_event_range(
            RangeStatus(second, "finished", cpu_seconds=2.5), panda_id
        )
        self.assertEqual((running.accepted, done.accepted), ({first: None}, {second: True}))
        # always urlencoded, StatusCode=30 for anything not recorded
        replies = [e.reply_body for e in server.request_log.matching("/server/panda/updateEventRange")]
        self.assertEqual(replies[0], b"StatusCode=30")
        self.assertTrue(replies[1].startswith(b"StatusCode=0&Command=%7B%22"), replies[1])

    async def test_archive_without_object_store_is_rolled_back(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 2)
        update = EventRangeUpdate(panda_id, chunks=(chunk(ranges, objstore_id=None),))
        self.assertRaises(jsonschema.ValidationError, schema("event-update-v1").validate, update.wire())
        result = await client.update_event_ranges(update)
        # the archive comes first and fails: the report is rolled back, Returns is one false
        self.assertEqual(list(result.accepted.values()), [False, None])
        view: Any = await server.events(panda_id)
        self.assertEqual((view["counts"], view["archives"]), ({"sent": 2, "ready": 3}, []))
        self.assertTrue(view["updates"][0]["outcome"].startswith("rolled back: KeyError"))

    async def test_events_availability(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        await self.ranges(client, panda_id, 2)
        form = urllib.parse.urlencode({"pandaID": panda_id, "jobsetID": JOBSET, "taskID": TASK}).encode()
        code, body = await self.raw(
            server,
            "POST",
            "/server/panda/checkEventsAvailability",
            form,
            Content_Type="application/x-www-form-urlencoded",
        )
        self.assertEqual((code, json.loads(body)), (200, {"StatusCode": 0, "nEventRanges": 3}))


class V1EventTests(_BothGenerations, ServerCase):
    api = ApiMode.V1

    async def test_bulk_version_0_fails_after_the_commit(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        [item] = await self.ranges(client, panda_id, 1)
        update = EventRangeUpdate(
            panda_id, statuses=(RangeStatus(item["eventRangeID"], "failed", error_code=1220),)
        )
        calls = client.calls
        await self.assertFailure(
            Deferred.fromCoroutine(client.update_event_ranges(update)), CommittedThenFailed
        )
        self.assertEqual(client.calls - calls, 1)  # never repeated
        [entry] = server.request_log.matching("/api/v1/event/update_event_ranges")
        self.assertEqual(entry.status, 500)
        self.assertTrue(entry.reply_body.startswith(b"Type not serializable for {"), entry.reply_body)
        self.assertTrue(entry.reply_body.endswith(b"(<class 'set'>)"), entry.reply_body)
        view: Any = await server.events(panda_id)
        self.assertEqual((view["ranges"][0]["status"], view["ranges"][0]["errorCode"]), ("failed", "1220"))
        schema("event-update-v0").validate(json.loads(sent(entry.body, ApiMode.V1)["ranges"]))

    async def test_version_1_500_text(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 2)
        update = EventRangeUpdate(panda_id, chunks=(chunk(ranges),))
        await self.assertFailure(
            Deferred.fromCoroutine(client.update_event_ranges(update)), CommittedThenFailed
        )
        [entry] = server.request_log.matching("/api/v1/event/update_event_ranges")
        self.assertEqual((entry.status, entry.reply_body), (500, b"unhashable type: 'list'"))

    async def test_single_call_wire(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        [item] = await self.ranges(client, panda_id, 1)
        status = RangeStatus(item["eventRangeID"], "finished", core_count=8, cpu_seconds=12, objstore_id=3)
        result = await client.update_single_event_range(status, panda_id)
        self.assertEqual(
            (result.accepted, result.command, result.how), ({item["eventRangeID"]: True}, None, "single")
        )
        entry = server.request_log.last("/api/v1/event/update_single_event_range")
        self.assertEqual(
            entry.params,
            {"event_range_id": item["eventRangeID"], "event_range_status": "finished", "core_count": 8,
             "cpu_consumption_time": 12.0},
        )  # fmt: skip
        assert entry.params is not None
        self.assertIsInstance(entry.params["cpu_consumption_time"], float)
        self.assertEqual(json.loads(entry.reply_body)["data"], {"Command": json.dumps({str(panda_id): None})})

    async def test_object_store_id_breaks_the_type_check(self) -> None:
        """Why the pilot never sends it: 1.0.4 annotates it with the builtin ``id``."""
        server = await self.start()
        body = json.dumps(
            {"event_range_id": "1-2-3-4-5", "event_range_status": "finished", "object_store_id": 3}
        )
        code, reply = await self.raw(
            server, "POST", "/api/v1/event/update_single_event_range", body.encode(),
            Content_Type="application/json", Accept="application/json",
        )  # fmt: skip
        self.assertEqual(code, 500)
        self.assertIn(b"isinstance() arg 2 must be a type", reply)

    async def test_statuses_and_count(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        first, _second = (r["eventRangeID"] for r in await self.ranges(client, panda_id, 2))
        await client.update_single_event_range(RangeStatus(first, "fatal"), panda_id)
        query = urllib.parse.urlencode({"job_id": panda_id, "jobset_id": JOBSET, "task_id": TASK})
        code, body = await self.raw(
            server, "GET", f"/api/v1/event/get_available_event_range_count?{query}", Accept="application/json"
        )
        self.assertEqual((code, json.loads(body)), (200, {"success": True, "message": "", "data": 3}))
        pairs = json.dumps([{"task_id": TASK, "panda_id": panda_id}])
        query = urllib.parse.urlencode({"job_task_ids": pairs})
        code, body = await self.raw(
            server, "GET", f"/api/v1/event/get_event_range_statuses?{query}", Accept="application/json"
        )
        data = json.loads(body)["data"][str(panda_id)]
        fatal = first.rsplit("-", 1)[0] + "-1"  # the table sets a fatal range's attempt number to 1
        self.assertEqual(data[fatal], {"status": "failed", "error": None, "dialog": None})
        self.assertEqual(sorted(d["status"] for d in data.values()), ["failed", "sent"])
        code, body = await self.raw(
            server,
            "GET",
            "/api/v1/event/get_event_range_statuses?job_task_ids=%5B1%5D",
            Accept="application/json",
        )
        self.assertEqual(
            json.loads(body),
            {"success": False, "message": "database error in the PanDA server", "data": None},
        )

    async def test_form_post_gets_the_set_as_python_text(self) -> None:
        """Without JSON the server answers 200 with ``str()`` of its reply, set and all."""
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        [item] = await self.ranges(client, panda_id, 1)
        ranges = json.dumps([{"eventRangeID": item["eventRangeID"], "eventStatus": "finished"}])
        form = urllib.parse.urlencode({"event_ranges": ranges}).encode()
        code, body = await self.raw(
            server,
            "POST",
            "/api/v1/event/update_event_ranges",
            form,
            Content_Type="application/x-www-form-urlencoded",
        )
        self.assertEqual(code, 200)
        self.assertTrue(body.startswith(b"{'success': True, 'message': '', 'data': {"), body)
        self.assertIn(b"'[true, false]'", body)  # Returns as JSON text, with the failed nEvents step's false

    async def test_source_and_workaround_logged_once(self) -> None:
        server = await self.start()
        client = self.client(server)
        source = PandaServerSource(client)
        verifyObject(IEventSource, source)
        logged = capture_logs(self)
        panda_id = await self.dispatched(server, client)
        ranges = await source.acquire_event_ranges(EventRangeRequest(panda_id, JOBSET, TASK, 2))
        for item in ranges:
            await source.update_event_ranges(
                EventRangeUpdate(panda_id, statuses=(RangeStatus(str(item["eventRangeID"]), "failed"),))
            )
        self.assertEqual(workarounds(logged), ["single"])

    async def test_reply_larger_than_the_limit(self) -> None:
        server = await self.start()
        panda_id = await self.dispatched(server, self.client(server), esRanges={"count": 100})
        small = self.client(server, reply_limit=4096)
        await self.assertFailure(Deferred.fromCoroutine(self.ranges(small, panda_id, 100)), ReplyTooLarge)
        # the server handed them out all the same: the call is not repeated
        self.assertEqual((await server.events(panda_id))["counts"], {"sent": 100})
        self.assertEqual(len(server.request_log.matching("/api/v1/event/acquire_event_ranges")), 1)


@implementer(IAgent)
class RefusedStatusQueries:
    """An agent whose first ``n`` status queries are refused at connect time (none reaches the server)."""

    def __init__(self, agent: IAgent, n: int) -> None:
        self._agent = agent
        self.failing = n

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if STATUS_QUERY.encode() in uri and self.failing > 0:
            self.failing -= 1
            return fail(ConnectionRefusedError("refused by the test"))
        return self._agent.request(method, uri, headers, bodyProducer)


class ConfirmAfter500Tests(ServerCase):
    """A version-1 report answered with 1.0.4's HTTP 500 is read back, not assumed committed.

    The dev server answers the same 500 text whether it committed the report or rolled it
    back; ``get_event_range_statuses`` tells which.  ``reported`` in the server's view counts
    every item it received, so a report sent twice shows there.
    """

    def reporter(self, source: PandaServerSource, panda_id: int) -> RangeReporter:
        return RangeReporter(reactor, source.update_event_ranges, panda_id, resend_delays=(0.1,))

    async def test_a_committed_report_is_read_back_and_counted_once(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 3)
        reporter = self.reporter(PandaServerSource(client), panda_id)
        reporter.finished(chunk(ranges))
        await reporter.flush(reactor.seconds() + 30)
        self.assertEqual(
            (reporter.pending, reporter.reported_finished, reporter.refused, reporter.calls, reporter.how),
            (0, 3, 0, 1, {"confirmed-after-500": 1}),
        )
        [report] = server.request_log.matching(_path(ApiMode.V1, "bulk"))
        self.assertEqual((report.status, report.reply_body), (500, b"unhashable type: 'list'"))
        [query] = server.request_log.matching(STATUS_QUERY)
        self.assertEqual(query.method, "GET")
        self.assertEqual(
            json.loads(urllib.parse.parse_qs(query.uri.split("?", 1)[1])["job_task_ids"][0]),
            [{"task_id": TASK, "panda_id": panda_id}],
        )
        view: Any = await server.events(panda_id)
        self.assertEqual([r["reported"] for r in view["ranges"][:3]], [{"finished": 1}] * 3)
        self.assertEqual(view["counts"], {"finished": 3, "ready": 2})

    async def test_a_rolled_back_report_comes_back_and_a_correct_resend_finishes_it_once(self) -> None:
        server = await self.start()
        client = self.client(server)
        source = PandaServerSource(client)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 2)
        ids = [r["eventRangeID"] for r in ranges]
        unstorable = EventRangeUpdate(panda_id, chunks=(chunk(ranges, objstore_id=None),))
        error: Any = await self.assertFailure(source.update_event_ranges(unstorable), RangesNotRecorded)
        self.assertEqual((error.settled.accepted, error.settled.how), ({}, "confirmed-after-500"))
        # the same 500 as for a committed report
        [report] = server.request_log.matching(_path(ApiMode.V1, "bulk"))
        self.assertEqual((report.status, report.reply_body), (500, b"unhashable type: 'list'"))
        view: Any = await server.events(panda_id)
        self.assertEqual((view["counts"], view["archives"]), ({"sent": 2, "ready": 3}, []))
        # the ranges come back; sent again right, they are finished once
        result = await source.update_event_ranges(EventRangeUpdate(panda_id, chunks=(chunk(ranges),)))
        self.assertEqual((result.accepted, result.how), ({i: True for i in ids}, "confirmed-after-500"))
        view = await server.events(panda_id)
        self.assertEqual(view["counts"], {"finished": 2, "ready": 3})
        self.assertEqual([a["eventRangeIDs"] for a in view["archives"]], [ids])
        applied = [u["eventRangeID"] for u in view["updates"] if u["outcome"] == "applied"]
        self.assertEqual(applied, ids)
        self.assertEqual(len(server.request_log.matching(STATUS_QUERY)), 2)

    def refusing_client(self, server: DevServer, n: int) -> tuple[PandaClient, RefusedStatusQueries]:
        credentials = Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = RefusedStatusQueries(Agent(reactor, contextFactory=PilotTLSPolicy(credentials), pool=pool), n)
        client = PandaClient(HTTPClient(agent), server.url, reactor, api=ApiMode.V1, retry=NO_JITTER)
        return client, agent

    async def test_a_failed_read_back_is_resent_without_reporting_twice(self) -> None:
        server = await self.start()
        client, agent = self.refusing_client(server, NO_JITTER.attempts)  # the first query fails
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 2)
        reporter = self.reporter(PandaServerSource(client), panda_id)
        reporter.finished(chunk(ranges))
        await reporter.flush(reactor.seconds() + 30)
        self.assertEqual(agent.failing, 0)
        self.assertEqual(
            (reporter.pending, reporter.reported_finished, reporter.calls, reporter.failed_calls),
            (0, 2, 2, 1),
        )
        # the resend read the ranges back first: the report went to the server once
        self.assertEqual(len(server.request_log.matching(_path(ApiMode.V1, "bulk"))), 1)
        self.assertEqual(len(server.request_log.matching(STATUS_QUERY)), 1)
        view: Any = await server.events(panda_id)
        self.assertEqual([r["reported"] for r in view["ranges"][:2]], [{"finished": 1}] * 2)

    async def test_only_the_unrecorded_ranges_go_again(self) -> None:
        server = await self.start()
        client, _agent = self.refusing_client(server, NO_JITTER.attempts)
        source = PandaServerSource(client)
        panda_id = await self.dispatched(server, client)
        ranges = await self.ranges(client, panda_id, 3)
        ids = [r["eventRangeID"] for r in ranges]
        first = chunk(ranges[:1])
        await self.assertFailure(
            source.update_event_ranges(EventRangeUpdate(panda_id, chunks=(first,))), ServerUnavailable
        )
        # the doubtful range is read back (recorded); the new chunk is rolled back
        unstorable = chunk(ranges[1:], lfn="EventService_premerge_2.tar", objstore_id=None)
        both = EventRangeUpdate(panda_id, chunks=(first, unstorable))
        error: Any = await self.assertFailure(source.update_event_ranges(both), RangesNotRecorded)
        self.assertEqual(error.settled.accepted, {ids[0]: True})
        self.assertEqual(
            json.loads(sent(server.request_log.last(_path(ApiMode.V1, "bulk")).body, ApiMode.V1)["ranges"]),
            [unstorable.wire()],
        )  # the recorded range was not sent again
        # what a RangeReporter sends again: the rest only
        fixed = EventRangeUpdate(panda_id, chunks=(chunk(ranges[1:], lfn="EventService_premerge_2.tar"),))
        result = await source.update_event_ranges(fixed)
        self.assertEqual(result.accepted, {i: True for i in ids[1:]})
        view: Any = await server.events(panda_id)
        applied = [u["eventRangeID"] for u in view["updates"] if u["outcome"] == "applied"]
        self.assertEqual(applied, ids)
        self.assertEqual(view["counts"], {"finished": 3, "ready": 2})

    async def test_status_query_of_the_client(self) -> None:
        server = await self.start()
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        first, second, third = (r["eventRangeID"] for r in await self.ranges(client, panda_id, 3))
        await client.update_single_event_range(RangeStatus(first, "finished"), panda_id)
        await client.update_single_event_range(RangeStatus(second, "fatal"), panda_id)
        recorded = await client.get_event_range_statuses([(TASK, panda_id)])
        fatal = second.rsplit("-", 1)[0] + "-1"
        self.assertEqual(recorded, {first: "finished", fatal: "failed", third: "sent"})
        self.assertEqual(await client.get_event_range_statuses([(TASK, 10**9)]), {})
        legacy = self.client(server, ApiMode.LEGACY)
        await self.assertFailure(
            Deferred.fromCoroutine(legacy.get_event_range_statuses([(TASK, panda_id)])), MethodNotFound
        )
        self.assertEqual(len(server.request_log.matching(STATUS_QUERY)), 2)


class RecordedTests(SynchronousTestCase):
    """``event_calls.check_recorded``: reported statuses against the server's."""

    def test_outcomes(self) -> None:
        statuses = [
            RangeStatus("1-2-3-1-10", "finished"),  # recorded
            RangeStatus("1-2-3-2-10", "finished"),  # rolled back: still sent
            RangeStatus("1-2-3-3-10", "finished"),  # the server holds another final status
            RangeStatus("1-2-3-4-10", "finished"),  # not this job's
            RangeStatus("1-2-3-5-10", "fatal"),  # listed as failed under attempt 1
            RangeStatus("1-2-3-6-10", "fatal"),  # not recorded
            RangeStatus("1-2-3-7-10", "running"),  # never recorded
            RangeStatus("not-a-range", "finished"),
        ]
        recorded = {
            "1-2-3-1-10": "finished",
            "1-2-3-2-10": "sent",
            "1-2-3-3-10": "failed",
            "1-2-3-5-1": "failed",
            "1-2-3-6-10": "running",
            "1-2-3-7-10": "sent",
        }
        settled, unrecorded = event_calls.check_recorded(statuses, recorded)
        self.assertEqual(
            settled,
            {"1-2-3-1-10": True, "1-2-3-3-10": False, "1-2-3-4-10": False, "1-2-3-5-10": True,
             "1-2-3-7-10": None, "not-a-range": False},
        )  # fmt: skip
        self.assertEqual(unrecorded, ("1-2-3-2-10", "1-2-3-6-10"))

    def test_range_job_and_query(self) -> None:
        self.assertEqual(event_calls.range_job("4242-17-3-1-10"), (4242, 17))
        for bad in ("4242-17-3-1", "a-17-3-1-10", "4242-17-3-1-１"):
            self.assertIsNone(event_calls.range_job(bad))
        self.assertEqual(
            event_calls.encode_statuses([(4242, 17)]), {"job_task_ids": '[{"task_id":4242,"panda_id":17}]'}
        )

    def test_reply_shapes(self) -> None:
        jobs = [(1, 2)]
        ok = {"success": True, "message": "", "data": {"2": {"1-2-3-4-5": {"status": "finished"}}}}
        self.assertEqual(event_calls.parse_statuses_reply(ok, jobs, "q"), {"1-2-3-4-5": "finished"})
        shapes: list[object] = [{}, {"2": []}, {"2": {"1-2-3-4-5": {"status": 3}}}, [1]]
        for data in shapes:
            document = {"success": True, "message": "", "data": data}
            self.assertRaises(ServerProtocolError, event_calls.parse_statuses_reply, document, jobs, "q")
        refused = {"success": False, "message": "database error in the PanDA server", "data": None}
        self.assertRaises(EventCallFailed, event_calls.parse_statuses_reply, refused, jobs, "q")

    def test_only(self) -> None:
        one, two = chunk([{"eventRangeID": "a"}, {"eventRangeID": "b"}]), chunk([{"eventRangeID": "c"}])
        update = EventRangeUpdate(7, chunks=(one, two))
        self.assertEqual(update.only(["b", "c"]).range_ids, ("b", "c"))
        self.assertEqual(update.only(["c"]).chunks, (two,))
        self.assertEqual(update.only(["a"]).chunks[0].lfn, one.lfn)
        statuses = EventRangeUpdate(7, statuses=(RangeStatus("a", "failed"), RangeStatus("b", "failed")))
        self.assertEqual(statuses.only(["b"]).statuses, (RangeStatus("b", "failed"),))


class DevServerEventTests(ServerCase):
    """The development server's own side: submission, inspection, delay."""

    async def test_submission_is_strict(self) -> None:
        server = await self.start()
        bad: list[dict[str, Any]] = [
            es_job(inFiles=[], GUID=[], scopeIn=[]),
            es_job(esRanges={"count": 0}),
            es_job(esRanges={"count": "5"}),
            es_job(esRanges={"count": 5, "eventsPerRange": True}),
            es_job(esRanges={"count": 5, "colour": "blue"}),
            es_job(esRanges=None),
            es_job(jobsetID=None),
            es_job(taskID=None),
            es_job(scopeIn=None),
            dict(es_job(), eventService=False),
        ]
        for job in bad:
            with self.assertRaises(ValueError, msg=str(job)):
                await server.submit(job)
        self.assertEqual(await server.jobs(), [])

    async def test_rendered_job_and_inspection_path(self) -> None:
        server = await self.start()
        client = self.client(server)
        await server.submit(
            es_job(esRanges={"count": 3, "eventsPerRange": 10, "firstEvent": 0, "attemptNr": 2})
        )
        result = await client.acquire_job(
            JobRequest(site_name=QUEUE, computing_element=QUEUE, prod_source_label="managed", node="wn")
        )
        job = result.jobs[0]
        self.assertEqual((job["eventService"], job["taskID"], job["jobsetID"]), ("True", TASK, JOBSET))
        self.assertNotIn("esRanges", json.dumps(job))
        panda_id = int(job["PandaID"])
        ranges = await self.ranges(client, panda_id, 1)
        self.assertEqual((ranges[0]["startEvent"], ranges[0]["lastEvent"]), (0, 9))
        self.assertTrue(ranges[0]["eventRangeID"].endswith("-0-2"))
        code, body = await self.raw(server, "GET", f"/dev/jobs/{panda_id}/events")
        view = json.loads(body)
        self.assertEqual(
            (code, view["PandaID"], view["jediTaskID"], view["jobsetID"]), (200, panda_id, TASK, JOBSET)
        )
        self.assertEqual(view["counts"], {"sent": 1, "ready": 2})
        self.assertEqual([r["startEvent"] for r in view["ranges"]], [0, 10, 20])
        self.assertEqual(view["ranges"][1]["eventRangeID"], None)  # not handed out yet
        code, _ = await self.raw(server, "GET", "/dev/jobs/999/events")
        self.assertEqual(code, 404)

    async def test_answer_delay(self) -> None:
        server = await self.start(event_delay=0.2)
        client = self.client(server)
        panda_id = await self.dispatched(server, client)
        started = reactor.seconds()
        await self.ranges(client, panda_id, 1)
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)


class OptionTests(SynchronousTestCase):
    def test_event_delay_option(self) -> None:
        options = Options()
        options.parseOptions(["--event-delay", "0.2"])
        self.assertEqual(options.config().event_delay, 0.2)
        self.assertRaises(UsageError, Options().parseOptions, ["--event-delay", "-1"])


class _NoStore:
    """An event store that answers at once (the delay is what is tested)."""

    async def available(self, jobset_id: object, task_id: object) -> int:
        return 7


class DelayTests(SynchronousTestCase):
    def test_delay_on_the_clock(self) -> None:
        clock = Clock()
        api = EventAPI(cast(EventStore, _NoStore()), cast(Any, None), clock, delay=0.2)
        args: dict[str, object] = {"job_id": 1, "jobset_id": 2, "task_id": 3, "timeout": 60}
        answer = Deferred.fromCoroutine(api.v1("get_available_event_range_count", args))
        self.assertNoResult(answer)
        clock.advance(0.2)
        self.assertEqual(self.successResultOf(answer), {"success": True, "message": "", "data": 7})
        self.assertRaises(ValueError, EventAPI, cast(EventStore, _NoStore()), cast(Any, None), clock, -1)


class ReplyShapeTests(SynchronousTestCase):
    """Replies the real servers do not send, through the client's real machinery."""

    def client(
        self, *replies: Scripted, api: ApiMode = ApiMode.V1
    ) -> tuple[PandaClient, ScriptedPanda, Clock]:
        clock = Clock()
        panda = ScriptedPanda(clock)
        panda.scripted.extend(replies)
        http = cast(HTTPClient, StubTreq(panda))
        return PandaClient(http, "https://panda.example.org", clock, api=api, retry=NO_JITTER), panda, clock

    def failure(self, client: PandaClient, call: Any) -> Any:
        return self.failureResultOf(Deferred.fromCoroutine(call)).value

    def test_truncated_and_wrongly_shaped_replies(self) -> None:
        request = EventRangeRequest(1, 2, 3, 4)
        update = EventRangeUpdate(1, statuses=(RangeStatus("1-1-1-1-1", "failed"),))
        cases: list[tuple[ApiMode, bytes, Any]] = [
            (ApiMode.V1, b'{"success": true, "message": "", "data": [{"eventRangeID": "1-1', "acquire"),
            (ApiMode.V1, b'{"success": true, "message": "", "data": {"eventRangeID": "1"}}', "acquire"),
            (ApiMode.V1, b'{"success": true, "data": ["1-1-1-1-1"]}', "acquire"),
            (ApiMode.LEGACY, b'{"StatusCode": 0}', "acquire"),
            (ApiMode.LEGACY, b'{"StatusCode": 0, "eventRanges": "[{\\"eventRangeID\\": "}', "acquire"),
            (ApiMode.LEGACY, b'{"StatusCode": 0, "Returns": "[1, 2]", "Command": "{}"}', "update"),
            (ApiMode.LEGACY, b'{"StatusCode": 0, "Returns": [true], "Command": "[]"}', "update"),
            (ApiMode.V1, b'{"success": true, "message": "", "data": {}}', "single"),
        ]
        for api, body, call in cases:
            client, _panda, _clock = self.client(Scripted(200, body), api=api)
            self.assertIsInstance(
                self.failure(client, _call(client, call, request, update)), ServerProtocolError, body
            )

    def test_refusals(self) -> None:
        client, _panda, _clock = self.client(Scripted(200, b'{"StatusCode": 30}'), api=ApiMode.LEGACY)
        error = self.failure(client, client.acquire_event_ranges(EventRangeRequest(1, 2, None, 4)))
        self.assertIsInstance(error, EventCallFailed)
        self.assertEqual(error.status.value, 30)
        database = b'{"success": false, "message": "database error in the PanDA server", "data": null}'
        client, _panda, _clock = self.client(Scripted(200, database))
        result = self.successResultOf(
            Deferred.fromCoroutine(client.update_single_event_range(RangeStatus("1-1-1-1-1", "finished"), 1))
        )
        self.assertEqual(result.accepted, {"1-1-1-1-1": False})

    def test_update_500s_are_not_repeated_but_503s_are(self) -> None:
        update = EventRangeUpdate(1, statuses=(RangeStatus("1-1-1-1-1", "failed"),))
        client, panda, _clock = self.client(Scripted(500, b"something else broke", "text/plain"))
        self.assertIsInstance(self.failure(client, client.update_event_ranges(update)), ServerRefused)
        self.assertEqual(len(panda.calls), 1)
        ok = b'{"success": true, "message": "", "data": {"Returns": [true], "Commands": {"1": "softkill"}}}'
        client, panda, clock = self.client(Scripted(503, b"busy", "text/plain"), Scripted(200, ok))
        answer = Deferred.fromCoroutine(client.update_event_ranges(update))
        clock.advance(1)
        result = self.successResultOf(answer)
        self.assertEqual(
            (len(panda.calls), result.accepted, result.command), (2, {"1-1-1-1-1": True}, "softkill")
        )
        # the legacy call's 500s come before anything was done there: the transport retries them
        failing = [Scripted(500, b"Type not serializable", "text/plain")] * 3
        client, panda, clock = self.client(*failing, api=ApiMode.LEGACY)
        answer = Deferred.fromCoroutine(client.update_event_ranges(update))
        clock.pump([1.0] * 5)
        self.assertIsInstance(self.failureResultOf(answer).value, ServerUnavailable)
        self.assertEqual(len(panda.calls), 3)


class HalfDeliveredTests(SynchronousTestCase):
    def test_a_report_that_failed_half_way_is_not_sent_twice(self) -> None:
        ok = Scripted(200, b'{"success": true, "message": "", "data": {"Command": "{\\"1\\": null}"}}')
        broken = Scripted(
            500, b"update_single_event_range() got an unexpected keyword argument 'x'", "text/plain"
        )
        panda = ScriptedPanda(Clock())
        panda.scripted.extend([ok, broken, ok])
        client = PandaClient(
            cast(HTTPClient, StubTreq(panda)), "https://panda.example.org", Clock(), retry=NO_JITTER
        )
        source = PandaServerSource(client)
        first, second = "1-1-1-1-10", "1-1-1-2-10"
        update = EventRangeUpdate(1, statuses=(RangeStatus(first, "failed"), RangeStatus(second, "failed")))
        self.failureResultOf(source.update_event_ranges(update), ServerRefused)
        result = self.successResultOf(source.update_event_ranges(update))
        self.assertEqual((result.accepted, result.how), ({first: True, second: True}, "single"))
        self.assertEqual([call.params["event_range_id"] for call in panda.calls], [first, second, second])


def _call(client: PandaClient, call: str, request: EventRangeRequest, update: EventRangeUpdate) -> Any:
    if call == "acquire":
        return client.acquire_event_ranges(request)
    if call == "update":
        return client.update_event_ranges(update)
    return client.update_single_event_range(update.statuses[0], 1)


class EncodingTests(SynchronousTestCase):
    def test_encodings_match_the_schemas(self) -> None:
        statuses = (
            RangeStatus("1-2-3-4-5", "failed", error_code=1220, cpu_seconds=1.5),
            RangeStatus("1-2-3-5-5", "running"),
        )
        archive = ArchiveChunk("a.tar", 10, "0a1b2c3d", 2, statuses, objstore_id=4)
        for api, name in ((ApiMode.LEGACY, "eventRanges"), (ApiMode.V1, "event_ranges")):
            v0 = event_calls.encode_update(EventRangeUpdate(2, statuses=statuses), api)
            v1 = event_calls.encode_update(EventRangeUpdate(2, chunks=(archive,)), api)
            self.assertEqual((v0["version"], v1["version"]), (0, 1))
            schema("event-update-v0").validate(json.loads(v0[name]))
            schema("event-update-v1").validate(json.loads(v1[name]))
        self.assertEqual(
            event_calls.encode_acquire(EventRangeRequest(1, 2, None, 8), ApiMode.LEGACY),
            {"pandaID": 1, "jobsetID": 2, "nRanges": 8},
        )
        self.assertEqual(
            event_calls.encode_acquire(EventRangeRequest(1, 2, 3, 8), ApiMode.V1),
            {"job_id": 1, "jobset_id": 2, "task_id": 3, "n_ranges": 8},
        )
        self.assertEqual(
            event_calls.encode_single(statuses[0], ApiMode.LEGACY),
            {"eventRangeID": "1-2-3-4-5", "eventStatus": "failed", "cpuConsumptionTime": 1.5},
        )
