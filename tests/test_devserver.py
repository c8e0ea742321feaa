"""Tests for the embedded PanDA development server (``pilot.devserver``).

Most tests talk real HTTPS on loopback with the generated PKI, presenting the RFC 3820
proxy as client certificate, and assert the exact bytes the real PanDA server would
send.  A few pure-logic tests are synchronous.
"""

from __future__ import annotations

import gzip
import json
import stat
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pilot.devserver import protocol
from pilot.devserver.auth import TokenGrant, clean_user_id
from pilot.devserver.files import file_reply
from pilot.devserver.jobdef import JobDefinitionError, normalise_job, render_job
from pilot.devserver.pki import PROXY_CERT_INFO_OID, generate_pki, subject_hash
from pilot.devserver.server import DevServer, start_dev_server
from pilot.localrun import child_environment

from .events import ProcessEndedFirst, exists, file_ready

reactor: Any = _reactor
SAMPLES = Path("/work/shared/reference/samples")
USER_DN = "/C=XX/O=PandaTest/CN=testpilot"
QUEUE = "DEV_QUEUE"
#: Key order of a dispatched job (jobdispatcher/Protocol.py:Response.appendJob + nSent).
SAMPLE_KEYS = [
    "StatusCode", "PandaID", "prodSourceLabel", "swRelease", "homepackage", "transformation", "jobName",
    "jobDefinitionID", "cloud", "inFiles", "dispatchDblock", "dispatchDBlockToken", "dispatchDBlockTokenForOut",
    "outFiles", "destinationDblock", "destinationDBlockToken", "prodDBlocks", "prodDBlockToken", "realDatasets",
    "realDatasetsIn", "fileDestinationSE", "logFile", "logGUID", "jobPars", "attemptNr", "GUID", "checksum",
    "fsize", "scopeIn", "scopeOut", "scopeLog", "ddmEndPointIn", "ddmEndPointOut", "destinationSE", "prodUserID",
    "maxCpuCount", "minRamCount", "maxDiskCount", "cmtConfig", "processingType", "transferType", "sourceSite",
    "currentPriority", "taskID", "coreCount", "jobsetID", "reqID", "nucleus", "maxWalltime", "resource_type",
    "ioIntensity", "ioIntensityUnit", "nSent",
]  # fmt: skip


def sample_job(**extra: object) -> dict[str, object]:
    """A job like the one behind the reference samples."""
    job: dict[str, object] = {
        "computingSite": QUEUE,
        "transformation": "/bin/echo",
        "jobPars": "hello from the real PanDA server",
        "outFiles": ["pilottest.out.txt"],
        "logFile": "pilottest.job.log.tgz",
        "swRelease": "Atlas-99.0.0",
        "homepackage": "AtlasProduction/99.0.0",
        "cloud": "WORLD",
        "destinationDBlockToken": "TEST_DATADISK",
        "scopeOut": "test",
        "scopeLog": "test",
        "minRamCount": 1000,
        "maxDiskCount": 100,
        "cmtConfig": "x86_64-el9-gcc13-opt",
        "currentPriority": 1000,
        "maxWalltime": 3600,
    }
    job.update(extra)
    return job


def good_report(job: Mapping[str, object]) -> str:
    """A job output report covering the job's outputs and its log."""
    report: dict[str, object] = {}
    for lfn in str(job["outFiles"]).split(","):
        guid = job["logGUID"] if lfn == job["logFile"] else "8a1b4c2e-0000-4000-8000-000000000001"
        report[lfn] = {"guid": guid, "fsize": 123, "adler32": "0a1b2c3d", "surl": f"file:///storage/{lfn}"}
    return json.dumps(report)


# -- client side: a TLS policy presenting the proxy (written here: the pilot's client is elsewhere) ----


@implementer(IPolicyForHTTPS)
class ProxyPolicy:
    """Trust the development CA; present a grid proxy (or a plain certificate, or none)."""

    def __init__(self, ca_pem: bytes, credential_pem: bytes | None) -> None:
        self._trust = Certificate.loadPEM(ca_pem)
        self._client: PrivateCertificate | None = None
        self._chain: list[Any] = []
        if credential_pem is not None:
            self._client = PrivateCertificate.loadPEM(credential_pem)
            certificates = x509.load_pem_x509_certificates(credential_pem)
            self._chain = [
                Certificate.loadPEM(c.public_bytes(Encoding.PEM)).original for c in certificates[1:]
            ]

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        extra = {"extraCertChain": self._chain} if self._chain else None
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust,
            clientCertificate=self._client,
            extraCertificateOptions=extra,
        )


class Reply:
    def __init__(self, code: int, headers: dict[str, str], body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.text, keep_blank_values=True))


class DevServerCase(TestCase):
    """Starts servers and clients and cleans both up."""

    async def start(self, state_dir: Path | None = None, **kwargs: Any) -> DevServer:
        kwargs.setdefault("queues", {QUEUE: {}})
        server = await start_dev_server(reactor, state_dir or Path(self.mktemp()), **kwargs)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def client(self, server: DevServer, credential: str | None = "proxy") -> HTTPClient:
        pki = server.pki
        pem = {"proxy": pki.client_proxy, "user": None, None: None}.get(credential)
        data: bytes | None
        if credential == "user":
            data = pki.client_cert.read_bytes() + pki.client_key.read_bytes()
        else:
            data = pem.read_bytes() if pem else None
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(
            Agent(reactor, contextFactory=ProxyPolicy(pki.ca_cert.read_bytes(), data), pool=pool)
        )

    async def call(
        self,
        client: HTTPClient,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        # bytes only: str header names would meet Twisted's bytes-keyed header cache (BytesWarning under -b)
        sent: dict[bytes | str, bytes | str] = {k.encode(): v.encode() for k, v in (headers or {}).items()}
        response = await client.request(method, url, data=body, headers=sent)
        content = await response.content()
        names = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return Reply(response.code, names, content)

    async def v1(
        self, client: HTTPClient, server: DevServer, path: str, params: Mapping[str, object]
    ) -> Reply:
        """A v1 POST as a careful client sends it: JSON body, JSON content type and accept."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        return await self.call(
            client, "POST", f"{server.url}/api/v1/{path}", json.dumps(params).encode(), headers
        )

    async def legacy(
        self,
        client: HTTPClient,
        server: DevServer,
        method: str,
        params: Mapping[str, object],
        *,
        as_json: bool = False,
    ) -> Reply:
        """A legacy POST: urlencoded form, or (pilot3 style) gzipped JSON with Accept: application/json."""
        url = f"{server.url}/server/panda/{method}"
        if as_json:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            return await self.call(client, "POST", url, gzip.compress(json.dumps(params).encode()), headers)
        body = urllib.parse.urlencode(params).encode()
        return await self.call(
            client, "POST", url, body, {"Content-Type": "application/x-www-form-urlencoded"}
        )

    async def acquire(self, client: HTTPClient, server: DevServer, **params: object) -> dict[str, Any]:
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, **params})
        document = reply.json()
        self.assertTrue(document["success"], document)
        job: dict[str, Any] = document["data"]["jobs"][0]
        return job

    async def update(self, client: HTTPClient, server: DevServer, **params: object) -> dict[str, Any]:
        reply = await self.v1(client, server, "pilot/update_job", params)
        result: dict[str, Any] = reply.json()
        return result


# -- both generations: happy paths and exact encodings -------------------------------------------------


class HappyPathTests(DevServerCase):
    async def test_v1_acquire_update_finish(self) -> None:
        """acquire_jobs returns the bulk form with the sample's keys; updates; the Adder finishes the job."""
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "node": "wn1"})
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.headers["content-type"], "text/plain")
        document = reply.json()
        self.assertEqual(list(document), ["success", "message", "data"])
        self.assertEqual((document["success"], document["message"]), (True, ""))
        self.assertEqual(list(document["data"]), ["StatusCode", "jobs"])
        job = document["data"]["jobs"][0]
        self.assertEqual(list(job), SAMPLE_KEYS)
        sample = json.loads((SAMPLES / "v1_acquire_jobs_response.json").read_text())["data"]["jobs"][0]
        generated = {
            "PandaID",
            "jobName",
            "jobDefinitionID",
            "outFiles",
            "logFile",
            "logGUID",
            "destinationDblock",
        }
        for key in set(SAMPLE_KEYS) - generated - {"realDatasets", "fileDestinationSE", "destinationSE"}:
            self.assertEqual((key, job[key]), (key, sample[key]))
        self.assertEqual(job["PandaID"], panda_id)
        self.assertEqual(job["outFiles"], "pilottest.out.txt,pilottest.job.log.tgz")
        self.assertEqual(job["fileDestinationSE"], f"{QUEUE},{QUEUE}")
        self.assertEqual((await server.job(panda_id))["jobStatus"], "sent")

        reply = await self.v1(
            client, server, "pilot/update_job", {"job_id": panda_id, "job_status": "running"}
        )
        self.assertEqual(
            reply.body, b'{"success": true, "message": "", "data": {"StatusCode": 0, "command": "NULL"}}'
        )
        final = {
            "job_id": panda_id,
            "job_status": "finished",
            "attempt_nr": 0,
            "trans_exit_code": 0,
            "job_output_report": good_report(job),
            "meta_data": '{"files": {}}',
            "max_rss": 12.5,
        }
        self.assertEqual((await self.update(client, server, **final))["data"]["command"], "NULL")
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished")
        self.assertEqual(view["jobOutputReport"], final["job_output_report"])
        self.assertEqual(view["metaData"], '{"files": {}}')
        self.assertEqual(view["transExitCode"], 0)
        updates = view["updates"]
        assert isinstance(updates, list)
        self.assertEqual([u["state"] for u in updates], ["running", "finished"])
        self.assertEqual(updates[1]["params"]["max_rss"], 12.5)
        self.assertEqual(updates[1]["api"], "v1")

    async def test_legacy_getjob_urlencoded_and_updatejob(self) -> None:
        """Legacy form POSTs: urlencoded replies in appendJob order, StatusCode=0&command=NULL."""
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE, "node": "wn1", "mem": "2000"})
        self.assertEqual(reply.headers["content-type"], "text/plain")
        self.assertTrue(reply.text.startswith(f"StatusCode=0&PandaID={panda_id}&prodSourceLabel=managed&"))
        pairs = urllib.parse.parse_qsl(reply.text, keep_blank_values=True)
        self.assertEqual([key for key, _ in pairs], SAMPLE_KEYS)
        fields = dict(pairs)
        self.assertEqual(fields["ioIntensity"], "None")
        self.assertEqual(fields["taskID"], "NULL")
        self.assertEqual(fields["ddmEndPointOut"], ",")
        self.assertEqual(fields["nSent"], "1")
        sample_text = (SAMPLES / "legacy_getJob_response.txt").read_text().strip()
        self.assertIn("&dispatchDBlockTokenForOut=NULL%2CNULL&", sample_text)
        self.assertIn("&dispatchDBlockTokenForOut=NULL%2CNULL&", reply.text)

        reply = await self.legacy(client, server, "updateJob", {"jobId": panda_id, "state": "running"})
        self.assertEqual((reply.code, reply.text), (200, "StatusCode=0&command=NULL"))
        report = good_report(fields)
        final = {
            "jobId": panda_id,
            "state": "finished",
            "xml": report,
            "attemptNr": "0",
            "pilotErrorCode": "0",
        }
        reply = await self.legacy(client, server, "updateJob", final)
        self.assertEqual(reply.text, "StatusCode=0&command=NULL")
        view = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished")
        updates = view["updates"]
        assert isinstance(updates, list)
        self.assertEqual(updates[-1]["params"]["xml"], report)
        self.assertEqual(updates[-1]["api"], "legacy")

    async def test_legacy_gzipped_json(self) -> None:
        """pilot3's encoding: gzipped JSON, booleans become "True"; JSON reply for Accept: application/json."""
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        reply = await self.legacy(
            client, server, "getJob", {"siteName": QUEUE, "getProxyKey": True}, as_json=True
        )
        self.assertEqual(reply.headers["content-type"], "application/json")
        job = reply.json()
        self.assertEqual(list(job), [*SAMPLE_KEYS, "credname", "myproxy"])
        self.assertIsNone(job["ioIntensity"])
        self.assertEqual(job["PandaID"], panda_id)
        self.assertEqual(server.request_log.last().params, {"siteName": QUEUE, "getProxyKey": "True"})
        reply = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "starting"}, as_json=True
        )
        self.assertEqual(reply.body, b'{"StatusCode": 0, "command": "NULL"}')

    async def test_bulk_requests(self) -> None:
        """n_jobs / nJobs give the bulk forms (legacy urlencoded: jobs as a JSON string)."""
        server = await self.start()
        ids = await server.submit([sample_job(), sample_job(), sample_job()])
        client = self.client(server)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "n_jobs": 2})
        self.assertEqual([job["PandaID"] for job in reply.json()["data"]["jobs"]], ids[:2])
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE, "nJobs": "5"})
        fields = reply.form()
        self.assertEqual(list(fields), ["StatusCode", "jobs"])
        self.assertEqual([job["PandaID"] for job in json.loads(fields["jobs"])], ids[2:])

    async def test_v1_python_repr_reply(self) -> None:
        """Without Content-Type/Accept exactly application/json, v1 answers with the Python repr."""
        server = await self.start()
        client = self.client(server)
        url = f"{server.url}/api/v1/system/is_alive"
        reply = await self.call(client, "GET", url)
        self.assertEqual(reply.text, "{'success': True, 'message': '', 'data': None}")
        reply = await self.call(client, "GET", url, headers={"Accept": "application/json, text/plain"})
        self.assertEqual(reply.text, "{'success': True, 'message': '', 'data': None}")
        reply = await self.call(client, "GET", url, headers={"Accept": "application/json"})
        self.assertEqual(reply.text, '{"success": true, "message": "", "data": null}')
        reply = await self.call(
            client, "POST", f"{server.url}/api/v1/pilot/acquire_jobs", b"site_name=" + QUEUE.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        self.assertEqual(reply.text, "{'success': False, 'message': 'No jobs in PanDA', 'data': None}")

    async def test_no_jobs(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE})
        self.assertEqual(reply.body, b'{"success": false, "message": "No jobs in PanDA", "data": null}')
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE})
        self.assertEqual(reply.text, "StatusCode=20")
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE}, as_json=True)
        self.assertEqual(reply.body, b'{"StatusCode": 20, "errorDialog": "no jobs in PanDA"}')

    async def test_worker_node_and_job_status(self) -> None:
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        node = {
            "site": "DEV",
            "host_name": "slot1@wn1.example.org",
            "cpu_model": "AMD EPYC",
            "clock_speed": 2400.0,
        }
        reply = await self.v1(client, server, "pilot/update_worker_node", node)
        self.assertEqual(
            reply.json(), {"success": True, "message": "Inserted new worker node.", "data": None}
        )
        gpu = {"site": "DEV", "host_name": "wn1", "vendor": "NVIDIA", "model": "A100", "count": 2}
        reply = await self.v1(client, server, "pilot/update_worker_node_gpu", gpu)
        self.assertEqual(reply.json()["message"], "Inserted new worker node GPU.")
        reply = await self.v1(client, server, "pilot/update_worker_node_gpu", gpu)
        self.assertEqual(reply.json()["message"], "Updated existing worker node GPU.")
        url = f"{server.url}/api/v1/pilot/get_job_status?job_ids={panda_id}&job_ids=999"
        reply = await self.call(client, "GET", url, headers={"Accept": "application/json"})
        self.assertEqual(
            reply.json()["data"],
            [
                {"job_id": panda_id, "status": "activated", "attempt_number": 0},
                {"job_id": 999, "status": "not found", "attempt_number": 0},
            ],
        )


# -- strictness ----------------------------------------------------------------------------------


class StrictnessTests(DevServerCase):
    async def test_legacy_uncompressed_json_is_500(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.call(
            client, "POST", f"{server.url}/server/panda/getJob", b'{"siteName": "DEV_QUEUE"}',
            {"Content-Type": "application/json"},
        )  # fmt: skip
        self.assertEqual((reply.code, reply.headers["content-type"]), (500, "text/plain"))
        self.assertEqual(reply.text, "Not a gzipped file (b'{\"')")

    async def test_legacy_unknown_or_missing_parameter_is_500(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.legacy(
            client, server, "updateJob", {"jobId": "1", "state": "running", "bogusParam": "x"}
        )
        self.assertEqual(
            (reply.code, reply.text), (500, "updateJob() got an unexpected keyword argument 'bogusParam'")
        )
        reply = await self.legacy(client, server, "getJob", {"node": "wn1"})
        self.assertEqual(
            (reply.code, reply.text), (500, "getJob() missing 1 required positional argument: 'siteName'")
        )
        reply = await self.legacy(client, server, "updateJob", {"jobId": "abc", "state": "running"})
        self.assertEqual((reply.code, reply.text), (500, "invalid literal for int() with base 10: 'abc'"))

    async def test_v1_argument_and_type_errors(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "bogus": 1})
        self.assertEqual(
            reply.json()["message"], "Argument error: got an unexpected keyword argument 'bogus'"
        )
        reply = await self.v1(client, server, "pilot/update_job", {"job_status": "running"})
        self.assertEqual(reply.json()["message"], "Argument error: missing a required argument: 'job_id'")
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "timeout": "60"})
        self.assertEqual(reply.json()["message"], "Type error: 'timeout' must be of type int, got str.")
        # a POST form keeps strings, so any int parameter fails the type check
        reply = await self.call(
            client, "POST", f"{server.url}/api/v1/pilot/acquire_jobs", f"site_name={QUEUE}&timeout=30".encode(),
            {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        )  # fmt: skip
        self.assertEqual(
            reply.body,
            b'{"success": false, "message": "Type error: \'timeout\' must be of type int, got str.", "data": null}',
        )
        # bool is an int for isinstance, as in the real check
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "memory": True})
        self.assertEqual(reply.json()["message"], "No jobs in PanDA")
        # "int | float" annotations have no __name__: the real server fails building the message
        reply = await self.v1(
            client, server, "pilot/update_job", {"job_id": 1, "job_status": "running", "max_rss": "1"}
        )
        self.assertEqual(
            (reply.code, reply.text), (500, "'types.UnionType' object has no attribute '__name__'")
        )
        reply = await self.v1(client, server, "pilot/update_job", {"job_id": 1, "job_status": "done"})
        self.assertEqual(
            reply.json(),
            {"success": False, "message": "Invalid job status: done", "data": {"StatusCode": 50}},
        )

    async def test_v1_gzip_needs_content_encoding(self) -> None:
        """v1 gunzips only with Content-Encoding: gzip; a charset parameter makes the body a (missing) form."""
        server = await self.start()
        await server.submit(sample_job())
        client = self.client(server)
        url = f"{server.url}/api/v1/pilot/acquire_jobs"
        body = gzip.compress(json.dumps({"site_name": QUEUE}).encode())
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        reply = await self.call(client, "POST", url, body, headers)
        self.assertEqual(reply.code, 500)
        reply = await self.call(client, "POST", url, body, {**headers, "Content-Encoding": "gzip"})
        self.assertTrue(reply.json()["success"])
        charset = {"Content-Type": "application/json; charset=UTF-8", "Accept": "application/json"}
        reply = await self.call(client, "POST", url, json.dumps({"site_name": QUEUE}).encode(), charset)
        self.assertEqual(reply.json()["message"], "Argument error: missing a required argument: 'site_name'")

    async def test_v1_wrong_http_method(self) -> None:
        server = await self.start()
        client = self.client(server)
        url = f"{server.url}/api/v1/pilot/acquire_jobs?site_name={QUEUE}"
        reply = await self.call(client, "GET", url, headers={"Accept": "application/json"})
        self.assertEqual(
            reply.json(), {"success": False, "message": "expecting POST, received GET", "data": None}
        )

    async def test_unknown_methods_are_403(self) -> None:
        server = await self.start()
        client = self.client(server)
        for path, method in [
            ("/server/panda/getStatus", "getStatus"),
            ("/api/v1/pilot/nope", "nope"),
            ("/api/v1/nomodule/acquire_jobs", "acquire_jobs"),
            ("/api/latest/pilot/acquire_jobs", "acquire_jobs"),
            ("/server/panda/getJob/extra", ""),
        ]:
            reply = await self.call(client, "POST", server.url + path)
            self.assertEqual((reply.code, reply.headers["content-type"]), (403, "text/plain"), path)
            self.assertEqual(reply.text, f"ERROR : method {method} is forbidden")
        reply = await self.call(client, "GET", server.url + "/elsewhere")
        self.assertEqual(reply.code, 404)

    async def test_garbage_bodies(self) -> None:
        """Malformed requests get the real server's error texts, never a traceback."""
        server = await self.start()
        client = self.client(server)
        json_headers = {"Content-Type": "application/json", "Accept": "application/json"}
        url = f"{server.url}/api/v1/pilot/acquire_jobs"
        reply = await self.call(client, "POST", url, b"{garbage", json_headers)
        expected = "ERROR : received invalid JSON : Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
        self.assertEqual((reply.code, reply.text), (500, expected))
        # not even decodable: json.loads raises UnicodeDecodeError, which the server's catch-all reports as is
        reply = await self.call(client, "POST", url, b"\x00{garbage", json_headers)
        expected = "'utf-16-be' codec can't decode byte 0x65 in position 8: truncated data"
        self.assertEqual((reply.code, reply.text), (500, expected))
        reply = await self.call(
            client, "POST", f"{server.url}/api/v1/pilot/acquire_jobs", b"[1, 2]", json_headers
        )
        self.assertEqual(
            reply.text,
            "pandaserver.api.v1.pilot_api.acquire_jobs() argument after ** must be a mapping, not list",
        )
        reply = await self.call(
            client, "POST", f"{server.url}/server/panda/getJob", gzip.compress(b"[1, 2]"), json_headers
        )
        self.assertEqual((reply.code, reply.text), (500, "list index out of range"))
        reply = await self.call(
            client, "POST", f"{server.url}/server/panda/getJob", b"\x1f\x8b\x08garbage", json_headers
        )
        self.assertEqual(reply.code, 500)
        self.assertNotIn("Traceback", reply.text)
        reply = await self.call(
            client, "POST", f"{server.url}/server/panda/getJob", b"--x\r\nbroken",
            {"Content-Type": "multipart/form-data; boundary=x"},
        )  # fmt: skip
        self.assertEqual(
            (reply.code, reply.text), (500, "getJob() missing 1 required positional argument: 'siteName'")
        )


# -- job logic -----------------------------------------------------------------------------------


class UpdateLogicTests(DevServerCase):
    async def _running_job(self, **extra: object) -> tuple[DevServer, HTTPClient, dict[str, Any]]:
        server = await self.start()
        await server.submit(sample_job(**extra))
        client = self.client(server)
        job = await self.acquire(client, server)
        return server, client, job

    async def test_wrong_attempt_number_and_unknown_job_are_killed(self) -> None:
        server, client, job = await self._running_job(attemptNr=2)
        reply = await self.update(client, server, job_id=job["PandaID"], job_status="running", attempt_nr=3)
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "tobekilled"})
        self.assertEqual((await server.job(job["PandaID"]))["jobStatus"], "sent")
        reply = await self.update(client, server, job_id=job["PandaID"], job_status="running", attempt_nr=2)
        self.assertEqual(reply["data"]["command"], "NULL")
        reply = await self.update(client, server, job_id=987654, job_status="running")
        self.assertEqual(reply["data"]["command"], "tobekilled")
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": job["PandaID"], "state": "running", "attemptNr": 0}
        )
        self.assertEqual(legacy.text, "StatusCode=0&command=tobekilled")

    async def test_failed_job_gets_alreadydone(self) -> None:
        server, client, job = await self._running_job()
        panda_id = job["PandaID"]
        await self.update(client, server, job_id=panda_id, job_status="running")
        reply = await self.update(
            client,
            server,
            job_id=panda_id,
            job_status="failed",
            pilot_error_code=1305,
            pilot_error_diag="boom",
        )
        self.assertEqual(reply["data"]["command"], "NULL")
        view = await server.job(panda_id)
        self.assertEqual(
            (view["jobStatus"], view["pilotErrorCode"], view["pilotErrorDiag"]), ("failed", 1305, "boom")
        )
        reply = await self.update(client, server, job_id=panda_id, job_status="running")
        self.assertEqual(reply["data"]["command"], "alreadydone")
        reply = await self.update(client, server, job_id=panda_id, job_status="failed")
        self.assertEqual(reply["data"]["command"], "alreadydone")

    async def test_finished_job_is_gone_and_state_rules(self) -> None:
        server, client, job = await self._running_job()
        panda_id = job["PandaID"]
        await self.update(client, server, job_id=panda_id, job_status="running")
        await self.update(client, server, job_id=panda_id, job_status="starting")
        self.assertEqual((await server.job(panda_id))["jobStatus"], "running")  # starting after running
        await self.update(
            client, server, job_id=panda_id, job_status="finished", job_output_report=good_report(job)
        )
        self.assertEqual((await server.job(panda_id))["jobStatus"], "finished")
        reply = await self.update(client, server, job_id=panda_id, job_status="running")
        self.assertEqual(reply["data"]["command"], "tobekilled")
        # legacy: an invalid state is silently accepted
        reply2 = await self.legacy(client, server, "updateJob", {"jobId": panda_id, "state": "exploded"})
        self.assertEqual(reply2.text, "StatusCode=0")

    async def test_adder_accepts_complete_report(self) -> None:
        server, client, job = await self._running_job()
        report = json.loads(good_report(job))
        report["pilottest.out.txt"] = {
            "guid": "g1",
            "fsize": "10",
            "md5sum": "0123456789abcdef0123456789abcdef",
        }
        await self.update(
            client, server, job_id=job["PandaID"], job_status="finished", job_output_report=json.dumps(report)
        )
        view = await server.job(job["PandaID"])
        self.assertEqual(
            (view["jobStatus"], view["ddmErrorDiag"], view["adderDiag"]), ("finished", None, None)
        )

    async def test_adder_fails_report_without_log(self) -> None:
        server, client, job = await self._running_job()
        report = json.loads(good_report(job))
        del report[job["logFile"]]
        await self.update(
            client, server, job_id=job["PandaID"], job_status="finished", job_output_report=json.dumps(report)
        )
        view = await server.job(job["PandaID"])
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["ddmErrorCode"], 200)
        self.assertEqual(view["ddmErrorDiag"], f"expected output {job['logFile']} is missing in pilot JSON")

    async def test_adder_fails_wrong_log_guid(self) -> None:
        server, client, job = await self._running_job()
        report = json.loads(good_report(job))
        report[job["logFile"]]["guid"] = "00000000-0000-0000-0000-000000000000"
        await self.update(
            client, server, job_id=job["PandaID"], job_status="finished", job_output_report=json.dumps(report)
        )
        view = await server.job(job["PandaID"])
        self.assertEqual((view["jobStatus"], view["ddmErrorCode"]), ("failed", 205))
        self.assertIn("is not the logGUID", str(view["ddmErrorDiag"]))

    async def test_adder_fails_unparsable_report(self) -> None:
        server, client, job = await self._running_job()
        await self.update(
            client, server, job_id=job["PandaID"], job_status="finished", job_output_report="{not json"
        )
        view = await server.job(job["PandaID"])
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["ddmErrorDiag"], "Could not get GUID/LFN/MD5/FSIZE/SURL from pilot JSON")
        self.assertTrue(str(view["adderDiag"]).startswith("Issue with parsing Job Output Report"))

    async def test_adder_needs_checksums(self) -> None:
        server, client, job = await self._running_job()
        report = json.loads(good_report(job))
        report[job["logFile"]].pop("adler32")
        await self.update(
            client, server, job_id=job["PandaID"], job_status="finished", job_output_report=json.dumps(report)
        )
        view = await server.job(job["PandaID"])
        self.assertEqual(view["jobStatus"], "failed")
        self.assertIn("fsize/md5sum/adler32/surl=None", str(view["adderDiag"]))

    async def test_updates_are_recorded_as_sent(self) -> None:
        server, client, job = await self._running_job()
        panda_id = job["PandaID"]
        legacy = {"jobId": str(panda_id), "state": "running", "node": "wn1", "cpuConsumptionTime": "12"}
        await self.legacy(client, server, "updateJob", legacy)
        await self.update(client, server, job_id=panda_id, job_status="running", core_count=4)
        await self.legacy(client, server, "updateJob", {"jobId": str(panda_id), "state": "exploded"})
        view = await server.job(panda_id)
        updates = view["updates"]
        assert isinstance(updates, list)
        self.assertEqual(
            [u["params"] for u in updates],
            [
                legacy,
                {"job_id": panda_id, "job_status": "running", "core_count": 4},
                {"jobId": str(panda_id), "state": "exploded"},
            ],
        )
        self.assertEqual([u["command"] for u in updates], ["NULL", "NULL", None])
        fields = view["pilotFields"]
        assert isinstance(fields, dict)
        self.assertEqual(
            (fields["modificationHost"], fields["cpuConsumptionTime"], fields["actualCoreCount"]),
            ("wn1", "12", 4),
        )
        self.assertEqual((view["modificationHost"], view["jobStatus"]), ("wn1", "running"))

    async def test_metadata_for_unknown_job(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.update(client, server, job_id=31337, job_status="running", meta_data="{}")
        message = "Failed to add meta_data"
        self.assertEqual(
            reply, {"success": True, "message": message, "data": {"StatusCode": 30, "ErrorDiag": message}}
        )
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": "31337", "state": "running", "metaData": "{}"}
        )
        self.assertEqual(legacy.text, "StatusCode=0")

    async def test_commands_and_debug(self) -> None:
        server = await self.start()
        [panda_id] = await server.submit(sample_job(debug=True))
        client = self.client(server)
        job = await self.acquire(client, server)
        self.assertEqual(job["debug"], "True")
        self.assertEqual(list(job)[-4:], ["debug", "ioIntensity", "ioIntensityUnit", "nSent"])
        reply = await self.v1(
            client, server, "pilot/update_job", {"job_id": panda_id, "job_status": "running"}
        )
        self.assertEqual(
            reply.body,
            b'{"success": true, "message": "", "data": {"StatusCode": 0, "pilotSecrets": "{}", "command": "debug"}}',
        )
        await server.set_command(panda_id, "tobekilled")
        legacy = await self.legacy(client, server, "updateJob", {"jobId": panda_id, "state": "running"})
        self.assertEqual(legacy.text, "StatusCode=0&command=debug%2Ctobekilled&pilotSecrets=%7B%7D")
        await server.set_debug(panda_id, False)
        await server.set_command(panda_id, "softkill")
        self.assertEqual(
            (await self.update(client, server, job_id=panda_id, job_status="running"))["data"]["command"],
            "softkill",
        )
        await server.set_command(panda_id, None)
        self.assertEqual(
            (await self.update(client, server, job_id=panda_id, job_status="running"))["data"]["command"],
            "NULL",
        )
        with self.assertRaises(KeyError):
            await server.set_command(4242, "tobekilled")

    async def test_selection_rules(self) -> None:
        server = await self.start(queues={QUEUE: {}, "TEST_QUEUE": {"status": "test"}})
        big, user, mcore = await server.submit(
            [
                sample_job(minRamCount=4000, maxDiskCount=5000, maxWalltime=7200),
                sample_job(prodSourceLabel="user"),
                sample_job(coreCount=8),
            ]
        )
        test_job = (await server.submit(sample_job(computingSite="TEST_QUEUE", prodSourceLabel="test")))[0]
        client = self.client(server)
        no_job = {"success": False, "message": "No jobs in PanDA", "data": None}
        for limits in (
            {"memory": 2000},
            {"disk_space": 1000},
            {"remaining_time": 3600},
            {"prod_source_label": "user", "resource_type": "MCORE"},
        ):
            reply = await self.v1(
                client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "resource_type": "SCORE", **limits}
            )
            self.assertEqual(reply.json(), no_job, limits)
        self.assertEqual((await self.acquire(client, server, resource_type="MCORE"))["PandaID"], mcore)
        self.assertEqual((await self.acquire(client, server, prod_source_label="user"))["PandaID"], user)
        self.assertEqual((await self.acquire(client, server, memory=0, remaining_time=0))["PandaID"], big)
        # a queue in test status only hands out test jobs, whatever the pilot asks for
        reply = await self.v1(
            client, server, "pilot/acquire_jobs", {"site_name": "TEST_QUEUE", "prod_source_label": "managed"}
        )
        self.assertEqual(reply.json()["data"]["jobs"][0]["PandaID"], test_job)


# -- authentication --------------------------------------------------------------------------------


class ColumnWidthTests(DevServerCase):
    """Values wider than their column, treated as the real server's database treats them.

    Widths are bytes of UTF-8 (Oracle ``VARCHAR2(n BYTE)``); the server's own slicing is
    in characters.  Three classes: columns the server slices itself (stored cut), columns
    it writes unsliced (the whole update is rolled back: StatusCode 30), and the debug
    tail (``jobsDebug.stdOut``: lost alone, the update goes on).
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def refusals(self) -> list[tuple[str, str]]:
        return [
            (str(event["column"]), str(event["reason"]))
            for event in self.events
            if event.get("event") == "devserver.value_refused"
        ]

    async def pilot_fields(self, server: DevServer, panda_id: int) -> dict[str, Any]:
        fields = (await server.job(panda_id))["pilotFields"]
        assert isinstance(fields, dict)
        return fields

    async def _sent_job(self) -> tuple[DevServer, HTTPClient, int]:
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        await self.acquire(client, server)
        return server, client, panda_id

    async def test_columns_the_server_slices(self) -> None:
        """pilotErrorDiag [:500] in the API, jobSubStatus [:80] in updateJobStatus: stored cut, StatusCode 0."""
        server, client, panda_id = await self._sent_job()
        reply = await self.update(
            client, server, job_id=panda_id, job_status="running",
            pilot_error_diag="d" * 600, job_sub_status="s" * 100,
        )  # fmt: skip
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        view = await server.job(panda_id)
        self.assertEqual((view["jobStatus"], view["pilotErrorDiag"]), ("running", "d" * 500))
        self.assertEqual((await self.pilot_fields(server, panda_id))["jobSubStatus"], "s" * 80)
        legacy = await self.legacy(
            client, server, "updateJob",
            {"jobId": panda_id, "state": "running", "jobSubStatus": "t" * 90, "exeErrorDiag": "e" * 501},
        )  # fmt: skip
        self.assertEqual(legacy.text, "StatusCode=0&command=NULL")
        self.assertEqual((await self.pilot_fields(server, panda_id))["jobSubStatus"], "t" * 80)
        self.assertEqual((await server.job(panda_id))["exeErrorDiag"], "e" * 500)
        self.assertEqual(self.refusals(), [])

    async def test_sliced_to_characters_is_still_too_many_bytes(self) -> None:
        """500 characters of "é" are 1000 bytes: the UPDATE fails after the server's own [:500]."""
        server, client, panda_id = await self._sent_job()
        reply = await self.v1(
            client, server, "pilot/update_job",
            {"job_id": panda_id, "job_status": "running", "pilot_error_diag": "é" * 600},
        )  # fmt: skip
        self.assertEqual(
            reply.body, b'{"success": true, "message": "Database error", "data": {"StatusCode": 30}}'
        )
        view = await server.job(panda_id)
        self.assertEqual((view["jobStatus"], view["pilotErrorDiag"]), ("sent", None))
        self.assertEqual(self.refusals(), [("jobsActive4.pilotErrorDiag", "1000 bytes > 500")])
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running", "pilotErrorDiag": "é" * 500}
        )
        self.assertEqual(legacy.text, "StatusCode=30")
        legacy = await self.legacy(
            client, server, "updateJob",
            {"jobId": panda_id, "state": "running", "pilotErrorDiag": "é" * 250}, as_json=True,
        )  # fmt: skip
        self.assertEqual(legacy.body, b'{"StatusCode": 0, "command": "NULL"}')
        self.assertEqual((await server.job(panda_id))["pilotErrorDiag"], "é" * 250)

    async def test_unsliced_columns_lose_the_whole_update(self) -> None:
        """pilotTiming (100), schedulerID and cpuConsumptionUnit (128) are not sliced: a final update is lost."""
        server, client, panda_id = await self._sent_job()
        job = (await server.job(panda_id))["job"]
        assert isinstance(job, dict)
        final = {
            "job_id": panda_id,
            "job_status": "finished",
            "job_output_report": good_report(job),
            "pilot_error_diag": "fine",
        }
        for name, width in (("pilot_timing", 100), ("scheduler_id", 128), ("cpu_consumption_unit", 128)):
            reply = await self.update(client, server, **final, **{name: "1|" * (width // 2) + "x"})
            self.assertEqual((reply["message"], reply["data"]), ("Database error", {"StatusCode": 30}))
        view = await server.job(panda_id)
        self.assertEqual(
            (view["jobStatus"], view["jobOutputReport"], view["pilotErrorDiag"]), ("sent", None, None)
        )
        self.assertEqual(
            [column for column, _ in self.refusals()],
            ["jobsActive4.pilotTiming", "jobsActive4.schedulerID", "jobsActive4.cpuConsumptionUnit"],
        )
        updates = view["updates"]
        assert isinstance(updates, list)
        self.assertEqual([u["command"] for u in updates], [None, None, None])  # received, not stored
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running", "pilotTiming": "9" * 101}
        )
        self.assertEqual(legacy.text, "StatusCode=30")
        # exactly the width is fine, and the Adder then sees the report
        reply = await self.update(client, server, **final, pilot_timing="1" * 100)
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        self.assertEqual((await server.job(panda_id))["jobStatus"], "finished")

    async def test_nul_and_lone_surrogates_are_refused(self) -> None:
        """PostgreSQL refuses NUL, no driver encodes a lone surrogate: both lose the update."""
        server, client, panda_id = await self._sent_job()
        for diag in ("a\0b", "a\ud800b"):
            reply = await self.update(
                client, server, job_id=panda_id, job_status="running", exe_error_diag=diag
            )
            self.assertEqual(reply["data"], {"StatusCode": 30})
        self.assertEqual(
            self.refusals(),
            [
                ("jobsActive4.exeErrorDiag", "contains NUL"),
                ("jobsActive4.exeErrorDiag", "not valid Unicode (a lone surrogate)"),
            ],
        )
        self.assertEqual((await server.job(panda_id))["jobStatus"], "sent")

    async def test_debug_tail_too_long_is_lost_alone(self) -> None:
        """jobsDebug.stdOut is 2048 bytes, written on its own: a longer tail is dropped, the update goes on."""
        server, client, panda_id = await self._sent_job()
        reply = await self.update(client, server, job_id=panda_id, job_status="running", stdout="x" * 2048)
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        reply = await self.update(
            client, server, job_id=panda_id, job_status="running", stdout="y" * 2049, pilot_timing="1|2"
        )
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        fields = await self.pilot_fields(server, panda_id)
        self.assertEqual(fields["stdout"], "x" * 2048)  # the earlier tail stays
        self.assertEqual(fields["pilotTiming"], "1|2")  # the rest of the update is stored
        self.assertEqual(self.refusals(), [("jobsDebug.stdOut", "2049 bytes > 2048")])
        # legacy (0.8.1) slices the tail to 2048 characters first: ASCII fits, "é" does not
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running", "stdout": "z" * 3000}
        )
        self.assertEqual(legacy.text, "StatusCode=0&command=NULL")
        self.assertEqual((await self.pilot_fields(server, panda_id))["stdout"], "z" * 2048)
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running", "stdout": "é" * 3000}
        )
        self.assertEqual(legacy.text, "StatusCode=0&command=NULL")
        self.assertEqual((await self.pilot_fields(server, panda_id))["stdout"], "z" * 2048)
        self.assertEqual(self.refusals()[-1], ("jobsDebug.stdOut", "4096 bytes > 2048"))

    async def test_pilot_log_too_long_is_lost_alone(self) -> None:
        """PANDALOG.MESSAGE is 4000 bytes, the server slices 4000 characters: multi-byte text is refused."""
        server, client, panda_id = await self._sent_job()
        reply = await self.update(client, server, job_id=panda_id, job_status="running", pilot_log="x" * 5000)
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        self.assertEqual(self.refusals(), [])
        reply = await self.update(
            client, server, job_id=panda_id, job_status="starting", pilot_log="é" * 2001
        )
        self.assertEqual(reply["data"], {"StatusCode": 0, "command": "NULL"})
        legacy = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running", "pilotLog": "€" * 1334}
        )
        self.assertEqual(legacy.text, "StatusCode=0&command=NULL")
        self.assertEqual(
            self.refusals(),
            [("PANDALOG.MESSAGE", "4002 bytes > 4000"), ("PANDALOG.MESSAGE", "4002 bytes > 4000")],
        )
        self.assertEqual((await server.job(panda_id))["jobStatus"], "running")

    async def test_dispatch_columns(self) -> None:
        """getJobs writes node, computingElement, schedulerID unsliced: too long, and there is no job."""
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server)
        reply = await self.v1(
            client, server, "pilot/acquire_jobs", {"site_name": QUEUE, "computing_element": "c" * 129}
        )
        self.assertEqual(reply.body, b'{"success": false, "message": "No jobs in PanDA", "data": null}')
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE, "node": "n" * 129})
        self.assertEqual(reply.text, "StatusCode=20")
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE, "schedulerID": "é" * 65})
        self.assertEqual(reply.text, "StatusCode=20")
        self.assertEqual((await server.job(panda_id))["jobStatus"], "activated")
        self.assertEqual(
            self.refusals(),
            [
                ("computingElement", "129 bytes > 128"),
                ("modificationHost", "129 bytes > 128"),
                ("schedulerID", "130 bytes > 128"),
            ],
        )
        job = await self.acquire(client, server, computing_element="c" * 128, node="n" * 128)
        self.assertEqual(job["PandaID"], panda_id)
        view = await server.job(panda_id)
        self.assertEqual((view["computingElement"], view["modificationHost"]), ("c" * 128, "n" * 128))


class AuthTests(DevServerCase):
    async def test_without_client_certificate(self) -> None:
        server = await self.start()
        [panda_id] = await server.submit(sample_job())
        client = self.client(server, credential=None)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE})
        self.assertEqual(
            reply.body, b'{"success": false, "message": "SSL secure connection is required", "data": null}'
        )
        reply = await self.legacy(client, server, "updateJob", {"jobId": panda_id, "state": "running"})
        self.assertEqual(reply.text, "StatusCode=60")
        reply = await self.legacy(
            client, server, "updateJob", {"jobId": panda_id, "state": "running"}, as_json=True
        )
        self.assertEqual(
            reply.json(),
            {"StatusCode": 60, "errorDialog": "no production/pilot role in VOMS FQANs or non pilot owner"},
        )
        reply = await self.legacy(client, server, "getJob", {"siteName": QUEUE})
        self.assertEqual(reply.text, "StatusCode=60")
        reply = await self.call(
            client, "GET", f"{server.url}/api/v1/system/is_alive", headers={"Accept": "application/json"}
        )
        self.assertTrue(reply.json()["success"])
        reply = await self.call(client, "GET", f"{server.url}/dev/jobs")
        self.assertEqual(reply.code, 403)
        self.assertEqual((await server.job(panda_id))["jobStatus"], "activated")

    async def test_proxy_is_accepted_and_dn_is_bare(self) -> None:
        server = await self.start()
        proxy, user = x509.load_pem_x509_certificates(server.pki.client_proxy.read_bytes())
        self.assertEqual(proxy.issuer, user.subject)
        self.assertEqual(len(proxy.subject.rdns), len(user.subject.rdns) + 1)
        for credential in ("proxy", "user"):
            client = self.client(server, credential=credential)
            reply = await self.call(client, "GET", f"{server.url}/api/v1/system/is_alive")
            self.assertEqual(reply.code, 200)
            self.assertEqual(server.request_log.last().dn, USER_DN, credential)
        self.assertEqual(server.pki.user_dn, USER_DN)

    async def test_non_production_dn(self) -> None:
        """A caller without the production role gets only user jobs, and only its own."""
        server = await self.start(production_dns=["/CN=somebody-else"])
        mine, _other = await server.submit(
            [sample_job(prodSourceLabel="user"), sample_job(prodSourceLabel="user", prodUserID="/CN=other")]
        )
        client = self.client(server)
        reply = await self.v1(client, server, "pilot/acquire_jobs", {"site_name": QUEUE})
        self.assertEqual(reply.json()["message"], "no production/pilot role in VOMS FQANs or non pilot owner")
        job = await self.acquire(client, server, prod_source_label="user", prod_user_id="/CN=other")
        self.assertEqual(job["PandaID"], mine)
        reply = await self.v1(client, server, "pilot/update_job", {"job_id": mine, "job_status": "running"})
        self.assertEqual(reply.json()["message"], "production or pilot role required")
        legacy = await self.legacy(client, server, "updateJob", {"jobId": mine, "state": "running"})
        self.assertEqual(legacy.text, "StatusCode=60")

    async def test_tokens(self) -> None:
        server = await self.start(tokens=["s3cret:atlas", TokenGrant("weak", vo="atlas", production=False)])
        [panda_id] = await server.submit(sample_job())
        client = self.client(server, credential=None)
        url = f"{server.url}/api/v1/pilot/acquire_jobs"
        body = json.dumps({"site_name": QUEUE}).encode()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer s3cret", "Origin": "atlas"}
        reply = await self.call(client, "POST", url, body, headers)
        self.assertEqual(reply.json()["data"]["jobs"][0]["PandaID"], panda_id)
        self.assertTrue(str(server.request_log.last().dn).startswith("/CN=token:"))
        refusals = [
            (
                {"Authorization": "Bearer wrong", "Origin": "atlas"},
                "Invalid token. Signature verification failed",
            ),
            ({"Authorization": "Bearer s3cret", "Origin": "cms"}, "Unknown vo : cms"),
            ({"Authorization": "Bearer s3cret"}, "Token decode failure. no VO given in the Origin header"),
            (
                {"Authorization": "Bearer weak", "Origin": "atlas:production"},
                "Not a member of the atlas/production group",
            ),
        ]
        for extra, reason in refusals:
            reply = await self.call(client, "POST", url, body, {"Content-Type": "application/json", **extra})
            self.assertEqual(
                (reply.code, reply.text), (403, f"ERROR : Token authentication failed. {reason}")
            )
        weak = {"Content-Type": "application/json", "Authorization": "Bearer weak", "Origin": "atlas"}
        reply = await self.call(client, "POST", url, body, weak)
        self.assertEqual(reply.json()["message"], "no production/pilot role in VOMS FQANs or non pilot owner")

    async def test_plain_http(self) -> None:
        server = await self.start(plain_http=True)
        self.assertTrue(server.url.startswith("http://localhost:"))
        [panda_id] = await server.submit(sample_job())
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        job = await self.acquire(client, server)
        self.assertEqual(job["PandaID"], panda_id)
        self.assertEqual(server.request_log.last().dn, USER_DN)


# -- development API, queuedata, request log, persistence ---------------------------------------------


class ServiceTests(DevServerCase):
    async def test_development_api(self) -> None:
        server = await self.start()
        client = self.client(server)
        reply = await self.call(
            client, "POST", f"{server.url}/dev/jobs", json.dumps([sample_job(), sample_job()]).encode()
        )
        ids = reply.json()["PandaIDs"]
        self.assertEqual(len(ids), 2)
        reply = await self.call(
            client, "POST", f"{server.url}/dev/jobs", json.dumps({"77": sample_job()}).encode()
        )
        self.assertEqual(reply.json(), {"PandaIDs": [77]})
        reply = await self.call(
            client, "POST", f"{server.url}/dev/jobs", json.dumps({"77": sample_job()}).encode()
        )
        self.assertEqual((reply.code, reply.json()), (400, {"error": "PandaID 77 already exists"}))
        reply = await self.call(
            client, "POST", f"{server.url}/dev/jobs", json.dumps(sample_job(bogus=1)).encode()
        )
        self.assertEqual((reply.code, reply.json()), (400, {"error": "job 0: unknown job field(s): bogus"}))
        reply = await self.call(
            client, "POST", f"{server.url}/dev/jobs/{ids[0]}/command", b'{"command": "tobekilled"}'
        )
        self.assertEqual(reply.code, 200)
        reply = await self.call(client, "POST", f"{server.url}/dev/jobs/{ids[0]}/debug", b'{"debug": true}')
        self.assertEqual(reply.code, 200)
        reply = await self.call(client, "GET", f"{server.url}/dev/jobs/{ids[0]}")
        view = reply.json()
        self.assertEqual(
            (view["commandToPilot"], view["debug"], view["jobStatus"]), ("tobekilled", True, "activated")
        )
        self.assertEqual(view["job"]["debug"], "True")
        reply = await self.call(client, "GET", f"{server.url}/dev/jobs?status=activated")
        self.assertEqual([job["PandaID"] for job in reply.json()["jobs"]], [*ids, 77])
        reply = await self.call(client, "GET", f"{server.url}/dev/jobs/12345")
        self.assertEqual(reply.code, 404)

    async def test_queuedata(self) -> None:
        server = await self.start(queues={QUEUE: {}, "OTHER": {"maxrss": 4000}}, timefloor=30)
        client = self.client(server, credential=None)
        reply = await self.call(client, "GET", f"{server.url}/cache/schedconfig/{QUEUE}.all.json")
        self.assertEqual((reply.code, reply.headers["content-type"]), (200, "application/json"))
        queue = reply.json()
        self.assertEqual((queue["nickname"], queue["panda_resource"], queue["timefloor"]), (QUEUE, QUEUE, 30))
        self.assertEqual((queue["state"], queue["status"]), ("ACTIVE", "online"))
        for key in ("maxtime", "corecount", "maxrss", "maxwdir", "copytools"):
            self.assertIn(key, queue)
        reply = await self.call(client, "GET", f"{server.url}/cache/schedconfig/OTHER.all.json")
        self.assertEqual(reply.json()["maxrss"], 4000)
        reply = await self.call(client, "GET", f"{server.url}/cache/schedconfig/NOPE.all.json")
        self.assertEqual(reply.code, 404)

    async def test_request_log_keeps_wire_bytes(self) -> None:
        server = await self.start()
        client = self.client(server)
        body = gzip.compress(b'{"siteName": "DEV_QUEUE", "node": "wn1"}')
        await self.call(
            client, "POST", f"{server.url}/server/panda/getJob", body,
            {"Content-Type": "application/json", "User-Agent": "txpilot-test"},
        )  # fmt: skip
        entry = server.request_log.last("/server/panda/getJob")
        self.assertEqual((entry.method, entry.body, entry.status), ("POST", body, 200))
        self.assertEqual(entry.header("content-type"), "application/json")
        self.assertEqual(entry.header("User-Agent"), "txpilot-test")
        self.assertEqual(entry.params, {"siteName": QUEUE, "node": "wn1"})
        self.assertEqual(entry.reply_body, b"StatusCode=20")
        self.assertEqual(entry.reply_header("content-length"), "13")

    async def test_restart_keeps_jobs_pki_and_submissions(self) -> None:
        state = Path(self.mktemp())
        jobs_file = Path(self.mktemp())
        jobs_file.write_text(json.dumps([sample_job(), sample_job()]))
        first = await start_dev_server(reactor, state, queues={QUEUE: {}})
        try:
            ids = await first.submit_file(jobs_file)
            assert ids is not None
            client = self.client(first)
            await self.acquire(client, first)
            ca = first.pki.ca_cert.read_bytes()
            proxy = first.pki.client_proxy.read_bytes()
        finally:
            await first.stop()
        second = await self.start(state)
        self.assertEqual(second.pki.ca_cert.read_bytes(), ca)
        self.assertEqual(second.pki.client_proxy.read_bytes(), proxy)
        self.assertEqual([(await second.job(i))["jobStatus"] for i in ids], ["sent", "activated"])
        self.assertIsNone(await second.submit_file(jobs_file))
        [new] = await second.submit(sample_job())
        self.assertEqual(new, ids[-1] + 1)
        client = self.client(second)
        self.assertEqual((await self.acquire(client, second))["PandaID"], ids[1])


# -- twistd --------------------------------------------------------------------------------------

_TWISTD = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class TwistdTests(DevServerCase):
    async def test_help_lists_options(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [*_TWISTD, "-n", "panda-dev", "--help"], env=child_environment(), reactor=reactor
        )
        self.assertEqual(code, 0, err)
        text = out.decode()
        for option in ("--port=", "--host=", "--state-dir=", "--jobs=", "--queue=", "--queuedata=", "--timefloor=",
                       "--plain-http", "--production-dn=", "--token=", "--token-file=", "--ready-file="):  # fmt: skip
            self.assertIn(option, text)

    async def test_runs_and_stops(self) -> None:
        """``twistd -n panda-dev --port 0 --ready-file`` serves, submits job files, and stops on SIGTERM."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        jobs = base / "jobs.json"
        jobs.write_text(json.dumps({"5": sample_job()}))
        ready = base / "ready.json"
        args = [*_TWISTD, "-n", "--pidfile=", "--logfile=-", "panda-dev", "--port", "0", "--queue", QUEUE]
        args += ["--state-dir", "state", "--jobs", "jobs.json", "--ready-file", str(ready)]
        process = _Ended()
        transport = IReactorProcess(reactor).spawnProcess(
            process, sys.executable, [sys.executable, *args], env=child_environment(), path=str(base)
        )
        try:
            try:
                await file_ready(ready, ready=exists, timeout=20.0, unless=process.ended)
            except ProcessEndedFirst:
                self.fail(process.output.decode())
            info = json.loads(ready.read_text())
            self.assertEqual(info["client_proxy"], str(base / "state" / "pki" / "x509up"))
            pool = HTTPConnectionPool(reactor)
            self.addCleanup(pool.closeCachedConnections)
            policy = ProxyPolicy(Path(info["ca_cert"]).read_bytes(), Path(info["client_proxy"]).read_bytes())
            client = HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
            reply = await self.call(
                client, "POST", f"{info['url']}/api/v1/pilot/acquire_jobs", json.dumps({"site_name": QUEUE}).encode(),
                {"Content-Type": "application/json", "Accept": "application/json"},
            )  # fmt: skip
            self.assertEqual(reply.json()["data"]["jobs"][0]["PandaID"], 5)
            await pool.closeCachedConnections()
        finally:
            if not process.ended.called:
                transport.signalProcess("TERM")
            await process.ended
        # twistd re-raises SIGTERM after a clean shutdown, so look at what it logged
        self.assertIn(b"stopped", process.output)
        self.assertIn(b"Server Shut Down.", process.output)
        self.assertFalse(ready.exists())


# -- pure logic ----------------------------------------------------------------------------------


class PKITests(SynchronousTestCase):
    def test_files_and_proxy(self) -> None:
        directory = Path(self.mktemp())
        files = generate_pki(directory)
        self.assertEqual(files.user_dn, USER_DN)
        for path in (files.server_key, files.client_key, files.client_proxy):
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)
        data = files.client_proxy.read_bytes()
        self.assertEqual(data.count(b"BEGIN CERTIFICATE"), 1 + 1)
        self.assertLess(data.index(b"PRIVATE KEY"), data.rindex(b"BEGIN CERTIFICATE"))
        proxy, user = x509.load_pem_x509_certificates(data)
        self.assertEqual(user, x509.load_pem_x509_certificate(files.client_cert.read_bytes()))
        extension = proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
        self.assertTrue(extension.critical)
        self.assertEqual(proxy.subject.rdns[:-1], user.subject.rdns)
        self.assertEqual(proxy.subject.rdns[-1].rfc4514_string(), f"CN={proxy.serial_number}")
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        self.assertEqual([p.name for p in files.ca_dir.iterdir()], [f"{subject_hash(ca)}.0"])
        server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(n.value) for n in names], ["localhost", "127.0.0.1", "::1"])

    def test_reuse_and_repair(self) -> None:
        directory = Path(self.mktemp())
        files = generate_pki(directory)
        before = {
            p: p.read_bytes()
            for p in (files.ca_cert, files.client_cert, files.client_proxy, files.server_cert)
        }
        generate_pki(directory)
        self.assertEqual({p: p.read_bytes() for p in before}, before)
        files.client_proxy.write_bytes(b"garbage")
        generate_pki(directory)
        self.assertNotEqual(files.client_proxy.read_bytes(), before[files.client_proxy])
        self.assertEqual(files.ca_cert.read_bytes(), before[files.ca_cert])


class ProtocolTests(SynchronousTestCase):
    def test_get_casts(self) -> None:
        endpoint = protocol.V1_ENDPOINTS[("pilot", "get_job_status")]
        args = protocol.validate_v1(
            endpoint, "get_job_status", "GET", {"job_ids": ["1", "2.0"], "timeout": "5"}
        )
        self.assertEqual(args, {"job_ids": [1, 2], "timeout": 5})
        with self.assertRaises(protocol.V1Rejected) as raised:
            protocol.validate_v1(endpoint, "get_job_status", "GET", {"job_ids": "x"})
        self.assertEqual(
            str(raised.exception),
            "Type error: 'job_ids' with value '['x']' could not be casted to type List from list.",
        )

    def test_json_reply_needs_exact_content_type(self) -> None:
        request = protocol.RawRequest("POST", b"", b"", "application/json; charset=UTF-8", None, "*/*")
        self.assertFalse(request.v1_json_reply)
        self.assertEqual(protocol.parse_v1_params(request, "pilot", "acquire_jobs"), {})

    def test_legacy_accept_is_substring(self) -> None:
        request = protocol.RawRequest("GET", b"", b"", None, None, "text/html, application/json;q=0.9")
        self.assertTrue(request.legacy_accepts_json)

    def test_clean_user_id(self) -> None:
        self.assertEqual(clean_user_id(USER_DN), "testpilot")
        self.assertEqual(
            clean_user_id("/DC=ch/DC=cern/OU=Users/CN=atlpilo1/CN=614260/CN=Robot: ATLAS Pilot1"),
            "atlpilo1",
        )


class JobDefinitionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        definition = normalise_job(
            {"transformation": "t", "computingSite": "Q", "inFiles": "a,b"}, submitter_dn=USER_DN
        )
        job = render_job(definition.wire, panda_id=1, attempt_nr=0, debug=False)
        self.assertEqual(job["outFiles"], job["logFile"])
        self.assertEqual((job["scopeOut"], job["scopeLog"]), ("", "NULL"))
        self.assertEqual(job["inFiles"], "a,b")
        self.assertEqual((job["fsize"], job["checksum"], job["scopeIn"]), ("0,0", "NULL,NULL", "NULL,NULL"))
        self.assertEqual(len(str(job["GUID"]).split(",")), 2)
        self.assertEqual((job["maxWalltime"], job["taskID"], job["coreCount"]), ("NULL", "NULL", 1))
        self.assertEqual(job["prodUserID"], USER_DN)

    def test_flags_and_errors(self) -> None:
        definition = normalise_job(
            {"transformation": "t", "computingSite": "Q", "outFiles": ["o1"], "eventService": True,
             "loopingCheck": False, "container_name": "img", "isHPO": "True"},
            submitter_dn=USER_DN,
        )  # fmt: skip
        job = render_job(definition.wire, panda_id=1, attempt_nr=0, debug=True)
        tail = list(job)[list(job).index("resource_type") + 1 :]
        self.assertEqual(
            tail,
            ["loopingCheck", "debug", "eventService", "prodDBlockTokenForOutput", "container_name",
             "ioIntensity", "ioIntensityUnit", "isHPO"],
        )  # fmt: skip
        self.assertIs(job["loopingCheck"], False)
        self.assertEqual(job["prodDBlockTokenForOutput"], "NULL,NULL")
        for bad in (
            {"transformation": "t"},
            {"computingSite": "Q"},
            {"transformation": "t", "computingSite": "Q", "GUID": "x,y", "inFiles": "a,b,c"},
            {"transformation": "t", "computingSite": "Q", "minRamCount": "lots"},
        ):
            with self.assertRaises(JobDefinitionError):
                normalise_job(bad, submitter_dn=USER_DN)


class TransformationFileTests(SynchronousTestCase):
    """``/trf/``: files with ETag revalidation, nothing outside the directory."""

    def test_served_revalidated_and_contained(self) -> None:
        root = Path(self.mktemp())
        (root / "user").mkdir(parents=True)
        (root / "user" / "runGen").write_bytes(b"#!/bin/sh\n")
        (root.parent / "secret").write_bytes(b"no")
        first = file_reply(root, "user/runGen", None)
        self.assertEqual((first.status, first.body), (200, b"#!/bin/sh\n"))
        etag = dict(first.headers)["ETag"]
        again = file_reply(root, "user/runGen", etag)
        self.assertEqual((again.status, again.body), (304, b""))
        self.assertEqual(file_reply(root, "user/runGen", '"other"').status, 200)
        for hostile in ("../secret", "user/../../secret", "/etc/passwd", "", "user"):
            self.assertEqual(file_reply(root, hostile, None).status, 404, hostile)
        self.assertEqual(file_reply(None, "user/runGen", None).status, 404, "no directory configured")
