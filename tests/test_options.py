"""Command line, config file, credentials discovery and queuedata: one-line errors, documented codes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from pilot.config import KeepWorkdirs
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.options import PilotOptions, detect_batch_id, server_base_url
from pilot.queuedata import QueueData, load_queuedata_file, parse_environ, parse_queuedata
from pilot.server.api import ApiMode


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def parse(self, *args: str, environ: dict[str, str] | None = None) -> PilotOptions:
        options = PilotOptions(environ=environ if environ is not None else {})
        options.parseOptions(list(args))
        return options

    def assertExits(
        self, args: list[str], code: int, text: str, environ: dict[str, str] | None = None
    ) -> None:
        self.stderr.seek(0)
        self.stderr.truncate()
        error = self.assertRaises(SystemExit, self.parse, *args, environ=environ)
        self.assertEqual(error.code, code)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("pilot: error: "), lines)
        self.assertIn(text, lines[0])

    def test_defaults(self) -> None:
        config = self.parse("-q", "MY_QUEUE").config
        self.assertEqual(config.queue, "MY_QUEUE")
        self.assertEqual(config.server_url, "https://pandaserver.cern.ch:25443")
        self.assertEqual(
            (config.pilot_user, config.job_label, config.lifetime), ("generic", "ptest", 324000.0)
        )
        self.assertEqual((config.getjob_requests, config.getjob_failures), (2, 5))
        self.assertEqual(config.api, ApiMode.AUTO)
        self.assertEqual(config.heartbeat_period, 1800.0)
        self.assertEqual(config.keep_workdirs, KeepWorkdirs.NONE)
        self.assertIsNone(config.queuedata)

    def test_pilot3_option_names(self) -> None:
        config = self.parse(
            "-q",
            "Q",
            "--url",
            "https://panda.example.org",
            "-p",
            "443",
            "-j",
            "managed",
            "-l",
            "3600",
            "-v",
            "4",
            "-x",
            "3",
            "--resource-type",
            "MCORE",
            "-d",
            "--api",
            "legacy",
        ).config
        self.assertEqual(config.server_url, "https://panda.example.org:443")
        self.assertEqual(
            (config.job_label, config.lifetime, config.getjob_requests, config.getjob_failures),
            ("managed", 3600.0, 4, 3),
        )
        self.assertEqual((config.resource_type, config.debug, config.api), ("MCORE", True, ApiMode.LEGACY))

    def test_bad_options(self) -> None:
        self.assertExits([], 2, "-q/--queue is required")
        self.assertExits(["-q", "Q", "--lifetime", "soon"], 2, "--lifetime")
        self.assertExits(["-q", "Q", "--lifetime", "-5"], 2, "must be positive")
        self.assertExits(["-q", "Q", "--api", "v2"], 2, "expected one of v1, legacy, auto")
        self.assertExits(["-q", "Q", "-v", "two"], 2, "--getjob-requests")
        self.assertExits(["-q", "Q", "--no-such-option"], 2, "no-such-option")
        self.assertExits(["-q", "Q", "--url", "http://panda.example.org"], 2, "https")
        self.assertExits(["-q", "Q", "--cacert", "/nonexistent/ca.pem"], 2, "--cacert")
        self.assertExits(
            ["-q", "Q", "--nojob-backoff", "10", "--nojob-backoff-max", "5"], 2, "nojob-backoff-max"
        )

    def test_config_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text('[pilot]\nqueue = "FROM_FILE"\nlifetime = 7200\njob_label = "user"\ndebug = true\n')
        config = self.parse("-c", str(path), "-j", "managed").config
        self.assertEqual(
            (config.queue, config.lifetime, config.job_label, config.debug),
            ("FROM_FILE", 7200.0, "managed", True),
        )
        path.write_text('[pilot]\nqueue = "Q"\nbogus = 1\n')
        self.assertExits(["-c", str(path)], 2, "unknown setting 'bogus'")

    def test_bad_config_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[pilot\nqueue=")
        self.assertExits(["-c", str(path)], 2, "not valid TOML")
        self.assertExits(["-c", "/nonexistent.toml"], 2, "cannot read")

    def test_queuedata_file_errors(self) -> None:
        missing = Path(self.mktemp())
        self.assertExits(["-q", "Q", "--queuedata", str(missing)], 71, "cannot read queuedata")
        invalid = Path(self.mktemp())
        invalid.write_text("{not json")
        self.assertExits(["-q", "Q", "--queuedata", str(invalid)], 72, "not valid JSON")
        wrong = Path(self.mktemp())
        wrong.write_text(json.dumps({"nickname": "Q", "timefloor": "lots"}))
        self.assertExits(["-q", "Q", "--queuedata", str(wrong)], 72, "'timefloor'")

    def test_lifetime_from_environment(self) -> None:
        self.assertEqual(self.parse("-q", "Q", environ={"PANDAPILOT_LIFETIME": "900"}).config.lifetime, 900.0)
        self.assertEqual(
            self.parse("-q", "Q", "-l", "60", environ={"PANDAPILOT_LIFETIME": "900"}).config.lifetime, 60.0
        )

    def test_credentials_from_the_environment(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "proxy").write_text("x")
        environ = {
            "X509_USER_PROXY": str(directory / "proxy"),
            "X509_CERT_DIR": str(directory),
            "PANDA_AUTH_TOKEN": "token",
            "PANDA_AUTH_ORIGIN": "atlas.pilot",
        }
        credentials = self.parse("-q", "Q", environ=environ).config.credentials
        self.assertEqual(credentials.proxy, directory / "proxy")
        self.assertEqual(credentials.capath, directory)
        self.assertEqual(
            credentials.token_file, directory / "token", "a relative token is found next to the proxy"
        )
        self.assertEqual(credentials.auth_origin, "atlas.pilot")
        environ["PANDA_AUTH_DIR"] = "/tokens"
        self.assertEqual(
            self.parse("-q", "Q", environ=environ).config.credentials.token_file, Path("/tokens/token")
        )

    def test_server_base_url(self) -> None:
        self.assertEqual(server_base_url("https://h.example", 25443), "https://h.example:25443")
        self.assertEqual(
            server_base_url("https://h.example:443/prefix/", 25443), "https://h.example:443/prefix"
        )
        self.assertEqual(server_base_url("h.example", 8443), "https://h.example:8443")

    def test_batch_ids(self) -> None:
        self.assertEqual(detect_batch_id({"SLURM_JOB_ID": "123"}), "123")
        ad = Path(self.mktemp())
        ad.write_text('ClusterId = 5\nGlobalJobId = "schedd.example#5.0#1700000000"\n')
        self.assertEqual(detect_batch_id({"_CONDOR_JOB_AD": str(ad)}), "schedd.example#5.0#1700000000")
        self.assertEqual(detect_batch_id({}), "")


class QueuedataTests(SynchronousTestCase):
    def test_single_and_all_queue_documents(self) -> None:
        single = {
            "nickname": "Q",
            "panda_resource": "Q_RES",
            "timefloor": 30,
            "maxtime": "86400",
            "environ": "A=1 B=two",
        }
        parsed = parse_queuedata(json.dumps(single).encode(), "Q")
        self.assertEqual(
            (parsed.name, parsed.resource, parsed.timefloor, parsed.maxtime), ("Q", "Q_RES", 1800, 86400)
        )
        self.assertEqual(dict(parsed.environ), {"A": "1", "B": "two"})
        every = {"OTHER": {"nickname": "OTHER"}, "Q": single}
        self.assertEqual(parse_queuedata(json.dumps(every).encode(), "Q").resource, "Q_RES")
        error = self.assertRaises(PilotError, parse_queuedata, json.dumps(every).encode(), "MISSING")
        self.assertEqual(error.code, ErrorCode.QUEUEDATANOTOK)

    def test_state_checks(self) -> None:
        self.assertIsNone(QueueData.default("Q").state_error())
        offline = QueueData.from_dict({"status": "offline"}, "Q").state_error()
        assert offline is not None
        self.assertEqual(offline.code, ErrorCode.PANDAQUEUENOTONLINE)
        inactive = QueueData.from_dict({"state": "BROKEROFF"}, "Q").state_error()
        assert inactive is not None
        self.assertEqual(inactive.code, ErrorCode.PANDAQUEUENOTACTIVE)
        self.assertTrue(QueueData.from_dict({"status": "test"}, "Q").is_test)

    def test_field_errors_name_the_field(self) -> None:
        for raw, field in (
            ({"corecount": [1]}, "corecount"),
            ({"copytools": "rucio"}, "copytools"),
            ({"direct_access_lan": "maybe"}, "direct_access_lan"),
        ):
            error = self.assertRaises(PilotError, QueueData.from_dict, raw, "Q")
            self.assertEqual(error.code, ErrorCode.QUEUEDATANOTOK)
            self.assertIn(field, error.detail)

    def test_environ_parsing_ignores_junk(self) -> None:
        self.assertEqual(parse_environ("A=1 junk =x 2B=3 C="), {"A": "1", "C": ""})

    def test_unreadable_file(self) -> None:
        error = self.assertRaises(PilotError, load_queuedata_file, Path("/nonexistent/q.json"), "Q")
        self.assertEqual(error.code, ErrorCode.QUEUEDATA)
