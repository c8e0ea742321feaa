"""Each phase of a job alone, on a hand-built ``JobContext`` and a ``task.Clock``.

The reporter records updates instead of talking to a server, processes are fakes
that end when the test says so, and blocking helpers run at once.  What the whole
pipeline does with the same phases is in ``test_service`` and the end-to-end tests.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.config import PilotConfig
from pilot.errorcodes import ErrorCode
from pilot.experiments.generic import GenericExperiment
from pilot.interfaces import IJobReporter
from pilot.job.beats import JobBeats
from pilot.job.context import JobContext, JobEnvironment
from pilot.job.phases.execute import ExecutePhase
from pilot.job.phases.finish import FinishPhase
from pilot.job.phases.setup import SetupPhase
from pilot.job.phases.staging import StageInPhase, StageOutPhase
from pilot.job.states import JobPhase
from pilot.job.summary import JobSummary
from pilot.job.updates import PilotIdentity
from pilot.model.job import parse_job
from pilot.monitor.settings import MonitorSettings
from pilot.queuedata import QueueData
from pilot.server.client import JobUpdate, ServerUnavailable, StatusCode, UpdateResult

from .fakes import FakeProcessControl, FakeSpawner, ManualRunner, run_sync

T0 = 1_800_000_000.0


@implementer(IJobReporter)
class RecordingReporter:
    """Takes every update; ``fail_all`` makes every delivery fail (a dead server)."""

    def __init__(self) -> None:
        self.updates: list[tuple[JobUpdate, bool]] = []
        self.fail_all = False
        self.commands: tuple[str, ...] = ()

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        self.updates.append((update, final))
        if self.fail_all:
            return fail(ServerUnavailable("the server is down"))
        return succeed(UpdateResult(StatusCode.SUCCESS, self.commands))

    def states(self) -> list[str]:
        return [u.state for u, _ in self.updates]


class PhaseHarness:
    """One job's context with fakes all around."""

    def __init__(self, test: SynchronousTestCase, **definition: Any) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.spawner = FakeSpawner(self.clock)
        self.reporter = RecordingReporter()
        self.downloads: dict[str, Deferred[bytes]] = {}
        self.in_thread: Callable[..., Deferred[Any]] = run_sync
        base = Path(test.mktemp()).absolute()
        base.mkdir()
        config = PilotConfig(
            queue="Q",
            server_url="https://panda.example.org",
            workdir=base,
            monitor=MonitorSettings(min_free_start=0, min_free_running=0),
        )
        raw: dict[str, Any] = {
            "PandaID": 7,
            "attemptNr": 1,
            "transformation": "/bin/echo",
            "jobPars": "hello",
            "outFiles": "out.txt,log.tgz",
            "scopeOut": "test",
            "logFile": "log.tgz",
            "logGUID": "00000000-0000-0000-0000-000000000007",
            "scopeLog": "test",
        }
        raw.update(definition)
        self.env = JobEnvironment(
            reporter=self.reporter,
            download=self._download,
            fetch_file=self._fetch_file,
            clock=self.clock,
            spawner=self.spawner,
            in_thread=lambda f, *a, **k: self.in_thread(f, *a, **k),
            config=config,
            queuedata=QueueData(name="Q", resource="Q"),
            experiment=GenericExperiment(),
            identity=PilotIdentity(site_name="Q", node="wn", pilot_id="test"),
            pilot_dir=base,
            pilot_environ={"PATH": "/usr/bin:/bin"},
            deadline=lambda: T0 + 3600,
            process_control=FakeProcessControl(self.spawner),
        )
        job = parse_job(raw)
        self.ctx = JobContext(self.env, job, JobSummary(panda_id=job.panda_id, state="received"))
        self.beats = JobBeats(self.ctx)  # heartbeat body and command handling, as the job run sets them up

    def _download(self, url: str) -> Deferred[bytes]:
        waiting: Deferred[bytes] = Deferred()
        self.downloads[url] = waiting
        return waiting

    def _fetch_file(self, url: str, target: Path) -> Deferred[Path]:
        return self._download(url).addCallback(lambda data: (target.write_bytes(data), target)[1])

    def run(self, phase: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(phase(self.ctx).run())

    def set_up(self) -> None:
        """The setup and stage-in phases, done (what later phases need)."""
        self.run(SetupPhase)
        self.run(StageInPhase)
        assert self.ctx.workdir is not None


class SetupPhaseTests(SynchronousTestCase):
    def test_work_directory_starting_update_and_heartbeat(self) -> None:
        h = PhaseHarness(self)
        self.successResultOf(h.run(SetupPhase))
        workdir = h.ctx.workdir
        assert workdir is not None
        self.assertEqual(stat.S_IMODE(workdir.stat().st_mode), 0o700, "the job's directory is private")
        self.assertEqual(h.reporter.states(), ["starting"])
        h.clock.advance(h.env.config.heartbeat_period)
        self.assertEqual(h.reporter.states(), ["starting", "starting"], "a heartbeat while in setup")
        self.successResultOf(Deferred.fromCoroutine(h.ctx.heartbeat.stop()))  # type: ignore[union-attr]

    def test_abort_during_the_transformation_download(self) -> None:
        h = PhaseHarness(self, transformation="https://example.org/trf/run.sh")
        running = h.run(SetupPhase)
        self.assertEqual(list(h.downloads), ["https://example.org/trf/run.sh"])
        h.ctx.abort(ErrorCode.SIGTERM, "signal")
        self.failureResultOf(running, CancelledError)
        self.assertEqual(h.ctx.errors.first.code, ErrorCode.SIGTERM)  # type: ignore[union-attr]
        self.successResultOf(Deferred.fromCoroutine(h.ctx.heartbeat.stop()))  # type: ignore[union-attr]

    def test_nothing_happens_after_an_abort(self) -> None:
        h = PhaseHarness(self)
        h.ctx.abort(ErrorCode.SIGTERM, "signal")
        self.failureResultOf(h.run(SetupPhase), CancelledError)
        self.assertIsNone(h.ctx.workdir)
        self.assertEqual(h.reporter.updates, [])


class BlockingCallTests(SynchronousTestCase):
    """File-system work of a job goes through its ThreadRunner, never the reactor thread."""

    def test_work_directory_is_made_in_a_worker_thread(self) -> None:
        h = PhaseHarness(self)
        threads = ManualRunner()
        h.in_thread = threads
        running = h.run(SetupPhase)
        self.assertEqual(threads.names, ["make_workdir"])
        self.assertFalse((h.env.pilot_dir / "PanDA_Pilot-7").exists(), "nothing done on the reactor")
        threads.run_all()
        h.in_thread = run_sync
        threads.run_all()
        self.successResultOf(running)
        self.successResultOf(Deferred.fromCoroutine(h.ctx.heartbeat.stop()))  # type: ignore[union-attr]

    def test_heartbeat_walks_the_process_tree_in_a_worker_thread(self) -> None:
        h = PhaseHarness(self)
        h.set_up()
        running = h.run(ExecutePhase)
        threads = ManualRunner()
        h.in_thread = threads
        beat = Deferred.fromCoroutine(h.beats.beat())
        self.assertEqual(threads.names, ["tree_usage"])
        threads.run_all()
        self.successResultOf(beat)
        h.in_thread = run_sync
        h.spawner.last_payload().end(0)
        h.clock.advance(0)
        self.successResultOf(running)


class ExecutePhaseTests(SynchronousTestCase):
    def test_payload_runs_and_its_outcome_is_kept(self) -> None:
        h = PhaseHarness(self)
        h.set_up()
        running = h.run(ExecutePhase)
        payload = h.spawner.last_payload()
        self.assertEqual(payload.command[-1], "/bin/echo hello")
        self.assertEqual(h.ctx.lifecycle.phase, JobPhase.RUNNING)
        assert h.ctx.workdir is not None
        for name in ("payload.stdout", "payload.stderr"):
            self.assertEqual(stat.S_IMODE((h.ctx.workdir / name).stat().st_mode), 0o600, name)
        payload.end(0)
        h.clock.advance(0)
        self.successResultOf(running)
        self.assertEqual(h.ctx.outcome.exit_code, 0)  # type: ignore[union-attr]
        self.assertIn("running", h.reporter.states())

    def test_the_gate_stops_a_payload_from_starting_after_an_abort(self) -> None:
        h = PhaseHarness(self)
        h.set_up()
        h.ctx.abort(ErrorCode.SIGTERM, "signal")
        self.failureResultOf(h.run(ExecutePhase), CancelledError)
        self.assertEqual(h.spawner.payloads(), [])

    def test_hpo_loop_end_runs_no_payload(self) -> None:
        h = PhaseHarness(self, preprocess={"command": "/bin/true"})
        h.set_up()
        running = h.run(ExecutePhase)
        (prep,) = h.spawner.payloads()
        self.assertEqual(prep.command[-1], "/bin/true")
        prep.end(161)
        self.successResultOf(running)
        self.assertEqual(len(h.spawner.payloads()), 1, "the payload did not run")
        self.assertFalse(h.ctx.errors)


class StagingPhaseTests(SynchronousTestCase):
    def test_stage_out_describes_the_outputs(self) -> None:
        h = PhaseHarness(self)
        h.set_up()
        h.ctx.advance(JobPhase.RUNNING)
        assert h.ctx.workdir is not None
        (h.ctx.workdir / "out.txt").write_text("result\n")
        self.successResultOf(h.run(StageOutPhase))
        self.assertEqual([f.lfn for f in h.ctx.reported], ["out.txt"])
        self.assertEqual(h.ctx.reported[0].facts.size, 7)


class FinishPhaseTests(SynchronousTestCase):
    def finished(self, h: PhaseHarness) -> JobSummary:
        h.set_up()
        summary: JobSummary = self.successResultOf(h.run(FinishPhase))
        return summary

    def test_a_full_disk_while_the_log_is_made_is_reported(self) -> None:
        h = PhaseHarness(self)

        def full_disk(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            if getattr(f, "__name__", "") == "_prepare":
                return fail(OSError(errno.ENOSPC, "No space left on device"))
            return run_sync(f, *args, **kwargs)

        h.in_thread = full_disk
        summary = self.finished(h)
        final, was_final = h.reporter.updates[-1]
        self.assertTrue(was_final)
        self.assertEqual((final.state, final.pilot_error_code), ("failed", ErrorCode.NOLOCALSPACE))
        self.assertEqual(summary.final_update, "delivered")

    def test_a_bug_while_finishing_still_sends_the_final_update(self) -> None:
        h = PhaseHarness(self)

        def broken(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            if getattr(f, "__name__", "") == "_prepare":
                raise KeyError("a pilot bug")
            return run_sync(f, *args, **kwargs)

        h.in_thread = broken
        summary = self.finished(h)
        self.assertEqual(h.reporter.updates[-1][0].pilot_error_code, ErrorCode.UNKNOWNEXCEPTION)
        self.assertEqual(summary.final_update, "delivered")
        self.flushLoggedErrors(KeyError)

    def test_a_lost_final_update_is_noted_not_raised(self) -> None:
        h = PhaseHarness(self)
        h.set_up()
        h.reporter.fail_all = True
        finishing = h.run(FinishPhase)
        h.clock.advance(3600)
        summary = self.successResultOf(finishing)
        self.assertEqual(summary.final_update, "lost")

    def test_the_reporter_is_an_ijobreporter(self) -> None:
        self.assertTrue(verifyObject(IJobReporter, RecordingReporter()))
