"""``python -m bench``: every benchmark in turn; exit 1 if any missed a target.

Each runs in its own interpreter (they measure process-wide figures such as peak RSS),
and one that misses its target does not keep the others from running.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.overhead", "bench.staging", "bench.monitoring")


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        if subprocess.run([sys.executable, "-m", module], check=False).returncode != 0:
            failed.append(module)
    if failed:
        sys.stdout.write(f"bench: targets missed in {', '.join(failed)}\n")
        return 1
    sys.stdout.write("bench: every target met\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
