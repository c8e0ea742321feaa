"""Names and URLs from job definitions and plug-ins (issue 11, defect 12).

A plug-in's log tarball name was joined to paths unchecked, and a transformation from
``http://`` ran unchecked.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot.util.untrusted import (
    checksum_mismatch,
    safe_file_name,
    strong_checksum,
    transformation_source_allowed,
)

SHA256 = "sha256:" + hashlib.sha256(b"#!/bin/sh\n").hexdigest()


class SafeFileNameTests(SynchronousTestCase):
    def test_ordinary_names_pass(self) -> None:
        for name in ("log.tgz", "user.jdoe.12345.log.tgz", "pandajob_7.log.tar.gz", "a-b_c+d", "é.tgz"):
            self.assertEqual(safe_file_name(name), name)

    def test_refused(self) -> None:
        for name, why in (
            ("", "not a file name"),
            (".", "not a file name"),
            ("../../etc/cron.d/x", "'/'"),
            ("logs/x.tgz", "'/'"),
            ("..", "'..'"),
            ("x..tgz", "'..'"),
            ("x\0.tgz", "NUL"),
            ("-rf.tgz", "'-'"),
            ("--checkpoint-action=exec=sh", "'-'"),
            ("log\n.tgz", "control"),
            ("log\x1b[31m.tgz", "control"),
            ("log\x7f", "control"),
            ("log\x85", "control"),
            ("a" * 256, "255 bytes"),
            ("é" * 128, "255 bytes"),
            ("bad\udcff", "UTF-8"),
        ):
            with self.assertRaises(ValueError, msg=repr(name)) as raised:
                safe_file_name(name)
            self.assertIn(why, str(raised.exception))

    def test_longest_name_passes(self) -> None:
        self.assertEqual(safe_file_name("a" * 255), "a" * 255)

    @given(st.text(max_size=300))
    def test_an_accepted_name_is_one_entry_of_the_directory(self, name: str) -> None:
        try:
            safe_file_name(name)
        except ValueError:
            return
        joined = PurePosixPath("/pilot/logs") / name
        self.assertEqual(joined.parent, PurePosixPath("/pilot/logs"))
        self.assertEqual(joined.name, name)
        self.assertFalse(name.startswith("-"))
        self.assertLessEqual(len(name.encode()), 255)


class TransformationSourceTests(SynchronousTestCase):
    def test_https_always(self) -> None:
        self.assertIsNone(transformation_source_allowed("https://cern.ch/trf/runGen-00-00-02", None, False))

    def test_http_needs_a_strong_checksum(self) -> None:
        url = "http://mirror.example.org/trf/runGen-00-00-02"
        reason = transformation_source_allowed(url, None, False)
        self.assertIsNotNone(reason)
        assert reason is not None
        self.assertIn("without a checksum", reason)
        self.assertIsNone(transformation_source_allowed(url, SHA256, False))
        self.assertIsNone(
            transformation_source_allowed(url, SHA256.upper().replace("SHA256", "sha256"), False)
        )

    def test_http_with_a_weak_checksum_is_refused(self) -> None:
        url = "http://mirror.example.org/trf/runGen"
        for weak in ("ad:0a1b2c3d", "md5:" + "0" * 32, "sha256:abc", "nonsense"):
            reason = transformation_source_allowed(url, weak, False)
            self.assertIsNotNone(reason, weak)

    def test_http_when_the_site_allows_it(self) -> None:
        self.assertIsNone(transformation_source_allowed("http://mirror.site.local/trf", None, True))

    def test_other_sources_are_refused(self) -> None:
        for url in (
            "ftp://example.org/trf",
            "file:///bin/sh",
            "runGen-00-00-02",
            "https:///no-host",
            "https://user:secret@example.org/trf",
            "https://[::1/trf",
        ):
            self.assertIsNotNone(transformation_source_allowed(url, SHA256, True), url)

    def test_checksums(self) -> None:
        self.assertEqual(strong_checksum(SHA256), ("sha256", SHA256.split(":")[1]))
        self.assertIsNone(strong_checksum("ad:12345678"))
        self.assertIsNone(strong_checksum("sha256:" + "g" * 64))
        self.assertIsNone(checksum_mismatch(b"#!/bin/sh\n", SHA256))
        mismatch = checksum_mismatch(b"#!/bin/sh\nrm -rf ~\n", SHA256)
        self.assertIsNotNone(mismatch)
        self.assertIsNotNone(checksum_mismatch(b"", "ad:00000001"))
