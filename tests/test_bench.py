"""The benchmarks' code paths, run small so that CI keeps them working.

The numbers of a smoke run mean nothing (targets are not checked); the real runs are
``tox -e bench`` and their results are recorded in the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from bench import staging

reactor: Any = _reactor


class StagingBenchSmokeTests(TestCase):
    timeout = 120

    async def test_small_run_reports_every_measure(self) -> None:
        run_dir = Path(self.mktemp()).absolute() / "staging"
        args = argparse.Namespace(size_mib=4, files=6, repeat=1, dir=str(run_dir), check_targets=False)
        await staging.main_async(reactor, args)
        results = json.loads((run_dir.parent / "staging.json").read_text())
        single, many = results["single_file"], results["many_files"]
        self.assertEqual(single["size_mib"], 4)
        self.assertGreater(single["single_file_ratio_vs_plain"], 0)
        self.assertEqual(many["files"], 6)
        for mode in ("one_at_a_time_s", "parallel_no_bulk_s", "default_s"):
            self.assertGreater(many[mode], 0)


class MonitoringBenchSmokeTests(TestCase):
    timeout = 180

    async def test_small_run_reports_every_measure(self) -> None:
        from bench import monitoring

        run_dir = Path(self.mktemp()).absolute() / "monitoring"
        args = argparse.Namespace(seconds=2.0, dir=str(run_dir), check_targets=False, heartbeat_seconds=1.0)
        await monitoring.main_async(reactor, args)
        results = json.loads((run_dir.parent / "monitoring.json").read_text())
        self.assertEqual(results["files"], 1000)
        self.assertGreater(results["scan_ms_per_pass"], 0)
        self.assertEqual((results["seconds"], results["debug_heartbeat_s"]), (2.0, 1.0))
        # An idle pilot (payload asleep, monitors at 10 s, a heartbeat a second) stays far
        # below a core: a busy loop or a monitor run amok would show here.
        for key in ("pilot_cpu_fraction_percent", "normal_cpu_fraction_percent"):
            self.assertTrue(0 <= results[key] < 25, (key, results[key]))


class EventServiceBenchSmokeTests(TestCase):
    timeout = 180

    async def test_small_run_reports_every_measure(self) -> None:
        from bench import eventservice

        run_dir = Path(self.mktemp()).absolute() / "eventservice"
        args = argparse.Namespace(
            ranges=300, seconds=0.0, delay=0.05, payload=None, dir=str(run_dir), check_targets=False
        )
        await eventservice.main_async(reactor, args)
        results = json.loads((run_dir.parent / "eventservice.json").read_text())
        self.assertEqual(results["ranges_finished"], 300)
        self.assertEqual(results["workers"], 4)
        for key in ("ranges_per_s", "raw_ranges_per_s", "ratio_vs_raw"):
            self.assertGreater(results[key], 0, key)
        self.assertGreaterEqual(results["payload_wait_pct"], 0)


class RayBenchSmokeTests(TestCase):
    timeout = 120

    async def test_small_run_reports_every_measure(self) -> None:
        from bench import ray as ray_bench

        from .raycluster import require_ray

        require_ray()
        run_dir = Path(self.mktemp()).absolute() / "ray"
        args = argparse.Namespace(ranges=300, ranges_per_answer=2, dir=str(run_dir), check_targets=False)
        await ray_bench.main_async(reactor, args)
        results = json.loads((run_dir.parent / "ray.json").read_text())
        self.assertEqual((results["ranges"], results["workers"], results["ranges_per_answer"]), (300, 4, 2))
        for key in ("ranges_per_s", "local_ranges_per_s", "ratio_vs_local", "startup_s"):
            self.assertGreater(results[key], 0, key)
