"""Command line, config file, credentials discovery and queuedata: one-line errors, documented codes."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from pilot.config import KeepWorkdirs
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.options import PilotOptions, detect_batch_id, server_base_url
from pilot.queuedata import QueueData, load_queuedata_file, parse_environ, parse_queuedata
from pilot.server.api import ApiMode

#: pilot3's own description of its command line (section 2 of the shared reference):
#: every option name in its table must be accepted, so the test reads the table itself.
PILOT3_REFERENCE = Path("/work/shared/reference/pilot3-reference.md")


def pilot3_option_names(reference: str) -> list[str]:
    """Every ``-x``/``--name`` in the first column of the reference's command-line table."""
    section = reference.split("## 2. Command line", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or set(cells[1].strip()) <= {"-"}:
            continue
        names += re.findall(r"`(--?[A-Za-z][\w-]*)`", cells[1])
    return names


class OptionTestCase(SynchronousTestCase):
    """Parses command lines with stderr captured; a usage error is one line and an exit code."""

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

    def config_file(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)


class OptionTests(OptionTestCase):
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
            self.parse("-q", "Q", "-l", "600", environ={"PANDAPILOT_LIFETIME": "900"}).config.lifetime, 600.0
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


#: Command lines as pilot wrappers start pilot3 (runpilot3-wrapper, Harvester's
#: submission templates, ARC): (description, line, environment).
GRID_PULL = (
    "-q CERN-PROD_UCORE -r CERN-PROD_UCORE -s CERN-PROD -j managed -i PR --pilot-user generic -w generic "
    "--url https://pandaserver.cern.ch --port 25443 --job-type managed --resource-type SCORE "
    "--harvester-submit-mode PULL --queuedata-url https://cric.example.org/cache/schedconfig/CERN-PROD_UCORE.json"
)
HARVESTER_PUSH = (
    "-q BNL_HPC -r BNL_HPC -s BNL -i PR -j managed --pilot-user generic -w generic "
    "--url https://pandaserver.cern.ch -p 25443 -d --harvester-submit-mode PUSH --allow-same-user=False "
    "--job-type=unified --resource-type=MCORE --getjobrequests 1 --harvester-workdir /var/harvester/w17 "
    "--harvester-datadir /var/harvester/w17/data "
    "--harvester-eventstatusdump /var/harvester/w17/event_status.dump.json "
    "--harvester-workerattributes /var/harvester/w17/worker_attributes.json -z -t"
)
ANALYSIS = (
    "-q ANALY_MWT2 -j user -i RC --pilot-user generic --url https://pandaserver.cern.ch -p 25443 -w generic "
    "--allow-other-country True --country-group us --working-group AP_TOP --cleanup False --use-https True "
    "--use-rucio-traces False -l 7200 --getjobfailures 3 --getjobrequests 4 "
    "--baseurls https://a.example.org/trf,https://b.example.org/trf/"
)
ARC = (
    "-q ARC-T2 -s ARC-T2 -r ARC-T2 -w generic -j ptest -i RCM --pilot-user generic -z -b -t -u -y -k "
    "--no-pilot-log --redirect-stdout /dev/null --stageout-attempts 2 -a /scratch/arc "
    "--url https://pandaserver.cern.ch --use-realtime-logging --realtime-logging-server logstash:logs.example.org:8443 "
    "--realtime-logname pilot --rucio-host https://rucio.example.org -L 3600 --subscribe-to-msgsvc --pod "
    "--hpc-resource generic --hpc-mode manytoone --es-executor-type raythena --input-dir /in --output-dir /out "
    "--input-destination-dir /dest"
)  # fmt: skip


class Pilot3CommandLineTests(OptionTestCase):
    """Pilot wrappers pass pilot3's exact flags: every name is accepted, with its meaning or a notice."""

    def wrapper(self, line: str, environ: dict[str, str] | None = None) -> PilotOptions:
        return self.parse(*shlex.split(line), environ=environ)

    def assertNoticesName(self, notices: tuple[str, ...], *labels: str) -> None:
        for line in notices:
            self.assertNotIn("\n", line)
            self.assertRegex(line, r"^options? .* (has|have) no effect in txpilot: .+")
        named = " ".join(notices)
        for label in labels:
            self.assertIn(label, named)

    def test_grid_pull_wrapper(self) -> None:
        config = self.wrapper(GRID_PULL).config
        self.assertEqual(
            (config.queue, config.job_label, config.version_tag, config.workflow, config.pilot_user),
            ("CERN-PROD_UCORE", "managed", "PR", "generic", "generic"),
        )
        self.assertEqual(config.server_url, "https://pandaserver.cern.ch:25443")
        self.assertEqual((config.job_type, config.resource_type), ("managed", "SCORE"))
        self.assertEqual(
            config.queuedata_source, "https://cric.example.org/cache/schedconfig/CERN-PROD_UCORE.json"
        )
        self.assertEqual((config.harvester.mode, config.harvester.submit_mode), ("server", "PULL"))
        self.assertTrue(config.report_worker_node)
        self.assertEqual(len(config.notices), 1, config.notices)
        self.assertNoticesName(config.notices, "-r/--resource, -s/--site")

    def test_harvester_push_wrapper(self) -> None:
        environ = {"HARVESTER_ID": "cern_harvester", "HARVESTER_WORKER_ID": "17"}
        config = self.wrapper(HARVESTER_PUSH, environ).config
        self.assertTrue(config.debug)
        self.assertFalse(config.allow_same_user)
        self.assertEqual(
            (config.job_type, config.resource_type, config.getjob_requests), ("unified", "MCORE", 1)
        )
        self.assertEqual((config.harvester_id, config.worker_id), ("cern_harvester", 17))
        harvester = config.harvester
        self.assertEqual(harvester.submit_mode, "PUSH")
        self.assertEqual(
            (harvester.workdir, harvester.datadir, harvester.event_status_dump, harvester.worker_attributes),
            (
                Path("/var/harvester/w17"),
                Path("/var/harvester/w17/data"),
                Path("/var/harvester/w17/event_status.dump.json"),
                Path("/var/harvester/w17/worker_attributes.json"),
            ),
        )
        self.assertEqual((harvester.mode, harvester.offline), ("harvester", True))
        self.assertFalse(config.report_worker_node, "no network in push mode")
        self.assertNoticesName(config.notices, "-t/--noproxyverification", "-r/--resource")
        self.assertNotIn("--harvester", " ".join(config.notices))

    def test_analysis_wrapper(self) -> None:
        config = self.wrapper(ANALYSIS).config
        self.assertEqual((config.job_label, config.version_tag, config.lifetime), ("user", "RC", 7200.0))
        self.assertEqual(
            (config.allow_other_country, config.country_group, config.working_group), (True, "us", "AP_TOP")
        )
        self.assertEqual(config.keep_workdirs, KeepWorkdirs.ALL, "--cleanup False keeps the directories")
        self.assertEqual((config.getjob_requests, config.getjob_failures), (4, 3))
        self.assertEqual(config.baseurls, ("https://a.example.org/trf", "https://b.example.org/trf"))
        self.assertEqual(
            config.notices, (), "--use-https True and --use-rucio-traces False ask for nothing new"
        )

    def test_arc_wrapper(self) -> None:
        config = self.wrapper(ARC).config
        self.assertEqual(
            config.job_label, "rcm_test2", "pilot3's RCM pilots ask for rcm_test2 instead of ptest"
        )
        self.assertIsNone(config.log_file, "--no-pilot-log")
        self.assertEqual(config.workdir, Path("/scratch/arc"))
        self.assertNoticesName(
            config.notices, "-b/--nocvmfs", "-t/--noproxyverification", "-u/--verifypayloadproxy",
            "-y/--notokenrenewal", "-k/--noworkerpilotstatusupdate", "--redirect-stdout", "--stageout-attempts",
            "--use-realtime-logging", "--realtime-logging-server", "--realtime-logname", "--rucio-host",
            "-L/--leasetime", "--subscribe-to-msgsvc", "--pod", "--hpc-resource", "--hpc-mode",
            "--es-executor-type", "--input-dir", "--output-dir", "--input-destination-dir",
        )  # fmt: skip
        self.assertEqual(config.harvester.mode, "arc", "-z without a Harvester directory: ARC's files")

    def test_every_option_of_the_reference_table_is_accepted(self) -> None:
        names = pilot3_option_names(PILOT3_REFERENCE.read_text(encoding="utf-8"))
        self.assertGreater(len(names), 70, names)
        for must in (
            "--joblabel",
            "-w",
            "--queuedata-url",
            "--getjobrequests",
            "--harvester-submit-mode",
            "-L",
        ):
            self.assertIn(must, names)
        cacert = Path(self.mktemp())
        cacert.write_text("not used at parse time")
        samples = {
            "port": "25443", "lifetime": "7200", "leasetime": "3600", "getjob-requests": "2",
            "getjob-failures": "5", "getjobrequests": "2", "getjobfailures": "5", "stageout-attempts": "2",
            "workflow": "stager", "harvester-submit-mode": "PULL", "resource-type": "SCORE",
            "url": "https://panda.example.org", "queuedata": "https://x.example/q.json",
            "queuedata-url": "https://x.example/q.json", "storagedata": "https://x.example/s.json",
            "storagedata-url": "https://x.example/s.json", "cacert": str(cacert),
            "capath": str(cacert.parent), "workdir": str(cacert.parent), "queue": "Q2",
            "cleanup": "false", "allow-other-country": "true", "allow-same-user": "false", "use-https": "true",
            "use-rucio-traces": "true",
        }  # fmt: skip
        known = PilotOptions(environ={})
        for name in names:
            if name.startswith("--"):
                canonical = known.synonyms.get(name[2:])
                takes_value = name[2:] + "=" in known.longOpt
            else:
                canonical = known.synonyms.get(name[1:])
                takes_value = name[1:] + ":" in known.shortOpt
            self.assertIsNotNone(canonical, f"{name} is not a txpilot option")
            argv = ["-q", "Q", name] + ([samples.get(str(canonical), "x")] if takes_value else [])
            options = self.parse(*argv)
            self.assertIsNotNone(options.config, argv)

    def test_pilot3_spellings_are_the_same_setting(self) -> None:
        """The last one given wins, as with pilot3's argparse (same destination)."""
        self.assertEqual(
            self.parse("-q", "Q", "-j", "user", "--joblabel", "managed").config.job_label, "managed"
        )
        self.assertEqual(
            self.parse("-q", "Q", "--joblabel", "managed", "-j", "user").config.job_label, "user"
        )
        config = self.parse("-q", "Q", "--getjobrequests", "7", "--getjobfailures", "9").config
        self.assertEqual((config.getjob_requests, config.getjob_failures), (7, 9))
        self.assertExits(["-q", "Q", "--getjobrequests", "many"], 2, "--getjob-requests")

    def test_version_tag_and_job_label(self) -> None:
        self.assertEqual(self.parse("-q", "Q", "-i", "RCM").config.job_label, "rcm_test2")
        self.assertEqual(self.parse("-q", "Q", "-i", "RCM", "-j", "managed").config.job_label, "managed")
        self.assertEqual(self.parse("-q", "Q", "-i", "ALRB", "-j", "managed").config.job_label, "rc_alrb")
        self.assertEqual(self.parse("-q", "Q", "-i", "RC").config.version_tag, "RC")
        self.assertEqual(self.parse("-q", "Q").config.version_tag, "PR")

    def test_boolean_options_take_pilot3_values(self) -> None:
        for word, expected in (("False", False), ("no", False), ("0", False), ("TRUE", True), ("y", True)):
            self.assertEqual(
                self.parse("-q", "Q", "--allow-other-country", word).config.allow_other_country, expected
            )
        self.assertEqual(self.parse("-q", "Q", "--cleanup=false").config.keep_workdirs, KeepWorkdirs.ALL)
        self.assertEqual(
            self.parse("-q", "Q", "--cleanup", "false", "--keep-workdirs", "failed").config.keep_workdirs,
            KeepWorkdirs.FAILED,
            "an explicit --keep-workdirs wins",
        )
        self.assertEqual(self.parse("-q", "Q", "--cleanup", "True").config.keep_workdirs, KeepWorkdirs.NONE)
        self.assertIn("--use-https", " ".join(self.parse("-q", "Q", "--use-https", "false").config.notices))
        self.assertExits(["-q", "Q", "--cleanup", "maybe"], 2, "--cleanup: expected a boolean")
        self.assertExits(["-q", "Q", "--use-https", "sure"], 2, "--use-https: expected a boolean")

    def test_workflow_choices(self) -> None:
        self.assertEqual(self.parse("-q", "Q", "-w", "generic").config.notices, ())
        config = self.parse("-q", "Q", "-w", "stager").config
        self.assertEqual(config.workflow, "stager")
        self.assertIn("-w/--workflow stager", config.notices[0])
        self.assertExits(["-q", "Q", "-w", "bogus"], 2, "--workflow: expected one of generic")

    def test_no_pilot_log(self) -> None:
        self.assertIsNone(self.parse("-q", "Q", "--no-pilot-log").config.log_file)
        self.assertExits(["-q", "Q", "--no-pilot-log", "--log-file", "x.json"], 2, "contradict")

    def test_config_file_takes_pilot3_names(self) -> None:
        path = self.config_file(
            '[pilot]\nqueue = "Q"\njoblabel = "managed"\njob-type = "user"\nnocvmfs = true\n'
            'cleanup = "False"\nharvester_submit_mode = "push"\nharvester_workdir = "/var/h/w1"\n'
        )
        config = self.parse("-c", path).config
        self.assertEqual((config.job_label, config.job_type), ("managed", "user"))
        self.assertEqual(config.keep_workdirs, KeepWorkdirs.ALL)
        self.assertEqual(config.harvester.submit_mode, "PUSH")
        self.assertIn("-b/--nocvmfs", " ".join(config.notices))
        self.assertExits(["-q", "Q", "--harvester-submit-mode", "PUSH"], 2, "needs --harvester-workdir")
        self.assertExits(
            ["-q", "Q", "-z", "--queuedata", "https://x.example/q.json"], 2, "no network connection"
        )
        both = self.config_file('[pilot]\nqueue = "Q"\njoblabel = "managed"\njob_label = "user"\n')
        self.assertExits(["-c", both], 2, "set the same setting")


class FirstRunTests(OptionTestCase):
    """What a new site operator gets wrong on a first run ends at once with one clear line."""

    def test_config_file_booleans_are_strict(self) -> None:
        for text, expected in (("false", False), ('"false"', False), ('"FALSE"', False), ('"True"', True)):
            path = self.config_file(f'[pilot]\nqueue = "Q"\ndebug = {text}\nno_worker_node_report = {text}\n')
            config = self.parse("-c", path).config
            self.assertEqual((config.debug, config.report_worker_node), (expected, not expected), text)
        for text in ('"no"', "1", '"off"', '""'):
            path = self.config_file(f'[pilot]\nqueue = "Q"\ndebug = {text}\n')
            self.assertExits(["-c", path], 2, "--debug: expected true or false")

    def test_config_file_numbers_are_not_booleans(self) -> None:
        path = self.config_file('[pilot]\nqueue = "Q"\nheartbeat = true\n')
        self.assertExits(["-c", path], 2, "--heartbeat: expected a number of seconds")

    def test_port_must_be_a_tcp_port(self) -> None:
        self.assertEqual(
            self.parse("-q", "Q", "--port", "65535").config.server_url, "https://pandaserver.cern.ch:65535"
        )
        self.assertExits(["-q", "Q", "--port", "99999"], 2, "--port: must be between 1 and 65535")
        self.assertExits(["-q", "Q", "-p", "0"], 2, "--port: must be between 1 and 65535")
        self.assertExits(
            ["-q", "Q", "--url", "https://panda.example.org:99999"], 2, "--url: Port out of range"
        )

    def test_lifetime_must_exceed_its_margin(self) -> None:
        self.assertExits(
            ["-q", "Q", "-l", "100"], 2, "--lifetime (100 s) must be longer than --lifetime-margin (180 s)"
        )
        self.assertExits(["-q", "Q", "-l", "60", "--lifetime-margin", "60"], 2, "must be longer than")
        self.assertExits(["-q", "Q"], 2, "--lifetime-margin", environ={"PANDAPILOT_LIFETIME": "120"})
        self.assertEqual(self.parse("-q", "Q", "-l", "61", "--lifetime-margin", "60").config.lifetime, 61.0)

    def test_transfer_parallelism_is_bounded(self) -> None:
        self.assertEqual(self.parse("-q", "Q").config.transfer_parallelism, 4)
        self.assertEqual(
            self.parse("-q", "Q", "--transfer-parallelism", "64").config.transfer_parallelism, 64
        )
        self.assertEqual(self.parse("-q", "Q", "--transfer-parallelism", "1").config.transfer_parallelism, 1)
        for bad in ("0", "65", "1000", "-3"):
            self.assertExits(
                ["-q", "Q", "--transfer-parallelism", bad],
                2,
                "--transfer-parallelism: must be between 1 and 64",
            )
        self.assertExits(["-q", "Q", "--transfer-parallelism", "many"], 2, "expected a whole number")

    def test_help_warns_that_twistd_daemonizes_without_n(self) -> None:
        usage = " ".join(PilotOptions(environ={}).getUsage(width=2000).split())
        self.assertIn("twistd --pidfile= -n pilot", usage)
        self.assertIn("without -n, twistd daemonizes", usage)
        self.assertIn("exit code is lost", usage)


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
