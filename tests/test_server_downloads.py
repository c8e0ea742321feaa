"""The pilot-wide download cache: one download per URL, revalidation, checksums, sharing."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pilot.server.api import ApiMode
from pilot.server.client import PandaClient, RetryPolicy
from pilot.server.downloads import Checksum, DownloadCache
from pilot.server.errors import ChecksumMismatch, ServerUnavailable

from .fakes import run_sync

BASE = "https://panda.example.org:25443"
URL = "https://cern.example.org/trf/runGen-00-00-02"
CONTENT = b"#!/bin/bash\necho hello\n"
ADLER = f"{zlib.adler32(CONTENT) & 0xFFFFFFFF:08x}"


class _Files(Resource):
    """Serves one file with an ETag; answers 304 to a matching If-None-Match; can hang or fail."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.content = CONTENT
        self.etag = b'"v1"'
        self.requests: list[dict[str, str]] = []
        self.hang = False
        self.fail = False
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append(headers)
        if self.fail:
            request.setResponseCode(503)
            return b"down"
        if self.hang:
            self.waiting.append(request)
            return NOT_DONE_YET
        if headers.get("if-none-match") == self.etag.decode():
            request.setResponseCode(304)
            return b""
        request.setHeader(b"etag", self.etag)
        return self.content


class DownloadCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.files = _Files()
        self.stub = StubTreq(self.files)
        client = PandaClient(
            self.stub,  # type: ignore[arg-type]
            BASE,
            self.clock,
            api=ApiMode.V1,
            retry=RetryPolicy(attempts=1, jitter=lambda: 0.0),
        )
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.cache = DownloadCache(client, self.base / "cache", self.clock, run_sync, max_age=600.0)

    def fetch(self, name: str, checksum: str | None = None) -> Deferred[Any]:
        fetching = Deferred.fromCoroutine(self.cache.fetch(URL, self.base / name, checksum=checksum))
        self.stub.flush()  # deliver what the in-memory server wrote
        return fetching

    def test_one_download_for_several_jobs(self) -> None:
        for job in ("job1", "job2", "job3"):
            path = self.successResultOf(self.fetch(job))
            self.assertEqual(path.read_bytes(), CONTENT)
        self.assertEqual(len(self.files.requests), 1)
        self.assertEqual(self.cache.downloads, 1)

    def test_each_job_gets_its_own_copy(self) -> None:
        first = self.successResultOf(self.fetch("job1"))
        first.write_bytes(b"changed by a payload")
        second = self.successResultOf(self.fetch("job2"))
        self.assertEqual(second.read_bytes(), CONTENT)

    def test_revalidated_when_older_than_max_age(self) -> None:
        self.successResultOf(self.fetch("job1"))
        self.clock.advance(599.0)
        self.successResultOf(self.fetch("job2"))
        self.assertEqual(len(self.files.requests), 1, "young copy: no request")
        self.clock.advance(2.0)
        self.successResultOf(self.fetch("job3"))
        self.assertEqual(len(self.files.requests), 2)
        self.assertEqual(self.files.requests[1]["if-none-match"], '"v1"')
        self.assertEqual((self.cache.downloads, self.cache.revalidations), (1, 1))
        self.successResultOf(self.fetch("job4"))
        self.assertEqual(len(self.files.requests), 2, "the 304 made the copy young again")

    def test_changed_document_replaces_the_copy(self) -> None:
        self.successResultOf(self.fetch("job1"))
        self.files.content, self.files.etag = b"new version\n", b'"v2"'
        self.clock.advance(601.0)
        path = self.successResultOf(self.fetch("job2"))
        self.assertEqual(path.read_bytes(), b"new version\n")
        self.assertEqual(self.cache.downloads, 2)

    def test_stale_copy_used_when_the_server_is_down(self) -> None:
        self.successResultOf(self.fetch("job1"))
        self.files.fail = True
        self.clock.advance(601.0)
        path = self.successResultOf(self.fetch("job2"))
        self.assertEqual(path.read_bytes(), CONTENT)

    def test_checksum_keys_and_verifies(self) -> None:
        self.successResultOf(self.fetch("job1", f"ad:{ADLER}"))
        self.clock.advance(10_000.0)  # a copy with the right checksum never needs asking
        self.successResultOf(self.fetch("job2", ADLER))
        self.assertEqual(len(self.files.requests), 1)
        failure = self.failureResultOf(self.fetch("job3", "ad:00000001"), ChecksumMismatch)
        self.assertIn(f"checksum {ADLER} (adler32), expected 00000001", str(failure.value))
        self.assertFalse((self.base / "job3").exists())

    def test_concurrent_fetches_share_one_download(self) -> None:
        self.files.hang = True
        first, second = self.fetch("job1"), self.fetch("job2")
        self.stub.flush()
        self.assertEqual(len(self.files.requests), 1)
        (request,) = self.files.waiting
        request.setHeader(b"etag", b'"v1"')
        request.write(CONTENT)
        request.finish()
        self.stub.flush()
        self.assertEqual(self.successResultOf(first).read_bytes(), CONTENT)
        self.assertEqual(self.successResultOf(second).read_bytes(), CONTENT)

    def test_one_cancelled_fetcher_leaves_the_others(self) -> None:
        self.files.hang = True
        first, second = self.fetch("job1"), self.fetch("job2")
        self.stub.flush()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        (request,) = self.files.waiting
        request.write(CONTENT)
        request.finish()
        self.stub.flush()
        self.assertEqual(self.successResultOf(second).read_bytes(), CONTENT)

    def test_last_cancelled_fetcher_stops_the_download(self) -> None:
        self.files.hang = True
        only = self.fetch("job1")
        self.stub.flush()
        only.cancel()
        self.failureResultOf(only, CancelledError)
        self.assertEqual(list((self.base / "cache").iterdir()), [], "no partial file left")
        self.files.hang = False
        self.successResultOf(self.fetch("job2"))  # a later fetch starts afresh

    def test_failure_reaches_every_fetcher(self) -> None:
        self.files.fail = True
        self.failureResultOf(self.fetch("job1"), ServerUnavailable)


class ChecksumTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(Checksum.parse("ad:0A1B2C3D"), Checksum("adler32", "0a1b2c3d"))
        self.assertEqual(Checksum.parse("adler32:0a1b2c3d"), Checksum("adler32", "0a1b2c3d"))
        self.assertEqual(Checksum.parse("0a1b2c3d"), Checksum("adler32", "0a1b2c3d"))
        self.assertEqual(Checksum.parse("md5:" + "f" * 32), Checksum("md5", "f" * 32))
        for bad in ("", "ad:xyz", "md5:0a1b2c3d", "sha1:" + "0" * 40):
            self.assertRaises(ValueError, Checksum.parse, bad)
