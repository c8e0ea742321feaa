"""bench/pilotcost: what a multi-job pilot costs its node and its server.

Five jobs whose payload is the same transformation URL (``/trf/sleeper.sh``, which
sleeps 5 s) run through a real ``twistd -n pilot`` against a real ``twistd -n panda-dev``
that behaves like the production Apache: it closes connections idle for 5 s
(``KeepAliveTimeout``) and keeps TLS sessions (mod_ssl's session cache).  Reported:

* server requests per job (counted by the server) and downloads of the transformation;
* TLS connections and full/resumed handshakes per job (counted by the pilot);
* the pilot process's CPU seconds for the whole run, start-up included, and its peak RSS;
* per-job overhead (wall time per job minus the payload's).

Baseline, measured in the same run: a Python process that imports what any twistd
HTTPS client must (Twisted's reactor and twistd, treq, pyOpenSSL) and scans twistd's
plug-ins as twistd does before it loads an application, and nothing else: the floor for
CPU and memory.  The pilot runs three times; CPU and RSS are the medians.  The pilot's figures are also given as ratios to it.

The pilot's modules are compiled first (``compileall``), as ``pip install`` does: a
site runs from an installed package, never from source compiled at every start.
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react
from twisted.internet.utils import getProcessOutput

import pilot
from bench.common import add_targets_flag, headline, report_values
from pilot.localrun import child_environment, run_pilot, start_dev_server_process
from pilot.model.credentials import Credentials
from pilot.server.connection import ServerConnection
from pilot.server.tls import PilotTLSPolicy

QUEUE = "COST_QUEUE"
SLEEP = 5
TARGETS = {
    "requests_per_job": 4.0,
    "transformation_downloads": 1,
    "full_handshakes_per_job": 0.5,
    "pilot_cpu_s": 0.5,
    "peak_rss_mb": 55.0,
    "median_overhead_s": 0.3,
}

_FLOOR = """
import json, resource
import twisted.internet.reactor, twisted.scripts.twistd, twisted.web.client, treq, OpenSSL.SSL
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
list(getPlugins(IServiceMaker))  # what twistd does before it loads any application
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}))
"""


def jobs(url: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "computingSite": QUEUE,
            "prodSourceLabel": "managed",
            "transformation": f"{url}/trf/sleeper.sh",
            "jobPars": str(SLEEP),
            "logFile": f"cost_{i}.log.tgz",
            "scopeLog": "bench",
        }
        for i in range(1, n + 1)
    ]


async def floor(reactor: Any, repeat: int = 3) -> dict[str, float]:
    """The import floor: the smallest CPU and RSS of ``repeat`` runs."""
    runs = []
    for _ in range(repeat):
        out = await getProcessOutput(sys.executable, ["-c", _FLOOR], env=child_environment(), reactor=reactor)
        runs.append(json.loads(out))
    return {"cpu_s": min(r["cpu_s"] for r in runs), "rss_mb": min(r["rss_mb"] for r in runs)}


async def server_requests(reactor: Any, info: dict[str, Any]) -> dict[str, int]:
    """What the dev server counted, by method and path."""
    policy = PilotTLSPolicy(Credentials(cacert=Path(info["ca_cert"]), proxy=Path(info["client_proxy"])))
    connection = ServerConnection(reactor, policy)
    try:
        response = await connection.http.get(f"{info['url']}/dev/requests")
        counts: dict[str, int] = json.loads(await treq.content(response))["requests"]
    finally:
        await connection.close()
    return counts


async def run(reactor: Any, n: int, run_dir: Path, repeat: int) -> dict[str, Any]:
    """``repeat`` runs; CPU and RSS are their medians (a 2-core machine is noisy), the rest the first's."""
    compileall.compile_dir(Path(pilot.__file__).parent, quiet=1)
    base = await floor(reactor)
    runs = [await one_run(reactor, n, run_dir / f"run{i}") for i in range(repeat)]
    first = dict(runs[0])
    for key in ("pilot_cpu_s", "peak_rss_mb", "median_overhead_s"):
        first[key] = round(statistics.median(r[key] for r in runs), 3)
    first["cpu_spread_s"] = round(
        max(r["pilot_cpu_s"] for r in runs) - min(r["pilot_cpu_s"] for r in runs), 3
    )
    first["floor_cpu_s"] = round(base["cpu_s"], 3)
    first["cpu_vs_floor"] = round(first["pilot_cpu_s"] / base["cpu_s"], 2)
    first["floor_rss_mb"] = round(base["rss_mb"], 1)
    first["rss_vs_floor"] = round(first["peak_rss_mb"] / base["rss_mb"], 2)
    return first


async def one_run(reactor: Any, n: int, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    files = run_dir / "files"
    files.mkdir(parents=True)
    (files / "sleeper.sh").write_text('#!/bin/bash\nsleep "${1:-0}"\n')
    server = await start_dev_server_process(
        reactor,
        reactor,
        run_dir / "panda-dev",
        queue=QUEUE,
        timefloor_minutes=60,
        extra_args=["--files", str(files), "--tls-sessions", "--idle-timeout", "5"],
    )
    try:
        await submit(reactor, server.info, jobs(server.url, n))
        outcome, summary = await run_pilot(
            reactor, reactor, server, run_dir, queue=QUEUE, extra=["--getjob-requests", "1"]
        )
        counts = await server_requests(reactor, server.info)
    finally:
        await server.stop()
    done = summary["jobs"]
    if outcome.shell_status != 0 or len(done) != n or any(j["state"] != "finished" for j in done):
        raise SystemExit(
            f"benchmark run failed: exit {outcome.shell_status}, {len(done)} jobs; see {run_dir}"
        )
    pilot_info = summary["pilot"]
    resources = pilot_info["resources"]
    cpu = resources["cpu_user_s"] + resources["cpu_system_s"]
    rss = resources["max_rss_kb"] / 1024
    connections = pilot_info["connections"]
    pilot_requests = sum(v for k, v in counts.items() if not k.startswith("GET /dev/"))
    overheads = []
    for k, job in enumerate(done):
        cycle = (
            job["durations"]["getjob"] + job["durations"]["total"]
            if k == 0
            else job["ended_at"] - done[k - 1]["ended_at"]
        )
        overheads.append(cycle - job["durations"]["payload"])
    job_calls = sum(v for k, v in counts.items() if k.endswith(("/acquire_jobs", "/update_job"))) - 1
    return {
        "jobs": n,
        "requests": pilot_requests,
        "requests_per_job": round(job_calls / n, 2),
        "transformation_downloads": counts.get("GET /trf/sleeper.sh", 0),
        "connections": connections["connections_opened"],
        "full_handshakes_per_job": round(connections["full_handshakes"] / n, 2),
        "resumed_handshakes_per_job": round(connections["resumed_handshakes"] / n, 2),
        "pilot_cpu_s": round(cpu, 3),
        "peak_rss_mb": round(rss, 1),
        "median_overhead_s": round(statistics.median(overheads), 4),
    }


async def submit(reactor: Any, info: dict[str, Any], definitions: list[dict[str, Any]]) -> None:
    """Submit the jobs through the dev server's development API."""
    policy = PilotTLSPolicy(Credentials(cacert=Path(info["ca_cert"]), proxy=Path(info["client_proxy"])))
    connection = ServerConnection(reactor, policy)
    try:
        response = await connection.http.post(f"{info['url']}/dev/jobs", json=definitions)
        await treq.content(response)
        if response.code != 200:
            raise SystemExit(f"cannot submit the benchmark's jobs: HTTP {response.code}")
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pilotcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--jobs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="runs; CPU and RSS are their medians")
    parser.add_argument("--dir", default="bench-run/pilotcost")
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    run_dir = Path(args.dir).resolve()

    async def body(reactor: Any) -> None:
        results = await run(reactor, args.jobs, run_dir, args.repeat)
        (run_dir.parent / "pilotcost.json").write_text(json.dumps(results, indent=1) + "\n")
        sys.stdout.write(
            f"bench/pilotcost: {args.jobs} jobs of a shared URL transformation (sleep {SLEEP} s)\n"
        )
        ok = report_values(results, TARGETS, "<=", width=28)
        headline(
            "pilotcost",
            results,
            [
                "requests_per_job",
                "transformation_downloads",
                "full_handshakes_per_job",
                "pilot_cpu_s",
                "peak_rss_mb",
            ],
        )
        if not ok and args.check_targets:
            raise SystemExit(1)

    react(lambda reactor: ensureDeferred(body(reactor)))


if __name__ == "__main__":
    main()
