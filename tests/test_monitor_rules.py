"""The monitor's rules and its timing, on plain values and on ``task.Clock``.

Limits from job and queue, the suspension-aware looping detector, batch end times,
secret redaction; then ``JobMonitor`` driven by a clock: each pass at its interval,
looping fired at the limit and not before (and not for a suspension), the wall-time
kill at its moment, the debug interval.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.model.job import Job, parse_job
from pilot.monitor.limits import (
    LoopingDetector,
    batch_end_time,
    job_walltime,
    memory_limit_kb,
    workdir_limit_bytes,
)
from pilot.monitor.redact import redact
from pilot.monitor.sample import Sample
from pilot.monitor.settings import MonitorSettings
from pilot.monitor.watcher import JobMonitor, Limits
from pilot.queuedata import QueueData

from .fakes import run_sync


def job(**extra: Any) -> Job:
    raw: dict[str, Any] = {"PandaID": 7, "transformation": "/bin/true"}
    raw.update(extra)
    return parse_job(raw)


def queue(**raw: Any) -> QueueData:
    return QueueData.from_dict({"nickname": "Q", **raw}, "Q")


class LimitRuleTests(SynchronousTestCase):
    def test_memory_limit_from_the_job_request_with_default_grace(self) -> None:
        self.assertEqual(memory_limit_kb(job(minRamCount=2000), queue()), 2 * 2000 * 1024)

    def test_memory_limit_grace_from_the_queue(self) -> None:
        q = queue(params={"pilot_rss_grace": 50})
        self.assertEqual(memory_limit_kb(job(minRamCount=1000), q), int(1.5 * 1000 * 1024))

    def test_memory_limit_from_queue_maxrss(self) -> None:
        single = queue(maxrss=16000, corecount=8, params={"pilot_rss_grace": 0})
        self.assertEqual(memory_limit_kb(job(coreCount=1), single), 16000 * 1024, "multi-core queue: all")
        score = queue(maxrss=2000, corecount=1, params={"pilot_rss_grace": 0})
        self.assertEqual(memory_limit_kb(job(coreCount=1), score), 2000 * 1024)

    def test_memory_limit_default_per_core(self) -> None:
        self.assertEqual(memory_limit_kb(job(coreCount=4), queue()), 2 * 4 * 2000 * 1024)

    def test_workdir_limit(self) -> None:
        self.assertIsNone(workdir_limit_bytes(job(), queue()))
        limit = workdir_limit_bytes(job(coreCount=1), queue(maxwdir=16000, corecount=8))
        self.assertEqual(limit, int(2000 * 1.2 * 1024 * 1024))

    def test_walltime_job_before_queue(self) -> None:
        self.assertEqual(job_walltime(job(maxWalltime=3600), queue(maxtime=7200)), 3600)
        self.assertEqual(job_walltime(job(), queue(maxtime=7200)), 7200)
        self.assertIsNone(job_walltime(job(), queue()))

    def test_batch_end_times(self) -> None:
        self.assertEqual(batch_end_time({"SLURM_JOB_END_TIME": "1700000000"}), 1700000000)
        ads = {
            "/m": 'GLIDEIN_ToDie = 1700005000\nName = "slot1@node"\n',
            "/j": "JobCurrentStartDate = 1700000000\nMaxRuntime = 3600\n",
        }
        environ = {"_CONDOR_MACHINE_AD": "/m", "_CONDOR_JOB_AD": "/j"}
        self.assertEqual(batch_end_time(environ, read=lambda path: ads[path]), 1700003600)
        other = {"/j2": "JobStartDate = 100\nMaxWallTimeMins = 2"}
        self.assertEqual(batch_end_time({"_CONDOR_JOB_AD": "/j2"}, read=lambda path: other[path]), 220)
        self.assertIsNone(batch_end_time({"SLURM_JOB_END_TIME": "garbage"}))

    def test_batch_end_time_unreadable_ad(self) -> None:
        def unreadable(path: str) -> str:
            raise OSError("gone")

        self.assertIsNone(batch_end_time({"_CONDOR_MACHINE_AD": "/x"}, read=unreadable))


class LoopingDetectorTests(SynchronousTestCase):
    def test_idle_time_counts_from_the_newest_file(self) -> None:
        detector = LoopingDetector(limit=7200, interval=900)
        self.assertEqual(detector.observe(1000.0, newest_mtime=400.0, started=0.0), 600.0)

    def test_suspension_is_not_idle_time(self) -> None:
        detector = LoopingDetector(limit=7200, interval=900)
        detector.observe(900.0, newest_mtime=0.0, started=0.0)
        # the next pass comes 5000 s late: the node was suspended
        idle = detector.observe(900.0 + 900 + 5000, newest_mtime=0.0, started=0.0)
        self.assertEqual(idle, 1800.0)
        self.assertFalse(detector.is_looping(idle))

    def test_a_step_before_the_first_pass_is_not_idle_time(self) -> None:
        # the wall clock stepped 3 h forward between the payload's start and the first pass
        detector = LoopingDetector(limit=7200, interval=900)
        idle = detector.observe(900.0 + 3 * 3600, newest_mtime=0.0, started=0.0)
        self.assertEqual(idle, 900.0)
        self.assertFalse(detector.is_looping(idle))

    def test_suspension_before_the_last_modification_does_not_count(self) -> None:
        detector = LoopingDetector(limit=7200, interval=900)
        detector.observe(900.0, newest_mtime=0.0, started=0.0)
        detector.observe(6800.0, newest_mtime=0.0, started=0.0)  # suspended for 5000 s
        idle = detector.observe(7700.0, newest_mtime=7000.0, started=0.0)
        self.assertEqual(idle, 700.0)


class RedactionTests(SynchronousTestCase):
    def test_words_that_only_contain_sig_are_kept(self) -> None:
        text = "payload got SIGTERM: exit 143\nsignal=15 design: ok\n"
        self.assertEqual(redact(text), text)
        self.assertEqual(redact("https://x/blob?sv=1&sig=abcDEF123"), "https://x/blob?sv=1&sig=[REDACTED]")

    def test_secrets_are_redacted_and_the_rest_kept(self) -> None:
        jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwaWxvdCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
        text = (
            f"step 1 ok\nBEARER_TOKEN={jwt}\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz\n"
            '{"access_token": "s3cr3t", "n": 3}\npassword=hunter2 done\n'
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n"
            "https://s3/x?X-Amz-Signature=deadbeef&y=1 AKIAABCDEFGHIJKLMNOP\n"
        )
        cleaned = redact(text)
        for secret in (
            jwt,
            "abcdefghijklmnopqrstuvwxyz",
            "s3cr3t",
            "hunter2",
            "MIIEow",
            "deadbeef",
            "AKIAABCD",
        ):
            self.assertNotIn(secret, cleaned)
        for kept in ("step 1 ok", '"n": 3', "done", "y=1"):
            self.assertIn(kept, cleaned)


class ScriptedSampler:
    """Returns the samples given, then repeats the last one."""

    def __init__(self, *pss_kb: int) -> None:
        self.values = list(pss_kb)
        self.calls = 0

    def sample(self) -> Sample:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return Sample(
            time=1_700_000_000 + self.calls, wtime=self.calls, nprocs=2, nthreads=3, pss=value, rss=value,
            swap=0, vmem=2 * value, rchar=0, read_bytes=0, wchar=0, write_bytes=0, rx_bytes=0,
            rx_packets=0, tx_bytes=0, tx_packets=0, stime=0.1 * self.calls, utime=0.5 * self.calls,
        )  # fmt: skip


class MonitorClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir()
        self.aborts: list[tuple[ErrorCode, str]] = []

    def touch(self, name: str, when: float | None = None) -> None:
        path = self.workdir / name
        path.write_text("x")
        stamp = self.clock.seconds() if when is None else when
        os.utime(path, (stamp, stamp))

    def monitor(
        self, sampler: ScriptedSampler | None = None, *, limits: Limits | None = None, **settings: Any
    ) -> JobMonitor:
        defaults: dict[str, Any] = {"min_free_running": 0}
        defaults.update(settings)
        monitor = JobMonitor(
            clock=self.clock,
            in_thread=run_sync,
            settings=MonitorSettings(**defaults),
            limits=limits or Limits(pss_kb=None, workdir_bytes=None, looping=None, walltime_end=None),
            workdir=self.workdir,
            pid=1,
            abort=lambda code, diag: self.aborts.append((code, diag)),
            panda_id=7,
            sampler=sampler or ScriptedSampler(1000),  # type: ignore[arg-type]
            wall=self.clock.seconds,
            write_files=False,
        )
        monitor.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(monitor.stop()))
        return monitor

    def test_memory_samples_at_the_interval(self) -> None:
        sampler = ScriptedSampler(1000)
        self.monitor(sampler, memory_interval=60)
        self.clock.advance(59)
        self.assertEqual(sampler.calls, 0)
        self.clock.advance(1)
        self.assertEqual(sampler.calls, 1)
        self.clock.pump([60] * 4)
        self.assertEqual(sampler.calls, 5)

    def test_debug_mode_samples_at_the_debug_interval(self) -> None:
        sampler = ScriptedSampler(1000)
        monitor = self.monitor(sampler, memory_interval=60, debug_interval=10)
        monitor.set_debug(True)
        self.clock.pump([10] * 6)
        self.assertEqual(sampler.calls, 6)
        monitor.set_debug(False)
        self.clock.pump([10] * 6)
        self.assertEqual(sampler.calls, 7)

    def test_memory_limit(self) -> None:
        limits = Limits(pss_kb=5000, workdir_bytes=None, looping=None, walltime_end=None)
        self.monitor(ScriptedSampler(1000, 4000, 6000), limits=limits, memory_interval=60)
        self.clock.pump([60, 60])
        self.assertEqual(self.aborts, [])
        self.clock.advance(60)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.PAYLOADEXCEEDMAXMEM])
        self.assertIn("above the limit", self.aborts[0][1])
        self.clock.advance(60)
        self.assertEqual(len(self.aborts), 1, "one abort only")

    def looping_monitor(self) -> JobMonitor:
        limits = Limits(pss_kb=None, workdir_bytes=None, looping=7200, walltime_end=None)
        return self.monitor(limits=limits, looping_interval=900, looping_limit=7200, disk_interval=10**6)

    def test_looping_fires_at_the_limit_and_not_before(self) -> None:
        self.touch("payload.stdout")
        self.looping_monitor()
        self.clock.pump([900] * 7)  # 6300 s idle
        self.assertEqual(self.aborts, [])
        self.clock.advance(900)  # 7200 s
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.LOOPINGJOB])

    def test_progress_resets_the_count(self) -> None:
        self.touch("payload.stdout")
        self.looping_monitor()
        self.clock.pump([900] * 6)
        self.touch("output.root")
        self.clock.pump([900] * 7)
        self.assertEqual(self.aborts, [])
        self.clock.advance(900)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.LOOPINGJOB])

    def test_ignored_files_are_not_progress(self) -> None:
        self.touch("payload.stdout")
        self.looping_monitor()
        self.clock.pump([900] * 6)
        self.touch("memory_monitor_output.txt")
        self.touch("helper.py")
        self.clock.pump([900] * 2)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.LOOPINGJOB])

    def test_looping_survives_a_suspension(self) -> None:
        self.touch("payload.stdout")
        start = self.clock.seconds()
        self.looping_monitor()
        self.clock.pump([900] * 4)  # 3600 s idle
        self.clock.advance(900 + 10_000)  # the pilot was suspended for 10000 s
        self.assertEqual(self.aborts, [], "a suspension is not looping")
        # LoopingCall keeps its 900 s grid: passes at 15300, 16200, 17100, 18000 s;
        # awake idle time = elapsed - 10000 s reaches 7200 s only at the 18000 s pass.
        self.clock.pump([100] * int((start + 17_100 - self.clock.seconds()) / 100))
        self.assertEqual(self.aborts, [])
        self.clock.pump([100] * 9)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.LOOPINGJOB])

    def test_looping_check_can_be_off(self) -> None:
        self.touch("payload.stdout")
        self.monitor(looping_interval=900)  # limits.looping None: loopingCheck=False
        self.clock.pump([900] * 20)
        self.assertEqual(self.aborts, [])

    def test_walltime_kill_at_its_moment(self) -> None:
        settings = MonitorSettings()
        limits = Limits.for_job(
            job(maxWalltime=3600), queue(), settings, started=self.clock.seconds(), environ={},
            now=self.clock.seconds(), wall_now=self.clock.seconds(),
        )  # fmt: skip
        self.monitor(limits=limits, disk_interval=10**6, memory_interval=10**6)
        self.clock.advance(3599)
        self.assertEqual(self.aborts, [])
        self.clock.advance(1)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.REACHEDMAXTIME])

    def test_batch_end_comes_first(self) -> None:
        now = self.clock.seconds()
        limits = Limits.for_job(
            job(maxWalltime=3600), queue(), MonitorSettings(), started=now,
            environ={"SLURM_JOB_END_TIME": str(int(now) + 600)}, now=now, wall_now=now,
        )  # fmt: skip
        self.assertEqual(limits.walltime_end, now + 600)
        self.assertIn("batch", limits.walltime_reason)

    def test_stdout_limit(self) -> None:
        (self.workdir / "payload.stdout").write_bytes(b"x" * 5000)
        self.monitor(stdout_limit=4096, disk_interval=60, memory_interval=10**6)
        self.clock.advance(60)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.STDOUTTOOBIG])

    def test_free_space(self) -> None:
        self.monitor(min_free_running=10**18, disk_interval=60, memory_interval=10**6)
        self.clock.advance(60)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.NOLOCALSPACE])

    def test_workdir_size(self) -> None:
        (self.workdir / "big.dat").write_bytes(b"x" * 100_000)
        limits = Limits(pss_kb=None, workdir_bytes=50_000, looping=None, walltime_end=None)
        self.monitor(limits=limits, disk_interval=60, memory_interval=10**6)
        self.clock.advance(60)
        self.assertEqual([code for code, _ in self.aborts], [ErrorCode.USERDIRTOOLARGE])

    def test_summary_exact_and_plot_samples_bounded(self) -> None:
        """Days of samples: the summary stays exact, the plot's samples stay bounded."""
        from pilot.monitor import prmon_output, watcher

        self.patch(watcher, "MAX_PLOT_SAMPLES", 10)
        values = [1000 + 37 * i % 500 for i in range(25)]
        monitor = self.monitor(ScriptedSampler(*values), memory_interval=60)
        self.clock.pump([60] * 25)
        self.assertLessEqual(len(monitor.samples), 10)
        self.assertEqual(monitor.summary.count, 25)
        self.assertEqual(monitor.current_fields()["maxPSS"], max(values))
        sampler = ScriptedSampler(*values)
        everything = [sampler.sample() for _ in values]
        self.assertEqual(monitor.summary.summary(), prmon_output.summarise(everything))
