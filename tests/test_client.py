"""Wire tests of the PanDA client: exact requests, reply parsing, retries, fallback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pilot.server.api import ApiMode
from pilot.server.client import (
    USER_AGENT,
    JobRequest,
    JobUpdate,
    MethodNotFound,
    PandaClient,
    RetryPolicy,
    ServerProtocolError,
    ServerRefused,
    ServerUnavailable,
    StatusCode,
    TokenAuth,
    decode_reply,
    parse_acquire_reply,
    parse_commands,
    parse_update_reply,
)

from .fakes import Scripted, ScriptedPanda

DATA = Path(__file__).parent / "data"
BASE = "https://panda.example.org:25443"
NO_JITTER = RetryPolicy(attempts=4, initial=2.0, maximum=60.0, jitter=lambda: 0.0)

REQUEST = JobRequest(
    site_name="SITE_A",
    computing_element="QUEUE_A",
    prod_source_label="managed",
    node="wn01.example.org",
    disk_space=20000,
    memory=16000,
    cpu=2400,
    resource_type="SCORE",
    remaining_time=3600,
)


def client_for(resource: Resource, clock: Clock, api: ApiMode = ApiMode.AUTO, **kw: Any) -> PandaClient:
    return PandaClient(StubTreq(resource), BASE, clock, api=api, retry=NO_JITTER, **kw)  # type: ignore[arg-type]


def run(d: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(d)


class RequestEncodingTests(SynchronousTestCase):
    """The bytes and headers on the wire, for both API generations."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = ScriptedPanda(self.clock)

    def test_v1_acquire_request(self) -> None:
        client = client_for(self.server, self.clock, ApiMode.V1)
        self.successResultOf(run(client.acquire_job(REQUEST)))
        (call,) = self.server.calls
        self.assertEqual(call.method, "POST")
        self.assertEqual(call.path, "/api/v1/pilot/acquire_jobs")
        self.assertEqual(call.headers["content-type"], ["application/json"])
        self.assertEqual(call.headers["accept"], ["application/json"])
        self.assertEqual(call.headers["content-encoding"], ["gzip"])
        self.assertEqual(call.headers["user-agent"], [USER_AGENT])
        self.assertNotIn("authorization", call.headers)
        self.assertEqual(
            json.loads(gzip.decompress(call.body)),
            {
                "site_name": "SITE_A",
                "computing_element": "QUEUE_A",
                "prod_source_label": "managed",
                "node": "wn01.example.org",
                "disk_space": 20000,
                "memory": 16000,
                "resource_type": "SCORE",
                "remaining_time": 3600,
            },
        )

    def test_legacy_getjob_request(self) -> None:
        client = client_for(self.server, self.clock, ApiMode.LEGACY)
        self.successResultOf(run(client.acquire_job(REQUEST)))
        (call,) = self.server.calls
        self.assertEqual(call.path, "/server/panda/getJob")
        self.assertEqual(call.headers["content-type"], ["application/json"])
        self.assertNotIn("content-encoding", call.headers)
        self.assertEqual(call.body[:2], b"\x1f\x8b", "legacy bodies are always gzip")
        self.assertEqual(
            json.loads(gzip.decompress(call.body)),
            {
                "siteName": "SITE_A",
                "computingElement": "QUEUE_A",
                "prodSourceLabel": "managed",
                "node": "wn01.example.org",
                "diskSpace": 20000,
                "mem": 16000,
                "cpu": 2400,
                "resourceType": "SCORE",
                "remaining_time": 3600,
            },
        )

    def _update(self) -> JobUpdate:
        return JobUpdate(
            job_id=4242,
            state="finished",
            attempt_nr=1,
            timestamp="2026-11-25T10:00:00+00:00",
            site_name="SITE_A",
            node="wn01",
            trans_exit_code=0,
            pilot_error_code=0,
            cpu_consumption_time=12,
            cpu_consumption_unit="s",
            core_count=8,
            job_output_report='{"a.root": {"guid": "g", "fsize": 1, "adler32": "00000001"}}',
            max_rss=2048,
        )

    def test_v1_update_request(self) -> None:
        client = client_for(self.server, self.clock, ApiMode.V1)
        result = self.successResultOf(run(client.update_job(self._update())))
        self.assertEqual(result.status, StatusCode.SUCCESS)
        (call,) = self.server.calls
        self.assertEqual(call.path, "/api/v1/pilot/update_job")
        body = json.loads(gzip.decompress(call.body))
        self.assertEqual(
            body,
            {
                "job_id": 4242,
                "job_status": "finished",
                "attempt_nr": 1,
                "site_name": "SITE_A",
                "node": "wn01",
                "trans_exit_code": 0,
                "pilot_error_code": 0,
                "cpu_consumption_time": 12,
                "cpu_consumption_unit": "s",
                "core_count": 8,
                "job_output_report": '{"a.root": {"guid": "g", "fsize": 1, "adler32": "00000001"}}',
                "max_rss": 2048,
            },
        )
        # The v1 server type-checks: ints must stay ints.
        self.assertIsInstance(body["job_id"], int)

    def test_legacy_update_request(self) -> None:
        client = client_for(self.server, self.clock, ApiMode.LEGACY)
        self.successResultOf(run(client.update_job(self._update())))
        (call,) = self.server.calls
        self.assertEqual(call.path, "/server/panda/updateJob")
        self.assertEqual(
            json.loads(gzip.decompress(call.body)),
            {
                "jobId": 4242,
                "state": "finished",
                "attemptNr": 1,
                "timestamp": "2026-11-25T10:00:00+00:00",
                "siteName": "SITE_A",
                "node": "wn01",
                "transExitCode": 0,
                "pilotErrorCode": 0,
                "cpuConsumptionTime": 12,
                "cpuConsumptionUnit": "s",
                "coreCount": 8,
                "xml": '{"a.root": {"guid": "g", "fsize": 1, "adler32": "00000001"}}',
                "maxRSS": 2048,
            },
        )

    def test_token_headers(self) -> None:
        token_file = Path(self.mktemp())
        token_file.write_text("eyJhbGciOi.secret.token\n")
        client = client_for(self.server, self.clock, ApiMode.V1, token=TokenAuth(token_file, "atlas"))
        self.successResultOf(run(client.acquire_job(REQUEST)))
        (call,) = self.server.calls
        self.assertEqual(call.headers["authorization"], ["Bearer eyJhbGciOi.secret.token"])
        self.assertEqual(call.headers["origin"], ["atlas"])

    def test_token_reread_when_renewed(self) -> None:
        token_file = Path(self.mktemp())
        token_file.write_text("first")
        auth = TokenAuth(token_file, None)
        self.assertEqual(auth.headers()[b"Authorization"], [b"Bearer first"])
        token_file.write_text("second")
        import os

        os.utime(token_file, (1, 1))
        self.assertEqual(auth.headers()[b"Authorization"], [b"Bearer second"])


class ReplyParsingTests(SynchronousTestCase):
    """Real server replies (samples captured from panda-server 1.0.4 / 0.8.1)."""

    def test_v1_sample(self) -> None:
        document = decode_reply(
            (DATA / "v1_acquire_jobs_response.json").read_bytes(), "application/json", "t"
        )
        result = parse_acquire_reply(document, ApiMode.V1)
        self.assertEqual(result.status, StatusCode.SUCCESS)
        self.assertEqual([j["PandaID"] for j in result.jobs], [1])

    def test_legacy_json_sample(self) -> None:
        document = decode_reply(
            (DATA / "legacy_getJob_response_json.json").read_bytes(), "application/json", "t"
        )
        result = parse_acquire_reply(document, ApiMode.LEGACY)
        self.assertEqual(result.jobs[0]["PandaID"], 3)
        self.assertEqual(result.jobs[0]["jobPars"], "hello from the real PanDA server")

    def test_legacy_urlencoded_sample(self) -> None:
        document = decode_reply((DATA / "legacy_getJob_response.txt").read_bytes(), "text/plain", "t")
        result = parse_acquire_reply(document, ApiMode.LEGACY)
        job = result.jobs[0]
        self.assertEqual(job["PandaID"], "5")
        self.assertEqual(job["transformation"], "/bin/echo")
        self.assertEqual(job["prodUserID"], "/C=XX/O=PandaTest/CN=testpilot")
        self.assertEqual(job["ddmEndPointOut"], ",")

    def test_status_codes_are_outcomes(self) -> None:
        cases: list[tuple[dict[str, Any], ApiMode, StatusCode]] = [
            ({"StatusCode": "20"}, ApiMode.LEGACY, StatusCode.NO_JOBS),
            ({"StatusCode": 10, "errorDialog": "database timeout"}, ApiMode.LEGACY, StatusCode.TIMEOUT),
            ({"StatusCode": "60"}, ApiMode.LEGACY, StatusCode.ROLE),
            ({"success": False, "message": "No jobs in PanDA", "data": None}, ApiMode.V1, StatusCode.NO_JOBS),
            ({"success": False, "message": "Timed out", "data": None}, ApiMode.V1, StatusCode.TIMEOUT),
            (
                {
                    "success": False,
                    "message": "no production/pilot role in VOMS FQANs or non pilot owner",
                    "data": None,
                },
                ApiMode.V1,
                StatusCode.ROLE,
            ),
            (
                {"success": False, "message": "SSL secure connection is required", "data": None},
                ApiMode.V1,
                StatusCode.PERMISSION,
            ),
            (
                {
                    "success": False,
                    "message": "Argument error: got an unexpected keyword argument 'x'",
                    "data": None,
                },
                ApiMode.V1,
                StatusCode.INVALID,
            ),
            ({"success": False, "message": "something new", "data": None}, ApiMode.V1, StatusCode.FAILED),
        ]
        for document, api, expected in cases:
            self.assertEqual(parse_acquire_reply(dict(document), api).status, expected, document)

    def test_update_replies(self) -> None:
        v1 = parse_update_reply(
            {
                "success": True,
                "message": "",
                "data": {"StatusCode": 0, "command": "debug,tobekilled", "pilotSecrets": "{}"},
            },
            ApiMode.V1,
        )
        self.assertEqual(v1.commands, ("debug", "tobekilled"))
        self.assertEqual(v1.pilot_secrets, "{}")
        self.assertNotIn("{}", repr(v1), "secrets stay out of reprs")
        legacy = parse_update_reply(
            decode_reply(b"StatusCode=0&command=NULL", "text/plain", "t"), ApiMode.LEGACY
        )
        self.assertEqual((legacy.status, legacy.commands), (StatusCode.SUCCESS, ()))
        invalid = parse_update_reply(
            {"success": False, "message": "Invalid job status: bogus", "data": {"StatusCode": 50}}, ApiMode.V1
        )
        self.assertEqual(invalid.status, StatusCode.INVALID)
        timeout = parse_update_reply(
            {"success": True, "message": "Timed out", "data": {"StatusCode": 10}}, ApiMode.V1
        )
        self.assertFalse(timeout.accepted)
        null_command = parse_update_reply(
            {"success": True, "message": "", "data": {"StatusCode": 0, "command": None}}, ApiMode.V1
        )
        self.assertEqual(null_command.commands, ())

    def test_parse_commands(self) -> None:
        self.assertEqual(parse_commands("NULL"), ())
        self.assertEqual(parse_commands(None), ())
        self.assertEqual(parse_commands(" softkill , "), ("softkill",))

    def test_malformed_replies_are_clear_errors(self) -> None:
        cases: list[tuple[bytes, str, str]] = [
            (b"<html><body>Internal Server Error</body></html>", "text/html", "HTML"),
            (
                b'{"success": true, "message": "", "data": {"StatusCode": 0, "jo',
                "application/json",
                "truncated",
            ),
            (b"{'success': True, 'message': '', 'data': None}", "text/plain", "Python repr"),
            (b"", "application/json", "empty"),
            (b"\x00\x01\x02", "application/octet-stream", "unrecognised"),
            (b"[1, 2, 3]", "application/json", "JSON object"),
            (b"Succeeded maybe", "text/plain", "unrecognised"),
        ]
        for body, content_type, needle in cases:
            error = self.assertRaises(ServerProtocolError, decode_reply, body, content_type, "acquire_jobs")
            self.assertIn(needle, str(error), body)
            self.assertIn("acquire_jobs", str(error))

    def test_wrong_shapes_are_clear_errors(self) -> None:
        cases: list[tuple[dict[str, Any], ApiMode]] = [
            ({"jobs": []}, ApiMode.V1),
            ({"success": "yes", "message": "", "data": {}}, ApiMode.V1),
            ({"success": True, "message": "", "data": [1]}, ApiMode.V1),
            ({"success": True, "message": "", "data": {"StatusCode": 0, "jobs": "nope"}}, ApiMode.V1),
            ({"success": True, "message": "", "data": {"StatusCode": 0, "jobs": [1, 2]}}, ApiMode.V1),
            ({"success": True, "message": "", "data": {"StatusCode": "zero", "jobs": []}}, ApiMode.V1),
            ({"StatusCode": 0}, ApiMode.LEGACY),
            ({"StatusCode": 7}, ApiMode.LEGACY),
            ({"PandaID": 1}, ApiMode.LEGACY),
            ({"StatusCode": True}, ApiMode.LEGACY),
        ]
        for document, api in cases:
            self.assertRaises(ServerProtocolError, parse_acquire_reply, document, api)
        self.assertRaises(
            ServerProtocolError, parse_update_reply, {"success": True, "message": "", "data": "x"}, ApiMode.V1
        )
        self.assertRaises(ServerProtocolError, parse_update_reply, {"command": "NULL"}, ApiMode.LEGACY)

    def test_malformed_reply_through_the_client(self) -> None:
        clock = Clock()
        server = ScriptedPanda(clock)
        server.scripted.append(Scripted(200, b"<html>proxy error</html>", "text/html"))
        client = client_for(server, clock, ApiMode.V1)
        failure = self.failureResultOf(run(client.acquire_job(REQUEST)), ServerProtocolError)
        self.assertIn("HTML", str(failure.value))
        self.assertEqual(len(server.calls), 1, "a malformed reply is not retried")


class RetryTests(SynchronousTestCase):
    """Retries with exponential backoff on the injected clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = ScriptedPanda(self.clock)

    def test_5xx_retried_with_backoff(self) -> None:
        self.server.scripted += [
            Scripted(503, b"busy", "text/plain"),
            Scripted(502, b"bad gateway", "text/plain"),
        ]
        client = client_for(self.server, self.clock, ApiMode.V1)
        d = run(client.update_job(JobUpdate(job_id=1, state="running")))
        self.assertNoResult(d)
        self.assertEqual([c.time for c in self.server.calls], [0.0])
        self.clock.advance(1.99)
        self.assertEqual(len(self.server.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.server.calls), 2)
        self.clock.advance(3.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        result = self.successResultOf(d)
        self.assertTrue(result.accepted)
        self.assertEqual([c.time for c in self.server.calls], [0.0, 2.0, 6.0])

    def test_429_retried_and_acquire_retried_after_5xx(self) -> None:
        self.server.scripted += [
            Scripted(429, b"slow down", "text/plain"),
            Scripted(500, b"oops", "text/plain"),
        ]
        self.server.jobs.append({"PandaID": 7, "transformation": "/bin/true"})
        client = client_for(self.server, self.clock, ApiMode.V1)
        d = run(client.acquire_job(REQUEST))
        self.clock.pump([2.0, 4.0])
        result = self.successResultOf(d)
        self.assertEqual(result.jobs[0]["PandaID"], 7)

    def test_gives_up_after_the_policy(self) -> None:
        self.server.scripted += [Scripted(503, b"busy", "text/plain")] * 4
        client = client_for(self.server, self.clock, ApiMode.V1)
        d = run(client.update_job(JobUpdate(job_id=1, state="running")))
        self.clock.pump([2.0, 4.0, 8.0])
        failure = self.failureResultOf(d, ServerUnavailable)
        self.assertIn("after 4 attempts", str(failure.value))
        self.assertEqual(len(self.server.calls), 4)

    def test_deterministic_server_errors_not_retried(self) -> None:
        for body in (
            b"updateJob() got an unexpected keyword argument 'bogus'",
            b"Not a gzipped file (b'{\"')",
        ):
            server = ScriptedPanda(self.clock)
            server.scripted.append(Scripted(500, body, "text/plain"))
            client = client_for(server, self.clock, ApiMode.LEGACY)
            failure = self.failureResultOf(
                run(client.update_job(JobUpdate(job_id=1, state="running"))), ServerRefused
            )
            self.assertEqual(failure.value.http_status, 500)
            self.assertEqual(len(server.calls), 1)

    def test_token_refused_not_retried(self) -> None:
        self.server.scripted.append(
            Scripted(403, b"ERROR : Token authentication failed. expired", "text/plain")
        )
        client = client_for(self.server, self.clock, ApiMode.V1)
        failure = self.failureResultOf(run(client.acquire_job(REQUEST)), ServerRefused)
        self.assertNotIsInstance(failure.value, MethodNotFound)
        self.assertEqual(
            str(failure.value),
            f"{BASE}/api/v1/pilot/acquire_jobs: HTTP 403 Forbidden: token authentication failed",
        )

    def test_timeout_of_an_update_is_retried(self) -> None:
        hanging = _Hanging()
        client = client_for(hanging, self.clock, ApiMode.V1, timeout=30.0)
        d = run(client.update_job(JobUpdate(job_id=1, state="running")))
        self.clock.advance(30.0)
        self.assertEqual(hanging.count, 1)
        self.clock.advance(2.0)
        self.assertEqual(hanging.count, 2)
        self.clock.pump([30.0, 4.0, 30.0, 8.0, 30.0])
        failure = self.failureResultOf(d, ServerUnavailable)
        self.assertIn("time-out", str(failure.value))

    def test_timeout_of_a_job_request_is_not_repeated(self) -> None:
        """A lost acquire reply may have dispatched a job: asking again could lose it."""
        hanging = _Hanging()
        client = client_for(hanging, self.clock, ApiMode.V1, timeout=30.0)
        d = run(client.acquire_job(REQUEST))
        self.clock.advance(30.0)
        failure = self.failureResultOf(d, ServerUnavailable)
        self.assertIn("not repeated", str(failure.value))
        self.assertEqual(hanging.count, 1)


class _Hanging(Resource):
    """A server that accepts requests and never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def render(self, request: Request) -> object:
        self.count += 1
        return NOT_DONE_YET


class FallbackTests(SynchronousTestCase):
    def test_auto_falls_back_to_legacy_for_good(self) -> None:
        clock = Clock()
        server = ScriptedPanda(clock, legacy_only=True)
        server.jobs.append({"PandaID": 9, "transformation": "/bin/true"})
        client = client_for(server, clock, ApiMode.AUTO)
        self.assertEqual(client.api, ApiMode.V1)
        result = self.successResultOf(run(client.acquire_job(REQUEST)))
        self.assertEqual(result.jobs[0]["PandaID"], 9)
        self.assertEqual(
            [c.path for c in server.calls], ["/api/v1/pilot/acquire_jobs", "/server/panda/getJob"]
        )
        self.assertEqual(client.api, ApiMode.LEGACY)
        self.successResultOf(run(client.update_job(JobUpdate(job_id=9, state="starting"))))
        self.assertEqual(server.calls[-1].path, "/server/panda/updateJob")

    def test_explicit_v1_does_not_fall_back(self) -> None:
        clock = Clock()
        server = ScriptedPanda(clock, legacy_only=True)
        client = client_for(server, clock, ApiMode.V1)
        self.failureResultOf(run(client.acquire_job(REQUEST)), MethodNotFound)

    def test_timeout_error_type(self) -> None:
        # The client maps Deferred time-outs to a readable reason.
        from pilot.server.client import describe

        self.assertEqual(describe(TimeoutError()), "no reply within the time-out")


class HostileReplyTests(SynchronousTestCase):
    """Replies built to crash or flood the pilot, and what the messages may show."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = ScriptedPanda(self.clock)

    def test_deeply_nested_reply_is_a_protocol_error(self) -> None:
        """100,000 levels of nesting raised RecursionError past every handler (exit 70)."""
        deep = b"[" * 100_000
        cases = [
            (ApiMode.V1, deep),
            (ApiMode.V1, b'{"success": true, "message": "", "data": ' + b'{"a": ' * 100_000),
            (ApiMode.LEGACY, b'{"StatusCode": 0, "jobs": ' + deep),
            (ApiMode.LEGACY, json.dumps({"StatusCode": "0", "jobs": "[" * 100_000}).encode()),
        ]
        for api, body in cases:
            server = ScriptedPanda(self.clock)
            server.scripted.append(Scripted(200, body, "application/json"))
            failure = self.failureResultOf(
                run(client_for(server, self.clock, api).acquire_job(REQUEST)), ServerProtocolError
            )
            self.assertIn("nested too deeply", str(failure.value))
            self.assertEqual(len(server.calls), 1)

    def test_error_bodies_never_quoted(self) -> None:
        secret = b"Bearer eyJSECRETBODY proxy=-----BEGIN RSA PRIVATE KEY-----"
        logged = capture(self)
        self.server.scripted += [Scripted(503, b"<html>" + secret + b"</html>", "text/html")] * 2
        self.server.scripted.append(Scripted(400, secret, "text/plain"))
        d = run(
            client_for(self.server, self.clock, ApiMode.V1).update_job(JobUpdate(job_id=1, state="running"))
        )
        self.clock.pump([2.0, 4.0])
        failure = self.failureResultOf(d, ServerRefused)
        self.assertEqual(str(failure.value), f"{BASE}/api/v1/pilot/update_job: HTTP 400 Bad Request")
        text = " ".join(formatEvent(e) + repr(e) for e in logged)
        self.assertNotIn("SECRETBODY", text)
        self.assertIn("HTTP 503 Service Unavailable", text)

    def test_v1_error_message_is_shown_cut_and_printable(self) -> None:
        message = "Internal problem\x1b[31m " + "x" * 300
        body = json.dumps({"success": False, "message": message, "data": None}).encode()
        self.server.scripted.append(Scripted(502, body, "application/json"))
        client = PandaClient(
            StubTreq(self.server),  # type: ignore[arg-type]
            BASE,
            self.clock,
            api=ApiMode.V1,
            retry=RetryPolicy(attempts=1),
        )
        failure = self.failureResultOf(run(client.update_job(JobUpdate(job_id=1, state="running"))))
        text = str(failure.value)
        self.assertIn("HTTP 502 Bad Gateway: Internal problem?[31m xxx", text)
        self.assertTrue(text.endswith("... (after 1 attempts)"), text)
        self.assertLess(len(text), 400)

    def test_404_names_the_full_url_once(self) -> None:
        url = f"{BASE}/wrong/prefix/cache/schedconfig/Q.all.json"
        failure = self.failureResultOf(
            run(client_for(Resource(), self.clock, ApiMode.V1).get_bytes(url)), MethodNotFound
        )
        self.assertEqual(
            str(failure.value), f"{url}: HTTP 404 Not Found (check the server URL and its path prefix)"
        )

    def test_cancellation_propagates_and_is_not_retried(self) -> None:
        hanging = _Hanging()
        client = client_for(hanging, self.clock, ApiMode.V1, timeout=30.0)
        d = run(client.update_job(JobUpdate(job_id=1, state="running")))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(100.0)
        self.assertEqual(hanging.count, 1)


def capture(test: SynchronousTestCase) -> list[LogEvent]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class CancellationTests(SynchronousTestCase):
    def test_a_request_cancelled_while_connecting_is_a_cancellation(self) -> None:
        # Twisted fails a connection attempt cancelled mid-way with ConnectingCancelledError,
        # not CancelledError: a hurried final update must read it as "cancelled", not crash
        from twisted.internet.error import ConnectingCancelledError

        from pilot.server.transport import was_cancelled

        self.assertTrue(was_cancelled(ConnectingCancelledError(None)))
