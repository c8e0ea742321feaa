"""``python -m bench [NAME ...]``: every benchmark (or the named ones) in turn; exit 1 if any missed a target.

Each runs in its own interpreter (they measure process-wide figures such as peak RSS),
and one that misses its target does not keep the others from running.  Names:
overhead, staging, monitoring, reactorlag.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.overhead", "bench.staging", "bench.monitoring", "bench.reactorlag")


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    known = {module.rsplit(".", 1)[1]: module for module in BENCHMARKS}
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.stdout.write(f"bench: unknown benchmark {', '.join(unknown)} (known: {', '.join(known)})\n")
        return 2
    failed = []
    for module in [known[name] for name in names] or BENCHMARKS:
        if subprocess.run([sys.executable, "-m", module], check=False).returncode != 0:
            failed.append(module)
    if failed:
        sys.stdout.write(f"bench: targets missed in {', '.join(failed)}\n")
        return 1
    sys.stdout.write("bench: every target met\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
