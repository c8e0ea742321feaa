"""What the pilot says about itself: its job requests and the identity on every update."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import psutil

from pilot import __version__
from pilot.config import PilotConfig
from pilot.job.updates import PilotIdentity
from pilot.queuedata import QueueData
from pilot.server.client import JobRequest

_MB = 1024 * 1024


def node_resources(pilot_dir: Path | None) -> tuple[int | None, int, int | None]:
    """(free disk MB of the pilot's directory, memory MB, CPU MHz); runs in a worker thread.

    ``disk_usage`` on a network file system can hang, so this never runs on the reactor.
    """
    disk_mb: int | None = None
    if pilot_dir is not None:
        try:
            disk_mb = shutil.disk_usage(pilot_dir).free // _MB
        except OSError:
            disk_mb = None
    frequency: int | None = None
    try:
        freq = psutil.cpu_freq()
        frequency = int(freq.current) if freq and freq.current else None
    except (OSError, NotImplementedError, AttributeError):
        frequency = None
    return disk_mb, psutil.virtual_memory().total // _MB, frequency


def job_request(
    config: PilotConfig,
    queuedata: QueueData,
    resources: tuple[int | None, int, int | None],
    remaining: float,
) -> JobRequest:
    """The request for the next job; a queue in ``test`` status forces the ``test`` label."""
    disk_mb, memory_mb, frequency = resources
    return JobRequest(
        site_name=queuedata.resource,
        computing_element=config.queue,
        prod_source_label="test" if queuedata.is_test else config.job_label,
        node=config.node,
        disk_space=disk_mb,
        memory=memory_mb,
        cpu=frequency,
        resource_type=config.resource_type or None,
        job_type=config.job_type or None,
        working_group=config.working_group or None,
        harvester_id=config.harvester_id or None,
        worker_id=config.worker_id,
        remaining_time=int(max(0.0, remaining)),
    )


def pilot_identity(config: PilotConfig, queuedata: QueueData, environ: Mapping[str, str]) -> PilotIdentity:
    """Who reports: ``pilotID`` is ``<GTAG or node:pid>|<batch system>|<version tag>|txpilot-<version>``."""
    source = environ.get("GTAG") or f"{config.node}:{os.getpid()}"
    batch = "SLURM" if "SLURM_JOB_ID" in environ else ("CONDOR" if "_CONDOR_JOB_AD" in environ else "")
    pilot_id = "|".join(p for p in (source, batch, config.version_tag, f"txpilot-{__version__}") if p)
    return PilotIdentity(
        site_name=queuedata.resource,
        node=config.node,
        pilot_id=pilot_id,
        batch_id=config.batch_id,
        scheduler_id=config.harvester_id,
    )
