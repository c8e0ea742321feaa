"""``tools/reliability_table.py`` turns the fault suite's results into ``docs/reliability.md``;
``outcomes.record`` writes them only when asked."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .outcomes import RESULTS_VARIABLE, Outcome, record

ROOT = Path(__file__).resolve().parent.parent.parent


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "reliability_table", ROOT / "tools" / "reliability_table.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def result(scenario: str, group: str, phase: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scenario": scenario,
        "fault": "HTTP 503 to 2 requests",
        "phase": phase,
        "expected": "finished; 1 final update",
        "group": group,
        "state": "finished",
        "error": "",
        "final_updates": 1,
        "final_updates_received": 1,
        "files_lost": 0,
        "files_duplicated": 0,
        "passed": True,
        "known_bug": "",
        "notes": "",
    }
    base.update(fields)
    return base


SAMPLE = [
    result("server 503 during the final update", "server", "final update", notes="faults applied: 2"),
    result("server 503 during the job request", "server", "job request", expected="finished | once"),
    result(
        "disk full during stage-in",
        "disk",
        "stage-in",
        expected="failed NOLOCALSPACE",
        state="failed",
        error="STAGEINFAILED",
        passed=False,
        known_bug="known pilot bug: lost message",
    ),
    result("SIGKILL during stage-in", "sigkill", "stage-in", state=None, files_lost=None, passed=False),
    # a rerun of the first scenario: the last line wins
    result(
        "server 503 during the final update",
        "server",
        "final update",
        state="failed",
        error="SIGTERM",
        final_updates=2,
        final_updates_received=3,
        files_lost=1,
        passed=False,
    ),
]

EXPECTED = """
**4 scenarios: 1 pass, 3 fail (1 of them known pilot bugs).**

## Server faults

A fault proxy between pilot and dev server breaks requests of one call: the job request, heartbeats (every 0.4 s) or the final update.

| # | Scenario | Fault | Phase | Expected | Observed | Final updates (accepted / received) | Files lost / extra | Result |
|---|---|---|---|---|---|---|---|---|
| 1 | server 503 during the job request | HTTP 503 to 2 requests | job request | finished \\| once | finished | 1 / 1 | 0 / 0 | pass |
| 2 | server 503 during the final update | HTTP 503 to 2 requests | final update | finished; 1 final update | failed SIGTERM | 2 / 3 | 1 / 0 | **FAIL** |

## Full disk

The pilot's work directory is a small tmpfs that really fills up.

| # | Scenario | Fault | Phase | Expected | Observed | Final updates (accepted / received) | Files lost / extra | Result |
|---|---|---|---|---|---|---|---|---|
| 3 | disk full during stage-in | HTTP 503 to 2 requests | stage-in | failed NOLOCALSPACE | failed STAGEINFAILED | 1 / 1 | 0 / 0 | **FAIL** (known pilot bug) |

## SIGKILL and restart

A real `twistd -n pilot` is SIGKILLed; the same command is started again on the same work area.

| # | Scenario | Fault | Phase | Expected | Observed | Final updates (accepted / received) | Files lost / extra | Result |
|---|---|---|---|---|---|---|---|---|
| 4 | SIGKILL during stage-in | HTTP 503 to 2 requests | stage-in | finished; 1 final update | (not observed) | 1 / 1 | - | **FAIL** |

## Notes

- 3. disk full during stage-in: known pilot bug: lost message
"""


class ReliabilityTableTests(SynchronousTestCase):
    def test_sample_results_become_the_expected_markdown(self) -> None:
        """Sections in order, rows by phase, pipes escaped, the last line of a scenario wins."""
        tool = load_tool()
        results = Path(self.mktemp())
        results.write_text("".join(json.dumps(line) + "\n" for line in SAMPLE))
        out = Path(self.mktemp())
        self.assertEqual(tool.main(["reliability_table.py", str(results), str(out)]), 0)
        self.assertEqual(out.read_text(), tool.INTRO + EXPECTED)


class RecorderTests(SynchronousTestCase):
    def test_one_line_per_outcome_when_asked(self) -> None:
        results = Path(self.mktemp())
        self.patch(os, "environ", {**os.environ, RESULTS_VARIABLE: str(results)})
        record(Outcome("a", "f", "payload", "finished", state="finished", passed=True))
        record(Outcome("b", "f", "payload", "finished"))
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        self.assertEqual([(r["scenario"], r["passed"]) for r in lines], [("a", True), ("b", False)])

    def test_nothing_written_without_the_variable(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != RESULTS_VARIABLE})
        record(Outcome("a", "f", "payload", "finished"))  # no file named, nothing to see, no error

    def test_a_write_that_fails_is_ignored(self) -> None:
        self.patch(os, "environ", {**os.environ, RESULTS_VARIABLE: str(Path(self.mktemp()) / "no" / "dir")})
        record(Outcome("a", "f", "payload", "finished"))
