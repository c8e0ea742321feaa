"""Redaction by value: the secrets the pilot knows never reach the server in a debug tail.

Defect 11 of issue 11: the pattern rules redact JWTs, PEM blocks and ``key=value``
forms, but a bare S3 secret key or an opaque token printed by the payload went out
as it was.
"""

from __future__ import annotations

import base64
import json
import random
import string
import threading
from pathlib import Path
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bench import redaction
from bench.redaction import make_secrets, make_tail
from pilot.monitor.redact import MARK, redact
from pilot.monitor.settings import MonitorSettings
from pilot.monitor.watcher import JobMonitor, Limits, newest_file_tail
from pilot.util.secrets import (
    MIN_LENGTH,
    SecretValues,
    encodings,
    is_secret_value_variable,
)

from .fakes import run_sync

#: An opaque (non-JWT) bearer token and an S3 secret key, as sites hand them out.
OPAQUE_TOKEN = "Zm9vYmFyLW9wYXF1ZS10b2tlbi0xMjM0NTY3ODkw_x-QzPl"
S3_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY+9a"


class PayloadTailTests(SynchronousTestCase):
    """The debug tail as the heartbeat sends it, read from a real file."""

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir()
        (self.workdir / "payload.stdout").write_text(
            "reading input\n"
            f"token is {OPAQUE_TOKEN}\n"
            f"s3 client: using {S3_SECRET_KEY} for bucket data\n"
            "processed 100 events\n"
        )
        self.secrets = SecretValues([OPAQUE_TOKEN, S3_SECRET_KEY])

    def test_known_opaque_token_and_s3_key_are_redacted(self) -> None:
        tail = newest_file_tail(self.workdir, 16 * 1024, secrets=self.secrets)
        self.assertNotIn(OPAQUE_TOKEN, tail)
        self.assertNotIn(S3_SECRET_KEY, tail)
        self.assertIn(f"token is {MARK}\n", tail)
        self.assertIn(f"s3 client: using {MARK} for bucket data", tail)
        self.assertIn("processed 100 events", tail)

    def test_pattern_rules_alone_let_them_through(self) -> None:
        """What the defect was: no pattern recognises a bare value."""
        tail = newest_file_tail(self.workdir, 16 * 1024)
        self.assertIn(OPAQUE_TOKEN, tail)
        self.assertIn(S3_SECRET_KEY, tail)

    def test_the_job_monitor_redacts_its_debug_tail(self) -> None:
        monitor = JobMonitor(
            clock=Clock(),
            in_thread=run_sync,
            settings=MonitorSettings(),
            limits=Limits(pss_kb=None, workdir_bytes=None, looping=None, walltime_end=None),
            workdir=self.workdir,
            pid=1,
            abort=lambda code, diag: None,
            panda_id=7,
            secrets=self.secrets,
        )
        tail = self.successResultOf(Deferred.fromCoroutine(monitor.debug_tail()))
        self.assertIn("processed 100 events", tail)
        self.assertNotIn(OPAQUE_TOKEN, tail)
        self.assertNotIn(S3_SECRET_KEY, tail)

    def test_values_go_before_the_patterns(self) -> None:
        """``secret=`` stops the key=value rule at ``&``; the value rule takes all of it."""
        value = "abc&defghijklmnop"
        cleaned = redact(f"secret={value} end", SecretValues([value]))
        self.assertEqual(cleaned, f"secret={MARK} end")


class EncodingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.secrets = SecretValues([S3_SECRET_KEY])

    def assertRedacted(self, text: str, fragment: str) -> None:
        cleaned = self.secrets.redact(text, MARK)
        self.assertIn(MARK, cleaned)
        self.assertNotIn(fragment, cleaned)

    def test_url_quoted(self) -> None:
        quoted = quote(S3_SECRET_KEY, safe="")
        self.assertRedacted(f"GET /?key={quoted}&x=1", quoted)
        lower_hex = quoted.replace("%2F", "%2f").replace("%2B", "%2b")
        self.assertRedacted(f"GET /?key={lower_hex}&x=1", lower_hex)
        self.assertRedacted(f"GET /?key={quote(S3_SECRET_KEY)}", quote(S3_SECRET_KEY))

    def test_json_escaped(self) -> None:
        self.secrets.add('pass"word\\with quotes')
        text = json.dumps({"value": 'pass"word\\with quotes'})
        self.assertRedacted(text, "word")

    def test_base64_alone(self) -> None:
        encoded = base64.b64encode(S3_SECRET_KEY.encode()).decode()
        self.assertRedacted(f"data: {encoded}", encoded[2:-4])

    def test_base64_inside_basic_authorisation_at_every_alignment(self) -> None:
        for user in ("u", "us", "use", "user"):
            blob = base64.b64encode(f"{user}:{S3_SECRET_KEY}".encode()).decode()
            cleaned = self.secrets.redact(f"Authorization: Basic {blob}", MARK)
            self.assertIn(MARK, cleaned, user)
            # what is left of the blob is at most the user's part and two boundary characters
            self.assertLessEqual(len(cleaned.replace(MARK, "")) - len("Authorization: Basic "), 10)

    def test_base64_url_safe_alphabet(self) -> None:
        encoded = base64.urlsafe_b64encode(b"\xff\xfe" + S3_SECRET_KEY.encode()).decode()
        self.assertRedacted(encoded, encoded[5:-5])

    def test_short_values_are_not_secrets(self) -> None:
        secrets = SecretValues(["atlas", "1234567", ""])
        self.assertEqual(len(secrets), 0)
        self.assertEqual(secrets.redact("atlas job 1234567", MARK), "atlas job 1234567")
        self.assertEqual(MIN_LENGTH, 8)

    def test_short_values_get_no_base64_form(self) -> None:
        self.assertEqual(encodings("abcdefgh"), {"abcdefgh"})

    def test_overlapping_values_are_redacted_whole(self) -> None:
        secrets = SecretValues(["aaaabbbbcccc", "ccccddddeeee"])
        self.assertEqual(secrets.redact("x aaaabbbbccccddddeeee y", MARK), f"x {MARK} y")


class RegistryTests(SynchronousTestCase):
    def test_environment_values_not_paths(self) -> None:
        secrets = SecretValues()
        added = secrets.add_environment(
            {
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                "BEARER_TOKEN": OPAQUE_TOKEN,
                "MY_SERVICE_PASSWORD": "correct horse battery",
                "PANDA_AUTH_TOKEN": "panda_token_file",
                "X509_USER_PROXY": "/tmp/x509up_u1000",
                "PATH": "/usr/local/bin:/usr/bin",
            }
        )
        self.assertEqual(added, 3)
        for value in (S3_SECRET_KEY, OPAQUE_TOKEN, "correct horse battery"):
            self.assertIn(value, secrets)
        self.assertNotIn("panda_token_file", secrets)
        self.assertFalse(is_secret_value_variable("PANDA_AUTH_TOKEN"))
        self.assertTrue(is_secret_value_variable("aws_session_token"))

    def test_job_secrets_document(self) -> None:
        secrets = SecretValues()
        document = json.dumps({"db": {"password": "s3cr3t-passw0rd", "port": 5432}, "keys": ["k" * 20]})
        self.assertEqual(secrets.add_document(document), 2)
        self.assertIn("s3cr3t-passw0rd", secrets)
        self.assertIn("k" * 20, secrets)
        self.assertNotIn("password", secrets)  # keys are names, not secrets
        self.assertEqual(secrets.add_document("not json at all"), 1)
        self.assertEqual(secrets.add_document(None), 0)

    def test_token_file_contents_without_the_newline(self) -> None:
        path = Path(self.mktemp())
        path.write_text(OPAQUE_TOKEN + "\n")
        secrets = SecretValues()
        self.assertTrue(secrets.add_file(path))
        self.assertEqual(secrets.redact(f"[{OPAQUE_TOKEN}]", MARK), f"[{MARK}]")

    def test_multi_line_values_line_by_line(self) -> None:
        key = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEAr1\nQ2xlYXJseSBhIGtleQ\n-----END KEY-----\n"
        secrets = SecretValues([key])
        self.assertEqual(secrets.redact("tail: Q2xlYXJseSBhIGtleQ\n", MARK), f"tail: {MARK}\n")

    def test_needles_are_rebuilt_only_when_the_set_changes(self) -> None:
        secrets = SecretValues([OPAQUE_TOKEN])
        secrets.redact("x", MARK)
        first = secrets._snapshot
        self.assertIsNotNone(first)
        secrets.add(OPAQUE_TOKEN)  # already known
        secrets.redact("x", MARK)
        self.assertIs(secrets._snapshot, first)
        secrets.add(S3_SECRET_KEY)
        self.assertIsNone(secrets._snapshot)
        self.assertEqual(secrets.redact(S3_SECRET_KEY, MARK), MARK)

    def test_threads_add_while_another_redacts(self) -> None:
        secrets = SecretValues()
        alphabet = string.ascii_letters + string.digits
        values = [["".join(random.choices(alphabet, k=24)) for _ in range(200)] for _ in range(4)]
        errors: list[BaseException] = []

        def add(batch: list[str]) -> None:
            try:
                for value in batch:
                    secrets.add(value)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(batch,)) for batch in values]
        for thread in threads:
            thread.start()
        text = " ".join(value for batch in values for value in batch)
        while any(thread.is_alive() for thread in threads):
            secrets.redact(text, MARK)
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(secrets), 800)
        self.assertEqual(secrets.redact(text, MARK).replace(MARK, "").strip(), "")


class MicroBenchmarkTests(SynchronousTestCase):
    """The benchmark's workload (``bench/redaction.py``); nothing is asserted about time."""

    def test_the_benchmark_runs(self) -> None:
        run_dir = Path(self.mktemp()) / "redaction"
        redaction.main(["--secrets", "6", "--repeat", "2", "--no-targets", "--dir", str(run_dir)])
        results = json.loads((run_dir.parent / "redaction.json").read_text())
        self.assertEqual(results["secrets"], 6)
        self.assertGreater(results["value_redaction_ms"], 0)

    def test_sixteen_kilobytes_and_fifty_secrets(self) -> None:
        rng = random.Random(3)
        values = make_secrets(50, rng)
        secrets = SecretValues(values)
        text = make_tail(values[7], rng)
        self.assertEqual(len(text), 16 * 1024)
        cleaned = redact(text, secrets)
        self.assertNotIn(values[7], cleaned)
        self.assertEqual(cleaned.count(MARK), 1)
        self.assertEqual(len(secrets), 50)
        self.assertEqual(secrets.values(), frozenset(values))
