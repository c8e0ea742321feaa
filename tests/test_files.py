"""Output facts, the job output report, the work-directory scan and transformation downloads."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.job.logtarball import scan_workdir
from pilot.job.outputs import describe_outputs, locate_output
from pilot.job.transformation import download_sources, fetch_transformation, local_name
from pilot.model.files import job_output_report
from pilot.model.job import OutputFile, parse_job
from pilot.server.client import ServerUnavailable
from pilot.server.errors import LocalFileError
from pilot.util.checksum import CHUNK, file_facts

from .fakes import run_sync


class ChecksumTests(SynchronousTestCase):
    def test_facts_match_zlib_and_hashlib(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        for size in (0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17):
            data = os.urandom(size)
            path = directory / f"f{size}"
            path.write_bytes(data)
            facts = file_facts(path, md5=True)
            self.assertEqual(facts.size, size)
            self.assertEqual(facts.adler32, f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")
            self.assertEqual(facts.md5, hashlib.md5(data).hexdigest())


class OutputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir()

    def test_report_of_outputs(self) -> None:
        job = parse_job(
            {
                "PandaID": 1,
                "transformation": "t",
                "outFiles": "a.root,log.tgz",
                "logFile": "log.tgz",
                "logGUID": "L",
            }
        )
        (self.workdir / "a.root").write_bytes(b"events")
        reported = self.successResultOf(Deferred.fromCoroutine(describe_outputs(job, self.workdir, run_sync)))
        report = json.loads(job_output_report(reported))
        self.assertEqual(set(report), {"a.root"})
        self.assertEqual(report["a.root"]["fsize"], 6)
        self.assertEqual(report["a.root"]["adler32"], f"{zlib.adler32(b'events'):08x}")
        self.assertEqual(len(report["a.root"]["guid"]), 36)

    def test_missing_and_escaping_outputs(self) -> None:
        error = self.assertRaises(PilotError, locate_output, OutputFile("absent.root"), self.workdir)
        self.assertEqual(error.code, ErrorCode.MISSINGOUTPUTFILE)
        outside = Path(self.mktemp())
        outside.write_text("secret")
        (self.workdir / "link.root").symlink_to(outside.absolute())
        error = self.assertRaises(PilotError, locate_output, OutputFile("link.root"), self.workdir)
        self.assertEqual(error.code, ErrorCode.MISSINGOUTPUTFILE)

    def test_scan_lists_links_leaving_the_work_directory(self) -> None:
        (self.workdir / "sub").mkdir()
        (self.workdir / "sub" / "data").write_bytes(b"x" * 100)
        (self.workdir / "inside").symlink_to(self.workdir / "sub" / "data")
        secret = Path(self.mktemp())
        secret.write_text("proxy")
        (self.workdir / "sub" / "proxy").symlink_to(secret.absolute())
        scan = scan_workdir(self.workdir)
        self.assertEqual(scan.total_bytes, 100)
        self.assertEqual(scan.external_links, ("sub/proxy",))


class TransformationTests(SynchronousTestCase):
    def job(self, transformation: str) -> Any:
        return parse_job({"PandaID": 1, "transformation": transformation})

    def test_sources(self) -> None:
        mirrors = ("https://m1.example/trf", "https://m2.example/trf")
        self.assertEqual(download_sources(self.job("/bin/echo"), mirrors), [])
        self.assertEqual(download_sources(self.job("runGen-00-00-02"), ()), [])
        self.assertEqual(
            download_sources(self.job("runGen-00-00-02"), mirrors),
            ["https://m1.example/trf/runGen-00-00-02", "https://m2.example/trf/runGen-00-00-02"],
        )
        self.assertEqual(
            download_sources(self.job("https://m1.example/trf/runGen"), mirrors),
            ["https://m1.example/trf/runGen", "https://m2.example/trf/runGen"],
        )
        self.assertEqual(local_name("https://x.example/a/../-rf"), "transformation")
        self.assertEqual(local_name("https://x.example/a/runGen-1.py"), "runGen-1.py")

    def test_first_working_mirror_is_used(self) -> None:
        workdir = Path(self.mktemp())
        workdir.mkdir()

        def download(url: str, target: Path) -> Deferred[Path]:
            if "m1" in url:
                return fail(ServerUnavailable(f"{url}: unreachable"))
            target.write_bytes(b"#!/bin/sh\n")
            return succeed(target)

        path = self.successResultOf(
            Deferred.fromCoroutine(
                fetch_transformation(
                    ["https://m1.example/t", "https://m2.example/t"], workdir, download, run_sync
                )
            )
        )
        self.assertEqual(path, workdir / "t")
        self.assertEqual(path.stat().st_mode & 0o777, 0o700)  # the pilot user's alone

    def test_all_mirrors_failing(self) -> None:
        workdir = Path(self.mktemp())
        workdir.mkdir()
        d = Deferred.fromCoroutine(
            fetch_transformation(
                ["https://m1.example/t", "https://m2.example/t"],
                workdir,
                lambda url, target: fail(ServerUnavailable(f"{url}: no")),
                run_sync,
            )
        )
        error = self.failureResultOf(d, PilotError).value
        self.assertEqual(error.code, ErrorCode.TRFDOWNLOADFAILURE)
        self.assertIn("m1.example", error.detail)
        self.assertIn("m2.example", error.detail)

    def test_a_full_disk_is_not_a_failed_mirror(self) -> None:
        workdir = Path(self.mktemp())
        workdir.mkdir()
        tried: list[str] = []

        def full(url: str, target: Path) -> Deferred[Path]:
            tried.append(url)
            return fail(LocalFileError("No space left on device", errno.ENOSPC))

        d = Deferred.fromCoroutine(
            fetch_transformation(["https://m1.example/t", "https://m2.example/t"], workdir, full, run_sync)
        )
        self.assertEqual(self.failureResultOf(d, PilotError).value.code, ErrorCode.NOLOCALSPACE)
        self.assertEqual(tried, ["https://m1.example/t"], "no other mirror would help")
