"""bench/redaction: what removing the pilot's known secret values from a debug tail costs.

A 16 kB payload tail (log lines, one secret in the middle) and 50 secrets (25 opaque
tokens, 25 S3-style secret keys): the median time of ``SecretValues.redact`` (every
needle: the values and their URL-quoted, JSON and base64 forms), of the whole
``redact(text, secrets)`` (values, then the pattern rules), and, for comparison, of one
compiled alternation of the same needles, the design the value scan replaced.

Results go to stdout and ``bench-run/redaction.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import add_targets_flag, headline, report_values
from pilot.monitor.redact import MARK, redact
from pilot.util.secrets import SecretValues, encodings

TARGETS = {"value_redaction_ms": 1.0, "redact_with_values_ms": 2.0}
TAIL_BYTES = 16 * 1024
WORDS = "event processed reading file status INFO WARNING job step done cond db run lumi".split()


def make_secrets(count: int, rng: random.Random) -> list[str]:
    """Alternately an opaque token (43 base64url characters) and an S3 secret key (40, with + and /)."""
    token, key = (
        (string.ascii_letters + string.digits + "-_", 43),
        (string.ascii_letters + string.digits + "+/", 40),
    )
    return [
        "".join(rng.choice(alphabet) for _ in range(length))
        for alphabet, length in (token, key) * (count // 2)
    ]


def make_tail(secret: str, rng: random.Random) -> str:
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < TAIL_BYTES:
        words = " ".join(rng.choice(WORDS) for _ in range(10))
        lines.append(f"{rng.randrange(10**6):06d} {words} {rng.getrandbits(64):016x}")
    middle = len(lines) // 2
    lines[middle] += f" token={secret}"
    return "\n".join(lines)[:TAIL_BYTES]


def median_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redaction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--secrets", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--dir", default="bench-run/redaction")
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    rng = random.Random(11)
    values = make_secrets(args.secrets, rng)
    registry = SecretValues(values)
    text = make_tail(values[len(values) // 2], rng)
    assert values[len(values) // 2] not in redact(text, registry)
    needles = sorted({form for value in values for form in encodings(value)}, key=len, reverse=True)
    alternation = re.compile("|".join(map(re.escape, needles)))
    results = {
        "tail_bytes": len(text),
        "secrets": len(values),
        "needles": len(needles),
        "value_redaction_ms": median_ms(lambda: registry.redact(text, MARK), args.repeat),
        "redact_with_values_ms": median_ms(lambda: redact(text, registry), args.repeat),
        "pattern_rules_only_ms": median_ms(lambda: redact(text), args.repeat),
        "compiled_alternation_ms": median_ms(lambda: alternation.sub(MARK, text), args.repeat),
    }
    sys.stdout.write("bench redaction (16 kB tail)\n")
    ok = report_values(results, TARGETS, "<=")
    headline("redaction", results, ["value_redaction_ms", "redact_with_values_ms", "secrets"])
    run_dir = Path(args.dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / "redaction.json").write_text(json.dumps(results, indent=1))
    if args.check_targets and not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
