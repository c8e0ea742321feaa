"""bench/monitoring: what watching a payload costs the pilot.

1. A real ``twistd -n pilot`` runs one job against a real ``twistd -n panda-dev``:
   the payload writes 1000 files into its work directory and then sleeps; the job is in
   debug mode and every monitor runs at 10 s (memory samples, work-directory walks,
   looping checks; heartbeats carry the redacted stdout tail).  The pilot process's
   own CPU time (all its threads, read with psutil from outside) over the sleep, as a
   fraction of one core, is the result.  Heartbeats come at the debug period (60 s);
   ``--heartbeat-seconds 10`` measures with a heartbeat (a new TLS connection to the
   server, as real servers close idle connections after 5 s) every 10 s as well.
   Baseline in the same run: the same job with the monitors at their normal intervals.
2. The work-directory walk (``WorkdirScanner.scan``) over 1000 files, median of 50
   passes, against a plain ``os.walk`` + ``lstat`` of the same tree.

Results go to stdout and ``bench-run/monitoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react

from bench.common import add_targets_flag, headline, report_values
from pilot.localrun import pilot_arguments, start_dev_server_process, start_pilot_process
from pilot.monitor.scan import WorkdirScanner

QUEUE = "BENCH_MONITOR_QUEUE"
TARGETS = {"pilot_cpu_fraction_percent": 0.3, "scan_ms_per_pass": 50.0}
FILES = 1000


def monitored_job(seconds: float, marker: str) -> dict[str, Any]:
    script = (
        f"mkdir many && for i in $(seq 1 {FILES}); do : > many/f$i; done; touch {marker}; sleep {seconds:.0f}"
    )
    return {
        "computingSite": QUEUE,
        "prodSourceLabel": "managed",
        "transformation": "/bin/bash",
        "jobPars": f"-c '{script}'",
        "logFile": "bench.log.tgz",
        "scopeLog": "bench",
        "debug": "True",
    }


#: Every monitor at 10 s; heartbeats at the debug period (60 s), as for a job in debug mode.
DEBUG_INTERVALS = [
    "--memory-interval", "10", "--disk-interval", "10", "--looping-interval", "10",
    "--debug-interval", "10",
]  # fmt: skip


async def pilot_cpu_while_running(
    reactor: Any, run_dir: Path, seconds: float, extra: list[str]
) -> dict[str, float]:
    """Run one job; return the pilot's CPU seconds over ``seconds`` of payload sleep."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    marker = "files-written"
    jobs = run_dir / "jobs.json"
    jobs.write_text(json.dumps([monitored_job(seconds + 5, marker)]))
    server = await start_dev_server_process(
        reactor, reactor, run_dir / "panda-dev", queue=QUEUE, job_files=[jobs], timefloor_minutes=0
    )
    try:
        args = pilot_arguments(
            server.url, str(server.info["ca_cert"]), queue=QUEUE, workdir=run_dir / "pilot",
            summary_file=run_dir / "summary.json", extra=["--getjob-requests", "1", *extra],
        )  # fmt: skip
        process = start_pilot_process(
            reactor, reactor, args, proxy=str(server.info["client_proxy"]),
            workdir=run_dir / "pilot", log_path=run_dir / "pilot.log",
        )  # fmt: skip
        assert process.pid is not None
        # setsid execs twistd in place: the pid is the pilot's
        pilot = psutil.Process(process.pid)
        found: list[Path] = []
        while not found:
            found = list((run_dir / "pilot").glob(f"*/PanDA_Pilot-*/{marker}"))
            if not process.running:
                raise SystemExit(f"the pilot ended early; see {run_dir / 'pilot.log'}")
            await deferLater(reactor, 0.2, lambda: None)
        await deferLater(reactor, 1.0, lambda: None)  # past the file writing
        before = pilot.cpu_times()
        started = time.monotonic()
        await deferLater(reactor, seconds, lambda: None)
        after = pilot.cpu_times()
        elapsed = time.monotonic() - started
        outcome = await process.wait()
        if outcome.shell_status != 0:
            raise SystemExit(f"pilot exited {outcome.shell_status}; see {run_dir / 'pilot.log'}")
    finally:
        await server.stop()
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"cpu_s": round(cpu, 3), "window_s": round(elapsed, 1)}


def build_tree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for i in range(FILES):
        sub = root / f"d{i % 20}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(b"x" * (i % 7))


def walk_baseline(root: Path) -> int:
    total = 0
    for current, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(current, name)).st_size
    return total


def scan_cost(run_dir: Path, passes: int = 50) -> dict[str, float]:
    root = run_dir / "scan-tree"
    build_tree(root)
    scanner = WorkdirScanner(root)
    ours, plain = [], []
    for _ in range(passes):
        t0 = time.perf_counter()
        scan = scanner.scan()
        t1 = time.perf_counter()
        walk_baseline(root)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        plain.append(t2 - t1)
    assert scan.files == FILES
    median = statistics.median(ours)
    return {
        "scan_ms_per_pass": round(median * 1000, 2),
        "os_walk_lstat_ms": round(statistics.median(plain) * 1000, 2),
        "scan_vs_os_walk": round(median / statistics.median(plain), 2),
    }


async def main_async(reactor: Any, args: argparse.Namespace) -> None:
    run_dir = Path(args.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"files": FILES, "seconds": args.seconds}
    results.update(scan_cost(run_dir))
    fast = DEBUG_INTERVALS
    if args.heartbeat_seconds:
        fast = [*fast, "--debug-heartbeat", str(args.heartbeat_seconds)]
    results["debug_heartbeat_s"] = args.heartbeat_seconds or 60.0
    debug = await pilot_cpu_while_running(reactor, run_dir / "debug", args.seconds, fast)
    normal = await pilot_cpu_while_running(reactor, run_dir / "normal", args.seconds, [])
    results["pilot_cpu_s_debug_intervals"] = debug["cpu_s"]
    results["pilot_cpu_s_normal_intervals"] = normal["cpu_s"]
    results["pilot_cpu_fraction_percent"] = round(100 * debug["cpu_s"] / debug["window_s"], 3)
    results["normal_cpu_fraction_percent"] = round(100 * normal["cpu_s"] / normal["window_s"], 3)
    (run_dir.parent / "monitoring.json").write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.write("bench/monitoring:\n")
    ok = report_values(results, TARGETS, "<=")
    headline(
        "monitoring",
        results,
        ["pilot_cpu_fraction_percent", "normal_cpu_fraction_percent", "scan_ms_per_pass"],
    )
    if not ok and args.check_targets:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--dir", default="bench-run/monitoring")
    parser.add_argument("--heartbeat-seconds", type=float, default=0.0)
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(main_async(reactor, args)))


if __name__ == "__main__":
    main()
