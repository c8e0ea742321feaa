"""``python -m bench [NAME ...]``: the named benchmarks (all of them without a name).

Each runs in its own interpreter (they measure process-wide figures such as peak RSS),
and one that misses its target does not keep the others from running.  Each ends with
one line ``NAME key=value ...`` holding its headline figures; ``python -m bench NAME``
passes the remaining arguments on to that benchmark.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "overhead",
    "pilotcost",
    "reactorlag",
    "staging",
    "monitoring",
    "redaction",
    "eventservice",
    "ray",
)


def main(argv: list[str]) -> int:
    if argv and argv[0] in BENCHMARKS:
        names, extra = [argv[0]], argv[1:]
    elif argv:
        sys.stderr.write(f"bench: unknown benchmark {argv[0]!r}; one of {', '.join(BENCHMARKS)}\n")
        return 2
    else:
        names, extra = list(BENCHMARKS), []
    failed = [
        name
        for name in names
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], check=False).returncode != 0
    ]
    if failed:  # on stderr: a benchmark's own headline stays the last line of stdout
        sys.stderr.write(f"bench: targets missed in {', '.join(failed)}\n")
        return 1
    if len(names) > 1:
        sys.stdout.write("bench: every target met\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
