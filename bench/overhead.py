"""bench/overhead: what the pilot itself costs per job.

Runs N jobs whose payload is ``/bin/true`` through a real ``twistd -n pilot``
against a real ``twistd -n panda-dev`` over HTTPS on loopback, and reports:

* per-job pilot overhead (median, max): the pilot's wall time per job minus the
  payload's wall time.  For job k > 1 that is the time between the final updates
  of jobs k-1 and k; for job 1 it is job request + setup + stage-out + report;
* the time from the last final update to the pilot process's exit;
* the pilot process's own CPU seconds per job and its peak RSS (getrusage of the
  pilot, payloads and tar excluded);
* server calls per job (every HTTP request the pilot made, retries included).

Baseline, measured in the same process: spawning ``/bin/bash -c /bin/true`` through
the same process runner, one after another — the floor for anything that starts
a payload — so the overhead can be read as a ratio of the machine's process cost.

The pilot runs with ``--getjob-requests 1``: after the last job it asks once more,
learns there is no job, and exits; the queue's timefloor (60 min) is long enough
for all N jobs.  Results go to stdout and ``bench-run/overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from bench.common import headline, report_values
from pilot.localrun import run_pilot, start_dev_server_process
from pilot.process.runner import ManagedProcess

QUEUE = "BENCH_QUEUE"
TARGETS = {
    "median_overhead_s": 0.3,
    "exit_after_last_job_s": 1.0,
    "pilot_cpu_per_job_s": 0.1,
    "peak_rss_mb": 55.0,
    "server_calls_per_job": 4.0,
}


def bench_jobs(n: int) -> list[dict[str, Any]]:
    return [
        {
            "computingSite": QUEUE,
            "prodSourceLabel": "managed",
            "transformation": "/bin/true",
            "jobPars": "",
            "outFiles": f"bench_{i}.log.tgz",
            "logFile": f"bench_{i}.log.tgz",
            "scopeLog": "bench",
            "coreCount": 1,
        }
        for i in range(1, n + 1)
    ]


async def baseline_spawn_seconds(reactor: Any, workdir: Path, n: int) -> float:
    """Median wall time of spawning and reaping ``/bin/bash -c /bin/true`` here."""
    times = []
    for i in range(n):
        process = ManagedProcess(
            reactor,
            reactor,
            ["/bin/bash", "-c", "/bin/true"],
            env={"PATH": "/usr/bin:/bin"},
            cwd=workdir,
            stdout=workdir / f"base{i}.out",
            stderr=workdir / f"base{i}.err",
        )
        process.start()
        outcome = await process.wait()
        times.append(outcome.wall_time)
    return statistics.median(times)


async def run(reactor: Any, n: int, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    jobs_file = run_dir / "jobs.json"
    jobs_file.write_text(json.dumps(bench_jobs(n)))
    baseline = await baseline_spawn_seconds(reactor, run_dir, n)
    server = await start_dev_server_process(
        reactor, reactor, run_dir / "panda-dev", queue=QUEUE, job_files=[jobs_file], timefloor_minutes=60
    )
    try:
        outcome, summary = await run_pilot(
            reactor, reactor, server, run_dir, queue=QUEUE, extra=["--getjob-requests", "1"]
        )
    finally:
        await server.stop()
    jobs = summary["jobs"]
    if outcome.shell_status != 0 or len(jobs) != n or any(j["state"] != "finished" for j in jobs):
        raise SystemExit(
            f"benchmark run failed: exit {outcome.shell_status}, {len(jobs)} jobs; see {run_dir}"
        )
    overheads = []
    for k, job in enumerate(jobs):
        payload = job["durations"]["payload"]
        if k == 0:
            cycle = job["durations"]["getjob"] + job["durations"]["total"]
        else:
            cycle = job["ended_at"] - jobs[k - 1]["ended_at"]
        overheads.append(cycle - payload)
    pilot_info = summary["pilot"]
    resources = pilot_info["resources"]
    cpu = resources["cpu_user_s"] + resources["cpu_system_s"]
    return {
        "jobs": n,
        "median_overhead_s": round(statistics.median(overheads), 4),
        "max_overhead_s": round(max(overheads), 4),
        "exit_after_last_job_s": round(outcome.ended - jobs[-1]["ended_at"], 4),
        "pilot_cpu_s": round(cpu, 3),
        "pilot_cpu_per_job_s": round(cpu / n, 4),
        "peak_rss_mb": round(resources["max_rss_kb"] / 1024, 1),
        "server_calls": pilot_info["server_calls"],
        "server_calls_per_job": round((pilot_info["server_calls"] - 3) / n, 2),
        "baseline_spawn_s": round(baseline, 4),
        "overhead_vs_bare_spawn": round(statistics.median(overheads) / baseline, 1),
    }


def report(results: dict[str, Any]) -> bool:
    sys.stdout.write(
        f"bench/overhead: {results['jobs']} jobs of /bin/true through twistd pilot + panda-dev (HTTPS)\n"
    )
    ok = report_values(results, TARGETS, "<=", width=24)
    headline(
        "overhead",
        results,
        ["median_overhead_s", "pilot_cpu_per_job_s", "peak_rss_mb", "server_calls_per_job"],
    )
    sys.stdout.write(
        "  (server_calls_per_job excludes the once-per-pilot calls: queuedata, worker node, final no-job request)\n"
    )
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--jobs", type=int, default=20)
    parser.add_argument("--dir", default="bench-run/overhead")
    args = parser.parse_args(argv)
    run_dir = Path(args.dir).resolve()

    async def body(reactor: Any) -> None:
        results = await run(reactor, args.jobs, run_dir)
        (run_dir.parent / "overhead.json").write_text(json.dumps(results, indent=1) + "\n")
        if not report(results):
            raise SystemExit(1)

    react(lambda reactor: ensureDeferred(body(reactor)))


if __name__ == "__main__":
    main()
