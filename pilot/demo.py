"""The README's first command: three example jobs through a real pilot and a dev server.

``python -m pilot.demo`` (or ``tox -e demo``) starts ``twistd -n panda-dev`` with the
example jobs of ``pilot/data/demo-jobs.json`` on a free loopback port with a
freshly generated CA, runs ``twistd -n pilot`` against it over HTTPS with the
generated X.509 proxy and a 10-minute timefloor, and prints one line per job:
the pilot's view (state, exit code, phase durations) next to the server's (final
state, files in the job output report).  Exit code 0 when all three jobs finished.

Everything it writes goes to ``./demo-run`` (replaced at each run): the server's
and the pilot's logs, the pilot's JSON log and its summary file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from pilot.demo_es import default_payload, run_es_demo
from pilot.localrun import run_pilot, start_dev_server_process
from pilot.model.credentials import Credentials
from pilot.server.connection import ServerConnection
from pilot.server.tls import PilotTLSPolicy

QUEUE = "DEMO_QUEUE"
JOBS = Path(__file__).parent / "data" / "demo-jobs.json"


def _stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _server_view(reactor: Any, info: dict[str, Any], panda_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Ask the dev server (over its HTTPS admin API) how it sees each job."""
    policy = PilotTLSPolicy(Credentials(cacert=Path(info["ca_cert"]), proxy=Path(info["client_proxy"])))
    connection = ServerConnection(reactor, policy)
    views: dict[int, dict[str, Any]] = {}
    try:
        for panda_id in panda_ids:
            response = await connection.http.get(f"{info['url']}/dev/jobs/{panda_id}")
            views[panda_id] = json.loads(await treq.content(response))
    finally:
        await connection.close()
    return views


async def run_demo(reactor: Any, run_dir: Path, output: Callable[[str], None] = _stdout) -> int:
    """Run the demo in ``run_dir``; returns the process exit code (0: all jobs finished)."""

    def _print(text: str = "") -> None:
        output(text)

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    jobs_file = run_dir / "jobs.json"
    shutil.copyfile(JOBS, jobs_file)
    _print(f"txpilot demo: dev server, 3 jobs, one pilot (files in {run_dir})")
    server = await start_dev_server_process(
        reactor, reactor, run_dir / "panda-dev", queue=QUEUE, job_files=[jobs_file], timefloor_minutes=10
    )
    _print(f"  dev server listening at {server.url} (CA {server.info['ca_cert']})")
    try:
        _print(f"  running: twistd -n pilot -q {QUEUE} --url {server.url} ... (log: {run_dir / 'pilot.log'})")
        outcome, summary = await run_pilot(reactor, reactor, server, run_dir, queue=QUEUE)
        jobs = summary["jobs"]
        views = await _server_view(reactor, server.info, [j["panda_id"] for j in jobs if j["panda_id"]])
    finally:
        await server.stop()
    _print()
    _print(
        f"  {'PandaID':>7}  {'pilot':<9} {'server':<9} {'exit':>4}  {'setup':>6} {'payload':>7} {'stageout':>8} {'total':>6}  files reported"
    )
    finished = 0
    for job in jobs:
        view = views.get(job["panda_id"], {})
        report = json.loads(view.get("jobOutputReport") or "{}")
        d = job["durations"]
        _print(
            f"  {job['panda_id']:>7}  {job['state']:<9} {view.get('jobStatus', '?'):<9} {job['exit_code']!s:>4}  "
            f"{d.get('setup', 0):6.3f} {d.get('payload', 0):7.3f} {d.get('stageout', 0):8.3f} {d.get('total', 0):6.3f}  "
            f"{', '.join(sorted(report))}"
        )
        finished += job["state"] == "finished" and view.get("jobStatus") == "finished"
    _print()
    _print(f"  pilot exit code {outcome.shell_status}; {finished} of 3 jobs finished")
    _print(
        f"  logs: {run_dir / 'pilot.log'}, {run_dir / 'pilot' / 'pilotlog.json'}, {run_dir / 'panda-dev' / 'panda-dev.log'}"
    )
    return 0 if outcome.shell_status == 0 and finished == 3 else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pilot.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="demo-run", help="directory for the run's files (replaced)")
    parser.add_argument(
        "--eventservice",
        action="store_true",
        help="run one event-service job (400 ranges, 4 workers) instead",
    )
    parser.add_argument("--es-payload", help="the ES payload (default: tests/es_payload.py of the checkout)")
    args = parser.parse_args(argv)
    run_dir = Path(args.dir).resolve()
    payload = Path(args.es_payload).resolve() if args.es_payload else default_payload()
    if args.eventservice and (payload is None or not payload.is_file()):
        parser.error("--eventservice needs the reference ES payload: give --es-payload tests/es_payload.py")

    async def body(reactor: Any) -> None:
        if args.eventservice:
            assert payload is not None
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            code = await run_es_demo(reactor, run_dir, payload, _stdout)
        else:
            code = await run_demo(reactor, run_dir)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(body(reactor)))


if __name__ == "__main__":
    main()
