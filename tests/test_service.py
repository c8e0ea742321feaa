"""The pilot service on simulated time: lifecycle, heartbeats, timefloor, lifetime,
backoff, signals, server commands, bad job definitions, the final update.

The server is ``ScriptedPanda`` behind StubTreq, processes are fakes that end when
the test says so, and every timer runs on a ``task.Clock``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, cast

from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode
from pilot.experiments.generic import GenericExperiment
from pilot.queuedata import QueueData
from pilot.server.api import ApiMode
from pilot.server.client import PandaClient, RetryPolicy
from pilot.service import PilotService
from pilot.util.threads import PoolStopped

from .fakes import FakeProcessControl, FakeSpawner, ManualRunner, Scripted, ScriptedPanda, run_sync

BASE = "https://panda.example.org:25443"
T0 = 1_800_000_000.0


def job(panda_id: int, **extra: Any) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "PandaID": panda_id,
        "attemptNr": 1,
        "transformation": "/bin/echo",
        "jobPars": f"job {panda_id}",
        "outFiles": f"out.{panda_id}.txt,log.{panda_id}.tgz",
        "scopeOut": "test",
        "logFile": f"log.{panda_id}.tgz",
        "logGUID": f"00000000-0000-0000-0000-{panda_id:012d}",
        "scopeLog": "test",
        "coreCount": 1,
    }
    definition.update(extra)
    return definition


class ServiceHarness:
    """A PilotService wired to fakes, with helpers to drive it."""

    def __init__(
        self,
        test: SynchronousTestCase,
        *,
        timefloor: int = 0,
        api: ApiMode = ApiMode.V1,
        in_thread: Any = run_sync,
        experiment: Any = None,
        secrets_environ: dict[str, str] | None = None,
        helpers: Any = (),
        clock: Clock | None = None,
        **config: Any,
    ):
        if clock is None:
            clock = Clock()
            clock.advance(T0)
        self.clock = clock
        self.server = ScriptedPanda(self.clock)
        self.spawner = FakeSpawner(self.clock)
        self.control = FakeProcessControl(self.spawner)
        self.client = PandaClient(
            StubTreq(self.server),  # type: ignore[arg-type]
            BASE,
            self.clock,
            api=api,
            retry=RetryPolicy(attempts=3, initial=2.0, jitter=lambda: 0.0),
        )
        base = Path(test.mktemp())
        settings: dict[str, Any] = {
            "queue": "Q",
            "server_url": BASE,
            "workdir": base,
            "queuedata": QueueData(name="Q", resource="Q", timefloor=timefloor * 60),
            "log_file": None,
            "summary_file": base / "summary.json",
            "node": "wn01",
            # the scripted server counts calls; the node report is tested in test_workernode
            # and against the dev server in test_integration
            "report_worker_node": False,
        }
        settings.update(config)
        self.config = PilotConfig(**settings)
        self.reactor_stopped = 0
        self.service = PilotService(
            self.config,
            clock=self.clock,
            spawner=self.spawner,
            client=self.client,
            experiment=experiment or GenericExperiment(),
            in_thread=in_thread,
            environ={"PATH": "/usr/bin:/bin", "X509_USER_PROXY": "/secret/proxy", **(secrets_environ or {})},
            stop_reactor=self._stopped,
            jitter=lambda: 0.5,
            process_control=self.control,
            helpers=helpers,
        )

    def _stopped(self) -> None:
        self.reactor_stopped += 1

    def start(self) -> None:
        self.service.startService()

    def payload(self) -> Any:
        return self.spawner.last_payload()

    def finish_payload(self, exit_code: int = 0, *, write_outputs: bool = True) -> None:
        process = self.payload()
        if write_outputs:
            assert process.path is not None
            panda_id = int(process.env["PandaID"])
            (Path(process.path) / f"out.{panda_id}.txt").write_text(f"output of {panda_id}\n")
        process.end(exit_code)
        self.clock.advance(0)  # the log tarball's tar process

    @property
    def done(self) -> bool:
        return self.service.exit_code is not None


class LifecycleTests(SynchronousTestCase):
    def test_one_job_end_to_end(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(101))
        h.start()
        self.assertEqual(h.server.states(101), ["starting", "running"])
        payload = h.payload()
        self.assertEqual(payload.command, ["/bin/bash", "-c", "/bin/echo job 101"])
        self.assertEqual(Path(str(payload.path)).name, "PanDA_Pilot-101")
        self.assertNotIn("X509_USER_PROXY", payload.env, "the pilot's proxy stays out of the payload")
        self.assertEqual(payload.env["PandaID"], "101")
        h.finish_payload(0)
        self.assertEqual(h.server.states(101), ["starting", "running", "finished"])
        final = h.server.updates(101)[-1]
        self.assertEqual(final["trans_exit_code"], 0)
        self.assertEqual(final["pilot_error_code"], 0)
        self.assertEqual(final["attempt_nr"], 1)
        report = json.loads(final["xml"])
        self.assertEqual(set(report), {"out.101.txt", "log.101.tgz"})
        self.assertEqual(report["log.101.tgz"]["guid"], "00000000-0000-0000-0000-000000000101")
        self.assertEqual(report["out.101.txt"]["fsize"], len("output of 101\n"))
        self.assertEqual(len(report["out.101.txt"]["adler32"]), 8)
        self.assertEqual(h.service.exit_code, ExitCode.OK)
        self.assertEqual(h.reactor_stopped, 1)
        self.assertEqual(len(h.server.acquires()), 1, "timefloor 0: one job per pilot")
        self.assertEqual(h.clock.getDelayedCalls(), [])
        summary = json.loads((h.config.workdir / "summary.json").read_text())
        self.assertEqual(summary["pilot"]["exit_code"], 0)
        self.assertEqual(summary["jobs"][0]["state"], "finished")
        self.assertEqual(summary["jobs"][0]["final_update"], "delivered")
        self.assertFalse(Path(str(payload.path)).exists(), "work directory removed by default")

    def test_payload_failure_is_reported(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(102))
        h.start()
        h.finish_payload(3, write_outputs=False)
        final = h.server.updates(102)[-1]
        self.assertEqual(final["state"], "failed")
        self.assertEqual(final["trans_exit_code"], 3)
        self.assertEqual(final["pilot_error_code"], ErrorCode.PAYLOADEXECUTIONFAILURE)
        self.assertIn("exited with code 3", final["pilot_error_diag"])
        self.assertEqual(
            list(json.loads(final["xml"])), ["log.102.tgz"], "a failed job still reports its log"
        )

    def test_missing_output_fails_the_job(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(103))
        h.start()
        h.finish_payload(0, write_outputs=False)
        final = h.server.updates(103)[-1]
        self.assertEqual(final["state"], "failed")
        self.assertEqual(final["pilot_error_code"], ErrorCode.MISSINGOUTPUTFILE)

    def test_legacy_api(self) -> None:
        h = ServiceHarness(self, api=ApiMode.LEGACY)
        h.server.jobs.append(job(104))
        h.start()
        h.finish_payload(0)
        self.assertEqual(h.server.states(104), ["starting", "running", "finished"])
        self.assertTrue(all(c.path.startswith("/server/panda/") for c in h.server.calls))


class UntrustedInputTests(SynchronousTestCase):
    """What comes from outside the pilot is checked before it is used."""

    def test_http_transformation_without_checksum_is_not_run(self) -> None:
        h = ServiceHarness(self)
        h.server.files["/trf/run.sh"] = b"#!/bin/sh\necho x\n"
        h.server.jobs.append(job(121, transformation="http://panda.example.org:25080/trf/run.sh"))
        h.start()
        h.clock.advance(0)  # the log tarball
        final = h.server.updates(121)[-1]
        self.assertEqual(final["pilot_error_code"], ErrorCode.TRFDOWNLOADFAILURE)
        self.assertIn("checksum", final["pilot_error_diag"])
        self.assertFalse([c for c in h.server.calls if c.method == "GET"], "nothing was downloaded")
        self.assertEqual(h.spawner.payloads(), [])

    def test_http_transformation_allowed_by_the_site(self) -> None:
        h = ServiceHarness(self, allow_http_transformations=True)
        h.server.jobs.append(job(122, transformation="http://panda.example.org/trf/run.sh"))
        h.start()
        self.assertNotEqual(h.server.updates(122)[-1].get("pilot_error_code"), ErrorCode.TRFDOWNLOADFAILURE)

    def test_a_secret_the_pilot_knows_never_reaches_the_server(self) -> None:
        token = "opaque-0123456789abcdef"  # no pattern would recognise it
        h = ServiceHarness(self, secrets_environ={"BEARER_TOKEN": token})
        h.server.jobs.append(job(123))
        h.start()
        payload = h.payload()
        assert payload.path is not None
        # the payload's last words quote the token; they become the payload's error diagnostic
        (Path(payload.path) / "payload.stderr").write_text(f"fatal: token {token} refused\n")
        h.finish_payload(1)
        final = h.server.updates(123)[-1]
        self.assertIn("[REDACTED]", final["exe_error_diag"], "the diagnostic quoted the payload")
        sent = json.dumps([c.params for c in h.server.calls])
        self.assertNotIn(token, sent)

    def test_a_plugins_hostile_log_tarball_name_is_refused(self) -> None:
        class Hostile(GenericExperiment):
            def log_tarball_name(self, job: Any) -> str:
                return "../../outside.tgz"

        h = ServiceHarness(self, experiment=Hostile())
        h.server.jobs.append(job(124))
        h.start()
        h.finish_payload(0)
        final = h.server.updates(124)[-1]
        self.assertEqual(final["pilot_error_code"], ErrorCode.LOGFILECREATIONFAILURE)
        self.assertFalse((Path(str(h.service.config.workdir)) / "outside.tgz").exists())


class WorkdirAndTransformationTests(SynchronousTestCase):
    def test_url_transformation_is_downloaded_and_run(self) -> None:
        h = ServiceHarness(self)
        h.server.files["/trf/runGen-00-00-02"] = b"#!/bin/sh\necho analysis\n"
        h.server.jobs.append(job(111, transformation=f"{BASE}/trf/runGen-00-00-02", jobPars="--in a.root"))
        h.start()
        payload = h.payload()
        self.assertEqual(payload.command[-1], "./runGen-00-00-02 --in a.root")
        script = Path(str(payload.path)) / "runGen-00-00-02"
        self.assertEqual(script.read_bytes(), b"#!/bin/sh\necho analysis\n")
        self.assertEqual(script.stat().st_mode & 0o777, 0o700, "executable for the pilot user only")
        h.finish_payload(0)

    def test_failed_download_fails_the_job(self) -> None:
        h = ServiceHarness(self, baseurls=("https://mirror.example.org",))
        h.server.jobs.append(job(112, transformation=f"{BASE}/trf/missing"))
        h.start()
        h.clock.pump([2.0, 4.0, 2.0, 4.0])
        h.clock.advance(0)
        final = h.server.updates(112)[-1]
        self.assertEqual(final["state"], "failed")
        self.assertEqual(final["pilot_error_code"], ErrorCode.TRFDOWNLOADFAILURE)
        self.assertEqual(h.spawner.payloads(), [])

    def test_failed_job_directories_kept_on_request(self) -> None:
        h = ServiceHarness(self, timefloor=60, keep_workdirs=KeepWorkdirs.FAILED)
        h.server.jobs += [job(113), job(114)]
        h.start()
        first = Path(str(h.payload().path))
        h.finish_payload(0)
        second = Path(str(h.payload().path))
        h.finish_payload(1)
        self.assertFalse(first.exists(), "finished job: removed")
        self.assertTrue((second / "payload.stdout").exists(), "failed job: kept for inspection")
        summary = json.loads((second / "job_summary.json").read_text())
        self.assertEqual(summary["state"], "failed")


class HeartbeatTests(SynchronousTestCase):
    def test_heartbeat_period(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(201))
        h.start()
        self.assertEqual(len(h.server.updates(201)), 2)
        h.clock.advance(1799)
        self.assertEqual(len(h.server.updates(201)), 2)
        h.clock.advance(1)
        self.assertEqual(h.server.states(201), ["starting", "running", "running"])
        self.assertEqual(h.server.calls[-1].time, T0 + 1800)
        h.clock.advance(1800)
        self.assertEqual(len(h.server.updates(201)), 4)
        h.finish_payload(0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_debug_command_switches_period(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(202))
        h.start()
        h.server.commands[202] = "debug"
        h.clock.advance(1800)  # first heartbeat; its reply says debug
        h.clock.advance(59)
        self.assertEqual(len(h.server.updates(202)), 3)
        h.clock.advance(1)
        self.assertEqual(len(h.server.updates(202)), 4)
        h.clock.advance(60)
        self.assertEqual(len(h.server.updates(202)), 5)
        h.server.commands[202] = "debugoff"
        h.clock.advance(60)
        h.clock.advance(60)
        self.assertEqual(len(h.server.updates(202)), 6, "back to the normal period")
        h.finish_payload(0)

    def test_debug_job_starts_with_the_debug_period(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(203, debug="True"))
        h.start()
        h.clock.advance(60)
        self.assertEqual(len(h.server.updates(203)), 3)
        h.finish_payload(0)


class MultiJobTests(SynchronousTestCase):
    def test_timefloor(self) -> None:
        h = ServiceHarness(self, timefloor=10)
        h.server.jobs += [job(301), job(302), job(303)]
        h.start()
        h.clock.advance(100)
        h.finish_payload(0)
        self.assertEqual(len(h.server.acquires()), 2, "100 s < 600 s: the next job is fetched at once")
        self.assertEqual(h.server.acquires()[1].time, T0 + 100)
        h.clock.advance(600)
        h.finish_payload(0)
        self.assertEqual(len(h.server.acquires()), 2, "700 s >= 600 s: the timefloor is used up")
        self.assertEqual(h.service.exit_code, ExitCode.OK)
        self.assertEqual([s.state for s in h.service.summaries], ["finished", "finished"])

    def test_remaining_lifetime_stops_fetching(self) -> None:
        h = ServiceHarness(self, timefloor=600, lifetime=1000.0, lifetime_margin=100.0)
        h.server.jobs += [job(311), job(312)]
        h.start()
        remaining = h.server.acquires()[0].params["remaining_time"]
        self.assertEqual(remaining, 900)
        h.clock.advance(850)
        h.finish_payload(0)
        self.assertEqual(len(h.server.acquires()), 1, "50 s left is too little for another job")
        self.assertEqual(h.service.exit_code, ExitCode.OK)

    def test_nojob_backoff(self) -> None:
        h = ServiceHarness(self, getjob_requests=3, nojob_backoff=5.0)
        h.start()
        self.assertEqual([c.time - T0 for c in h.server.acquires()], [0.0])
        h.clock.advance(4.9)
        self.assertEqual(len(h.server.acquires()), 1)
        h.clock.advance(0.1)
        h.clock.advance(10.0)
        self.assertEqual([c.time - T0 for c in h.server.acquires()], [0.0, 5.0, 15.0])
        self.assertEqual(h.service.exit_code, ExitCode.OK, "no job is not an error")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_backoff_after_server_errors(self) -> None:
        h = ServiceHarness(self, getjob_requests=2, getjob_failures=2, nojob_backoff=5.0)
        h.server.scripted += [Scripted(503, b"busy", "text/plain")] * 6
        h.start()
        h.clock.pump([2.0, 4.0, 5.0, 2.0, 4.0])
        times = [c.time - T0 for c in h.server.acquires()]
        self.assertEqual(times, [0.0, 2.0, 6.0, 11.0, 13.0, 17.0])
        self.assertEqual(h.service.exit_code, ExitCode.COMMUNICATIONFAILURE)

    def test_failed_requests_count_toward_failures_not_requests(self) -> None:
        """-v counts answers without a job, -x failed requests: failures alone reach -x."""
        h = ServiceHarness(self, getjob_requests=1, getjob_failures=3, nojob_backoff=5.0)
        h.server.scripted += [Scripted(503, b"busy", "text/plain")] * 9  # 3 attempts per request
        h.start()
        h.clock.pump([2.0, 4.0, 5.0, 2.0, 4.0, 10.0, 2.0, 4.0])
        self.assertEqual(len(h.server.acquires()), 9, "three requests of three attempts each")
        self.assertEqual(h.service.exit_code, ExitCode.COMMUNICATIONFAILURE)

    def test_no_job_answers_after_a_failure_reach_the_request_limit(self) -> None:
        h = ServiceHarness(self, getjob_requests=2, getjob_failures=5, nojob_backoff=5.0)
        h.server.scripted += [Scripted(503, b"busy", "text/plain")] * 3
        h.start()
        h.clock.pump([2.0, 4.0, 5.0, 10.0])
        self.assertEqual(len(h.server.acquires()), 5, "one failed request, then two without a job")
        self.assertEqual(h.service.exit_code, ExitCode.OK)

    def test_no_role_ends_the_pilot_at_once(self) -> None:
        for reply in (
            Scripted(
                200,
                b'{"success": false, "message": "no production/pilot role in VOMS FQANs or non pilot owner", "data": null}',
            ),
            Scripted(
                403, b"ERROR : Token authentication failed. signature verification failed", "text/plain"
            ),
        ):
            h = ServiceHarness(self, getjob_requests=5)
            h.server.scripted.append(reply)
            h.start()
            self.assertEqual(len(h.server.acquires()), 1)
            self.assertEqual(h.service.exit_code, ExitCode.NOPROXY)
            self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_bad_definitions_are_failed_and_the_pilot_goes_on(self) -> None:
        h = ServiceHarness(self, timefloor=60)
        missing_id = job(1)
        del missing_id["PandaID"]
        h.server.jobs += [
            missing_id,
            job(402, attemptNr="abc"),
            job(403, inFiles="a.root,b.root", GUID="g1,g2,g3", scopeIn="s,s"),
            job(404, outFiles="../../etc/passwd,log.404.tgz"),
            job(406, inFiles="../../etc/passwd", scopeIn="s"),
            job(405),
        ]
        h.start()
        self.assertEqual(len(h.server.acquires()), 6)
        self.assertEqual(h.server.states(402), ["failed"])
        self.assertEqual(h.server.updates(406)[0]["pilot_error_code"], ErrorCode.STAGEINFAILED)
        bad_attempt = h.server.updates(402)[0]
        self.assertEqual(bad_attempt["pilot_error_code"], ErrorCode.CONVERSIONFAILURE)
        self.assertIn("attemptNr", bad_attempt["pilot_error_diag"])
        self.assertNotIn("attempt_nr", bad_attempt)
        mismatch = h.server.updates(403)[0]
        self.assertEqual(mismatch["pilot_error_code"], ErrorCode.NOTSAMELENGTH)
        self.assertIn("GUID", mismatch["pilot_error_diag"])
        hostile = h.server.updates(404)[0]
        self.assertEqual(hostile["pilot_error_code"], ErrorCode.BADOUTPUTFILENAME)
        self.assertEqual(len(h.spawner.payloads()), 1, "no process ran for a bad definition")
        h.finish_payload(0)
        self.assertEqual(h.server.states(405), ["starting", "running", "finished"])
        self.assertEqual(
            [s.state for s in h.service.summaries],
            ["rejected", "failed", "failed", "failed", "failed", "finished"],
        )


class FirstRunTests(SynchronousTestCase):
    """What a new site operator sees on a first run."""

    def events(self) -> list[dict[str, Any]]:
        """Every log event from now to the end of the test."""
        captured: list[dict[str, Any]] = []
        observer = cast(ILogObserver, captured.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return captured

    def test_quick_end_with_a_node_report_in_flight_logs_no_failure(self) -> None:
        events = self.events()
        h = ServiceHarness(self, report_worker_node=True, getjob_requests=1)
        h.server.hold.add("/api/v1/pilot/update_worker_node")
        h.start()
        h.clock.advance(0)
        self.assertEqual(h.service.exit_code, ExitCode.OK)
        self.successResultOf(h.service.stopService())
        failures = [e for e in events if "log_failure" in e or e.get("log_level") is LogLevel.critical]
        self.assertEqual(failures, [], "a cancelled node report is not a failure")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_missing_credentials_are_named_at_start(self) -> None:
        events = self.events()
        h = ServiceHarness(self, getjob_requests=1)
        h.start()
        notices = [e for e in events if e.get("event") == "pilot.no_credential"]
        self.assertEqual(len(notices), 1)
        self.assertIn("token file", formatEvent(notices[0]))

    def test_no_queue_configuration_is_named_at_start(self) -> None:
        events = self.events()
        h = ServiceHarness(self, getjob_requests=1, queuedata=None)
        h.start()
        self.assertEqual(len([e for e in events if e.get("event") == "pilot.no_queuedata"]), 1)

    def test_wrapper_options_reach_the_log_the_request_and_the_pilot_id(self) -> None:
        events = self.events()
        notice = "option -b/--nocvmfs has no effect in txpilot: it does not check CVMFS"
        h = ServiceHarness(self, notices=(notice,), version_tag="RC", job_type="user", working_group="AP_X")
        h.server.jobs.append(job(131))
        h.start()
        self.assertEqual([e["notice"] for e in events if e.get("event") == "pilot.notice"], [notice])
        request = h.server.acquires()[0].params
        self.assertEqual(request["job_type"], "user")
        self.assertIn("|RC|txpilot-", h.server.updates(131)[0]["pilot_id"])

    def test_a_missing_queue_configuration_names_its_url_once(self) -> None:
        events = self.events()
        url = f"{BASE}/cache/schedconfig/NOPE.all.json"
        h = ServiceHarness(self, queuedata=None, queuedata_source=url)
        h.start()
        self.assertEqual(h.service.exit_code, ExitCode.QUEUEDATA)
        (failed,) = [e for e in events if e.get("event") == "pilot.startup_failed"]
        text = formatEvent(failed)
        self.assertEqual(text.count(url), 1, text)

    def test_lifetime_within_the_margin_asks_nothing_and_leaves_nothing(self) -> None:
        threads = ManualRunner()
        h = ServiceHarness(self, lifetime=100.0, lifetime_margin=180.0, in_thread=threads)
        h.start()
        for _ in range(5):  # threads finish out of order: the status file write comes last
            threads.run_newest_first()
            h.clock.advance(0)
        self.assertEqual(h.server.acquires(), [])
        self.assertIsNotNone(h.service.exit_code)
        self.assertFalse(Path(str(h.service.pilot_dir)).exists(), "the pilot directory is removed")


class StoppableRunner(Service):
    """A ThreadRunner whose work completes on the next clock tick, as a thread's result reaches
    the reactor later; once its service stops, it refuses work, as a stopped pool does."""

    name = "stoppable-runner"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.running:
            return fail(PoolStopped("stopped"))
        return deferLater(self.clock, 0, f, *args, **kwargs)


class ShutdownTests(SynchronousTestCase):
    def test_stopping_the_service_wraps_up_before_the_pools_stop(self) -> None:
        clock = Clock()
        clock.advance(T0)
        runner = StoppableRunner(clock)
        h = ServiceHarness(self, in_thread=runner, helpers=[runner], clock=clock)
        h.server.jobs.append(job(701))
        h.start()
        for _ in range(20):
            clock.advance(0)
        pilot_dir = Path(str(h.service.pilot_dir))
        self.assertTrue(pilot_dir.is_dir())
        self.assertTrue(h.spawner.payloads(), "the job runs")
        stopping = h.service.stopService()  # as twistd does at shutdown
        for _ in range(40):
            clock.advance(0)
        self.successResultOf(stopping)
        self.assertEqual(h.server.updates(701)[-1]["pilot_error_code"], ErrorCode.GENERALERROR)
        self.assertFalse(pilot_dir.exists(), "removed before the thread pools stopped")
        summary = json.loads(h.config.summary_file.read_text())  # type: ignore[union-attr]
        self.assertEqual(summary["pilot"]["exit_name"], "GENERALERROR")
        self.assertFalse(runner.running)


class SignalTests(SynchronousTestCase):
    def test_sigterm_fails_the_job_and_sets_the_exit_code(self) -> None:
        h = ServiceHarness(self, timefloor=60)
        h.server.jobs += [job(501), job(502)]
        h.start()
        pid = h.payload().pid
        h.clock.advance(30)
        h.service.handle_signal(signal.SIGTERM)
        self.assertEqual(h.control.signals[0], (pid, signal.SIGTERM, T0 + 30))
        h.clock.advance(0)
        final = h.server.updates(501)[-1]
        self.assertEqual(final["state"], "failed")
        self.assertEqual(final["pilot_error_code"], ErrorCode.SIGTERM)
        self.assertIn("SIGTERM", final["pilot_error_diag"])
        self.assertEqual(h.service.exit_code, ExitCode.SIGTERM)
        self.assertEqual(int(h.service.exit_code or 0), 143)
        self.assertEqual(len(h.server.acquires()), 1, "no job is fetched after a signal")
        self.assertEqual(h.reactor_stopped, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_second_signal_kills_at_once(self) -> None:
        h = ServiceHarness(self, kill_grace=30.0)
        h.control.obey_term = False
        h.server.jobs.append(job(503))
        h.start()
        h.service.handle_signal(signal.SIGINT)
        h.clock.advance(5)
        self.assertFalse(h.done)
        h.service.handle_signal(signal.SIGINT)
        self.assertEqual([s for _, s, _ in h.control.signals], [signal.SIGTERM, signal.SIGKILL])
        h.clock.advance(0)
        self.assertEqual(h.server.updates(503)[-1]["pilot_error_code"], ErrorCode.SIGINT)
        self.assertEqual(h.service.exit_code, ExitCode.SIGINT)

    def test_signal_escalation_timing(self) -> None:
        h = ServiceHarness(self, kill_grace=10.0)
        h.control.obey_term = False
        h.server.jobs.append(job(504))
        h.start()
        h.service.handle_signal(signal.SIGUSR1)
        h.clock.advance(9.9)
        self.assertFalse(h.done)
        h.clock.advance(0.1)
        h.clock.advance(0)
        self.assertEqual(
            [(s, t - T0) for _, s, t in h.control.signals][:2],
            [(signal.SIGTERM, 0.0), (signal.SIGKILL, 10.0)],
        )
        self.assertEqual(h.server.updates(504)[-1]["pilot_error_code"], ErrorCode.SIGUSR1)
        self.assertEqual(int(h.service.exit_code or 0), 138)

    def test_signal_while_waiting_for_a_job(self) -> None:
        h = ServiceHarness(self, getjob_requests=5)
        h.start()
        h.clock.advance(1)
        h.service.handle_signal(signal.SIGQUIT)
        self.assertEqual(h.service.exit_code, ExitCode.SIGQUIT)
        self.assertEqual(len(h.server.acquires()), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_signal_during_a_transformation_download_tries_no_other_mirror(self) -> None:
        """A cancelled download is not a failed mirror: no next mirror, no process, one final update."""
        h = ServiceHarness(self, baseurls=("https://mirror.example.org",))
        h.server.hold.add("/trf/runGen")
        h.server.jobs.append(job(506, transformation=f"{BASE}/trf/runGen"))
        h.start()
        self.assertEqual(len(h.server.held), 1, "the download is under way")
        calls = len(h.server.calls)
        h.service.handle_signal(signal.SIGTERM)
        h.clock.advance(0)
        after = [c.path for c in h.server.calls[calls:]]
        self.assertEqual(after, ["/api/v1/pilot/update_job"], "the final update and nothing else")
        self.assertEqual(h.server.updates(506)[-1]["pilot_error_code"], ErrorCode.SIGTERM)
        self.assertEqual(h.spawner.processes, [], "no process started")
        self.assertEqual(h.service.exit_code, ExitCode.SIGTERM)

    def test_signal_during_a_preprocess_download_is_not_a_preprocess_failure(self) -> None:
        h = ServiceHarness(self)
        h.server.hold.add("/tools/prep.sh")
        h.server.jobs.append(job(507, preprocess={"command": f"{BASE}/tools/prep.sh"}))
        h.start()
        self.assertEqual(len(h.server.held), 1)
        h.service.handle_signal(signal.SIGTERM)
        h.clock.advance(0)
        final = h.server.updates(507)[-1]
        self.assertEqual(final["pilot_error_code"], ErrorCode.SIGTERM, final.get("pilot_error_diag"))
        self.assertEqual(h.spawner.processes, [])
        self.assertEqual(h.service.exit_code, ExitCode.SIGTERM)

    def test_lifetime_end_kills_the_job(self) -> None:
        h = ServiceHarness(self, lifetime=1000.0, lifetime_margin=100.0)
        h.server.jobs.append(job(505))
        h.start()
        h.clock.advance(899)
        self.assertEqual(h.control.signals, [])
        h.clock.advance(1)
        self.assertEqual(h.control.signals[0][1:], (signal.SIGTERM, T0 + 900))
        h.clock.advance(0)
        final = h.server.updates(505)[-1]
        self.assertEqual(final["pilot_error_code"], ErrorCode.REACHEDMAXTIME)
        self.assertEqual(h.service.exit_code, ExitCode.REACHEDMAXTIME)


class ServerCommandTests(SynchronousTestCase):
    def test_tobekilled(self) -> None:
        h = ServiceHarness(self, timefloor=60)
        h.server.jobs += [job(601), job(602)]
        h.start()
        h.server.commands[601] = "tobekilled"
        h.clock.advance(1800)
        h.clock.advance(0)
        h.clock.advance(0)
        final = h.server.updates(601)[-1]
        self.assertEqual(final["state"], "failed")
        self.assertEqual(final["pilot_error_code"], ErrorCode.PANDAKILL)
        self.assertIn("log.601.tgz", json.loads(final["xml"]), "the log of a killed job is still made")
        self.assertEqual(len(h.server.acquires()), 2, "a server kill ends the job, not the pilot")
        h.finish_payload(0)
        h.clock.advance(5.0)  # one more request (timefloor left), no job, the pilot ends
        self.assertEqual(h.service.exit_code, ExitCode.OK)

    def test_softkill_lets_the_job_finish(self) -> None:
        h = ServiceHarness(self, timefloor=60)
        h.server.jobs += [job(603), job(604)]
        h.server.commands[603] = "softkill"
        h.start()
        h.finish_payload(0)
        self.assertEqual(h.server.states(603)[-1], "finished")
        self.assertEqual(len(h.server.acquires()), 1)
        self.assertEqual(h.service.exit_code, ExitCode.OK)


class FinalUpdateTests(SynchronousTestCase):
    def test_final_update_retried_until_accepted(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(701))
        h.start()
        h.server.update_status += [30, 10]
        h.finish_payload(0)
        self.assertEqual(h.server.states(701), ["starting", "running", "finished"])
        self.assertFalse(h.done)
        h.clock.advance(4.99)
        self.assertEqual(len(h.server.updates(701)), 3)
        h.clock.advance(1.01)  # 5 s backoff + up to 1 s jitter
        self.assertEqual(len(h.server.updates(701)), 4)
        h.clock.advance(11)  # 10 s + jitter
        self.assertEqual(len(h.server.updates(701)), 5)
        self.assertTrue(h.done)
        self.assertEqual(h.service.summaries[0].final_update, "delivered")

    def test_final_update_given_up_at_the_end_of_the_lifetime(self) -> None:
        h = ServiceHarness(self, lifetime=2000.0, lifetime_margin=100.0)
        h.server.jobs.append(job(702))
        h.start()
        h.server.update_status += [30] * 1000
        h.finish_payload(0)
        while not h.done:
            h.clock.advance(min(d.getTime() for d in h.clock.getDelayedCalls()) - h.clock.seconds())
        self.assertLessEqual(h.clock.seconds(), T0 + 2000)
        self.assertEqual(h.service.summaries[0].final_update, "lost")

    def test_signal_during_final_update_retries_shortens_the_wait(self) -> None:
        """A pilot stuck retrying its final update against a dead server obeys SIGTERM."""
        h = ServiceHarness(self, shutdown_grace=60.0, kill_grace=10.0)
        h.server.jobs.append(job(704))
        h.start()
        h.server.scripted += [Scripted(503, b"down", "text/plain")] * 10_000
        h.finish_payload(0)
        h.clock.advance(3600)
        self.assertFalse(h.done, "retrying until the lifetime ends")
        signalled = h.clock.seconds()
        h.service.handle_signal(signal.SIGTERM)
        while not h.done:
            h.clock.advance(min(d.getTime() for d in h.clock.getDelayedCalls()) - h.clock.seconds())
        self.assertLessEqual(h.clock.seconds(), signalled + 70)
        self.assertEqual(h.service.summaries[0].final_update, "lost")
        self.assertEqual(h.service.exit_code, ExitCode.SIGTERM)

    def test_final_update_with_a_dead_server_is_bounded_on_signal(self) -> None:
        h = ServiceHarness(self, shutdown_grace=60.0, kill_grace=10.0)
        h.server.jobs.append(job(703))
        h.start()
        h.server.scripted += [Scripted(503, b"down", "text/plain")] * 1000
        h.service.handle_signal(signal.SIGTERM)
        while not h.done:
            h.clock.advance(min(d.getTime() for d in h.clock.getDelayedCalls()) - h.clock.seconds())
        self.assertLessEqual(h.clock.seconds(), T0 + 70)
        self.assertEqual(h.service.exit_code, ExitCode.SIGTERM)
        self.assertEqual(h.clock.getDelayedCalls(), [])
