"""Building a real pilot service (real reactor, processes and TLS) for end-to-end tests."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import Agent, HTTPConnectionPool

from pilot.config import ApiMode, Credentials, PilotConfig
from pilot.devserver.server import DevServer
from pilot.experiments.generic import GenericExperiment
from pilot.job.staging import StagingSetup
from pilot.server.client import PandaClient, RetryPolicy
from pilot.server.tls import PilotTLSPolicy
from pilot.service import PilotService

reactor: Any = _reactor


def pilot_service(
    server: DevServer,
    queue: str,
    base: Path,
    *,
    credentials: Credentials | None = None,
    staging: StagingSetup | None = None,
    environ: dict[str, str] | None = None,
    **settings: Any,
) -> PilotService:
    """A PilotService wired as ``pilot.tap`` wires it, against ``server`` over TLS."""
    settings_experiment = settings.pop("experiment", None)
    credentials = credentials or Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.cachedConnectionTimeout = 4
    agent = Agent(reactor, contextFactory=PilotTLSPolicy(credentials), pool=pool)
    api = settings.pop("api", ApiMode.AUTO)
    client = PandaClient(
        HTTPClient(agent), server.url, reactor, api=api, retry=RetryPolicy(attempts=2, initial=0.1)
    )
    config = PilotConfig(
        queue=queue,
        server_url=server.url,
        workdir=base.absolute(),
        queuedata_source=f"{server.url}/cache/schedconfig/{queue}.all.json",
        log_file=settings.pop("log_file", base / "pilotlog.json"),
        summary_file=settings.pop("summary_file", base / "summary.json"),
        job_label="managed",
        nojob_backoff=0.1,
        nojob_backoff_max=0.2,
        node="it-node",
        credentials=credentials,
        **settings,
    )
    return PilotService(
        config,
        clock=reactor,
        spawner=reactor,
        client=client,
        experiment=settings_experiment or GenericExperiment(),
        in_thread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        environ=environ or {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        close_connections=pool.closeCachedConnections,
        staging=staging,
    )


async def run_to_end(service: PilotService) -> None:
    """Start the service and wait until it has wrapped up."""
    service.startService()
    await service._finished_deferred()
