"""An event-service job through a real pilot and the dev server: ``python -m pilot.demo --eventservice``.

``prepare_site`` lays out what an event-service queue needs on one machine: a storage
element (a directory reached with ``cp``) holding the job's input file, an object
store for the archives (another directory, with the numeric id the server records),
the queue's configuration for ``twistd panda-dev --queuedata`` and the storage
description for the pilot's ``--storagedata``, and a jobs file with one ES job whose
ranges the dev server creates (``esRanges``).  The payload is the reference ES
payload (``tests/es_payload.py`` of a checkout).  ``bench/eventservice`` uses the same
site with a slow server.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pilot.localrun import run_pilot, start_dev_server_process
from pilot.staging.urls import rucio_path
from pilot.util.records import record

QUEUE = "DEMO_ES_QUEUE"
INPUT_LFN = "EVNT.demo._000001.pool.root.1"
INPUT_SCOPE = "demo.evnt"
OBJSTORE_ID = 1001


@record(frozen=True)
class EsSite:
    """The files of a prepared site (see ``prepare_site``)."""

    queuedata: Path
    storagedata: Path
    jobs: Path
    archives: Path


def default_payload() -> Path | None:
    """The reference ES payload of the checkout this package runs from, if any."""
    candidate = Path(__file__).resolve().parent.parent / "tests" / "es_payload.py"
    return candidate if candidate.is_file() else None


def prepare_site(
    run_dir: Path, payload: Path, *, ranges: int, workers: int = 4, payload_args: Sequence[str] = ()
) -> EsSite:
    """Write the site's files under ``run_dir`` (see the module docstring)."""
    storage, archives = run_dir / "SE_DISK", run_dir / "OS_ES"
    data = b"demo EVNT file\n" * 64
    placed = storage / rucio_path(INPUT_SCOPE, INPUT_LFN).lstrip("/")
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(data)
    archives.mkdir(parents=True, exist_ok=True)
    queuedata = {
        QUEUE: {
            "corecount": workers,
            "copytools": {"cp": {}},
            "acopytools": {"pr": ["cp"], "pw": ["cp"], "pl": ["cp"], "es_events": ["cp"]},
            "astorages": {
                "read_lan": ["SE_DISK"],
                "pw": ["SE_DISK"],
                "pl": ["SE_DISK"],
                "es_events": ["OS_ES"],
            },
        }
    }
    storagedata = {
        "SE_DISK": _posix_endpoint(storage, 1000),
        "OS_ES": _posix_endpoint(archives, OBJSTORE_ID),
    }
    argv = " ".join(
        [sys.executable, str(payload), "--workers", str(workers), "--channel", "PILOT_EVENTRANGECHANNEL"]
    )
    job = {
        "computingSite": QUEUE,
        "prodSourceLabel": "managed",
        "jobName": "demo.eventservice.1",
        "transformation": "/bin/bash",
        "jobPars": f"-c 'exec {argv} {' '.join(payload_args)}'",
        "eventService": True,
        "jobsetID": 1,
        "jediTaskID": 100,
        "coreCount": workers,
        "inFiles": INPUT_LFN,
        "scopeIn": INPUT_SCOPE,
        "ddmEndPointIn": "SE_DISK",
        "fsize": str(len(data)),
        "checksum": f"ad:{zlib.adler32(data) & 0xFFFFFFFF:08x}",
        "GUID": "d3a0e5a1-0000-4000-8000-00000000e5e5",
        "logFile": "demo_es.log.tgz",
        "scopeLog": "demo",
        "maxWalltime": 3600,
        "esRanges": {"count": ranges},
    }
    site = EsSite(
        run_dir / "queuedata.json", run_dir / "storagedata.json", run_dir / "es-jobs.json", archives
    )
    site.queuedata.write_text(json.dumps(queuedata, indent=1))
    site.storagedata.write_text(json.dumps(storagedata, indent=1))
    site.jobs.write_text(json.dumps([job], indent=1))
    return site


def _posix_endpoint(directory: Path, number: int) -> dict[str, Any]:
    protocol = [{"endpoint": "file://", "path": str(directory)}]
    return {"id": number, "arprotocols": {"read_lan": protocol, "write_lan": protocol}}


async def run_es_job(
    reactor: Any,
    run_dir: Path,
    site: EsSite,
    *,
    event_delay: float = 0.0,
    pilot_args: Sequence[str] = (),
) -> tuple[int, dict[str, Any]]:
    """The dev server and one pilot over ``site``: (pilot exit status, the ES job's summary)."""
    server = await start_dev_server_process(
        reactor,
        reactor,
        run_dir / "panda-dev",
        queue=QUEUE,
        job_files=[site.jobs],
        extra_args=["--queuedata", str(site.queuedata), "--event-delay", str(event_delay)],
    )
    try:
        outcome, summary = await run_pilot(
            reactor,
            reactor,
            server,
            run_dir,
            queue=QUEUE,
            extra=["--storagedata", str(site.storagedata), *pilot_args],
        )
    finally:
        await server.stop()
    jobs = summary.get("jobs") or [{}]
    return int(outcome.shell_status or 0), jobs[0]


async def run_es_demo(reactor: Any, run_dir: Path, payload: Path, output: Callable[[str], None]) -> int:
    """The README's event-service demo: 400 ranges, 4 workers; 0 when the job finished."""
    site = prepare_site(run_dir, payload, ranges=400)
    output(f"txpilot demo: one event-service job, 400 event ranges, 4 payload workers (files in {run_dir})")
    status, job = await run_es_job(reactor, run_dir, site, pilot_args=["--es-batch-ranges", "100"])
    es = job.get("event_service", {})
    archives = sorted(p.name for p in site.archives.rglob("*.tar"))
    output("")
    output(f"  job {job.get('panda_id')}: {job.get('state')}, payload exit {job.get('exit_code')}")
    for key in (
        "ranges_received",
        "ranges_finished",
        "ranges_failed",
        "events_stored",
        "batches",
        "bytes_stored",
    ):
        output(f"  {key:<22} {es.get(key)}")
    output(f"  {'payload_wait_seconds':<22} {es.get('payload_wait_seconds')}")
    output(f"  {'range_requests':<22} {es.get('range_requests')}   report calls {es.get('report_calls')}")
    output(f"  archives in the object store ({site.archives}): {len(archives)}")
    output("")
    output(f"  pilot exit code {status}; the job summary is in {run_dir / 'summary.json'}")
    return 0 if status == 0 and job.get("state") == "finished" else 1
