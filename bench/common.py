"""What every benchmark shares: target checks, the report lines, the smoke-run flag."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Direction = Literal["<=", ">="]


def report_values(
    values: Mapping[str, Any], targets: Mapping[str, float], direction: Direction, *, width: int = 32
) -> bool:
    """Write one line per value (with PASS/FAIL where there is a target); True if all pass."""
    ok = True
    for key, value in values.items():
        target = targets.get(key)
        verdict = ""
        if target is not None:
            passed = value <= target if direction == "<=" else value >= target
            ok = ok and passed
            verdict = f"  target {direction} {target}: {'PASS' if passed else 'FAIL'}"
        sys.stdout.write(f"  {key:<{width}} {value}{verdict}\n")
    return ok


def headline(name: str, values: Mapping[str, Any], keys: Sequence[str]) -> None:
    """The benchmark's last line: ``NAME key=value ...`` with its headline figures."""
    figures = " ".join(f"{key}={values[key]}" for key in keys if key in values)
    sys.stdout.write(f"{name} {figures}\n")


def add_targets_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-targets``: report without failing (the test suite's small smoke runs)."""
    parser.add_argument(
        "--no-targets",
        dest="check_targets",
        action="store_false",
        help="report the numbers but do not fail when a target is missed (smoke runs)",
    )
