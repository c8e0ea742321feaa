"""Building a real pilot service (real reactor, processes and TLS) for end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from pilot.config import PilotConfig
from pilot.devserver.server import DevServer
from pilot.experiments.generic import GenericExperiment
from pilot.job.staging import StagingSetup
from pilot.model.credentials import Credentials
from pilot.server.api import ApiMode
from pilot.server.client import PandaClient, RetryPolicy
from pilot.server.connection import ServerConnection
from pilot.server.tls import PilotTLSPolicy
from pilot.service import PilotService
from pilot.staging.storage import StorageData

reactor: Any = _reactor


def pilot_service(
    server: DevServer,
    queue: str,
    base: Path,
    *,
    credentials: Credentials | None = None,
    staging: StagingSetup | None = None,
    environ: dict[str, str] | None = None,
    spawner: IReactorProcess | None = None,
    **settings: Any,
) -> PilotService:
    """A PilotService wired as ``pilot.tap`` wires it, against ``server`` over TLS."""
    settings_experiment = settings.pop("experiment", None)
    credentials = credentials or Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
    connection = ServerConnection(reactor, PilotTLSPolicy(credentials))
    api = settings.pop("api", ApiMode.AUTO)
    client = PandaClient(
        connection.http,
        server.url,
        reactor,
        api=api,
        retry=RetryPolicy(attempts=2, initial=0.1),
        connection=connection,
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
        spawner=spawner or reactor,
        client=client,
        experiment=settings_experiment or GenericExperiment(),
        in_thread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        environ=environ or {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        close_connections=connection.close,
        staging=staging,
    )


async def run_to_end(service: PilotService) -> None:
    """Start the service and wait until it has wrapped up."""
    service.startService()
    await service.when_finished()
    await service.stopService()  # as twistd does when the reactor stops


async def mount_small_tmpfs(test: TestCase, directory: Path, size: str) -> None:
    """Mount a ``size`` tmpfs on ``directory`` (created if needed), lazily unmounted at cleanup.

    The full-disk tests need a file system that really fills up.  Mounting needs root:
    elsewhere the test is skipped, in CI (where we run as root) it fails.
    """
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            test.fail("the full-disk tests mount a small tmpfs and must run as root in CI")
        raise SkipTest("mounting a small tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    _out, err, code = await getProcessOutputAndValue(
        "/bin/mount", ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], reactor=reactor
    )
    test.assertEqual(code, 0, err)
    test.addCleanup(lambda: getProcessOutputAndValue("/bin/umount", ["-l", str(directory)], reactor=reactor))


def bash_job(queue: str, jobpars: str, **extra: Any) -> dict[str, Any]:
    """A job definition for the dev server: ``/bin/bash <jobpars>`` with a log tarball."""
    definition: dict[str, Any] = {
        "computingSite": queue,
        "prodSourceLabel": "managed",
        "transformation": "/bin/bash",
        "jobPars": jobpars,
        "logFile": "job.log.tgz",
        "scopeLog": "it",
    }
    definition.update(extra)
    return definition


def file_storage(endpoints: Mapping[str, Path]) -> StorageData:
    """A storage description whose endpoints are local directories (``file://``, read and write)."""
    return StorageData.from_document(
        {
            name: {
                "arprotocols": {
                    "read_lan": [{"endpoint": "file://", "path": str(directory)}],
                    "write_lan": [{"endpoint": "file://", "path": str(directory)}],
                }
            }
            for name, directory in endpoints.items()
        }
    )
