"""bench/reactorlag's code paths, run small so that CI keeps them working.

The numbers of a smoke run mean nothing (targets are not checked); the real run is
``python -m bench reactorlag``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from bench import reactorlag

reactor: Any = _reactor


class ReactorLagBenchSmokeTests(TestCase):
    timeout = 180

    async def test_small_run_reports_every_measure(self) -> None:
        run_dir = Path(self.mktemp()).absolute() / "reactorlag"
        args = argparse.Namespace(
            processes=30, download_mib=4, idle_seconds=0.2, dir=str(run_dir), check_targets=False
        )
        results = await reactorlag.main_async(reactor, args)
        self.assertEqual(json.loads((run_dir.parent / "reactorlag.json").read_text()), results)
        for mode in ("inline", "in_thread"):
            for phase in ("tree_usage", "terminate", "sweep"):
                self.assertGreaterEqual(results[f"{phase}_{mode}_lag_ms_max"], 0.0)
        for key in (
            "idle_lag_ms_max",
            "mass_death_floor_lag_ms_max",
            "download_lag_ms_max",
            "pilot_lag_ms_max",
        ):
            self.assertGreaterEqual(results[key], 0.0)
        self.assertEqual(results["pilot_exit"], 0)
        self.assertEqual(results["pilot_processes_job_state"], "finished/0")
        self.assertEqual(
            results["pilot_download_job_state"], "finished/0", "4 MiB is within the pilot's limit"
        )
        self.assertGreater(results["kill_inline_vs_floor"], 0)
