"""After the payload, every failure still ends in a final update with the right code.

A real pilot against the dev server whose work directory is a small tmpfs: the
payload fills it, so the log tarball cannot be written.  The job must be reported
``failed`` with NOLOCALSPACE, and the pilot must go on (exit 0) instead of crashing
before the final update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.errors import ExitCode
from pilot.monitor.settings import MonitorSettings

from .harness import bash_job, mount_small_tmpfs, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "FINISH_QUEUE"


class FullDiskAfterThePayloadTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.server: DevServer = await start_dev_server(reactor, self.base / "server", queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    async def test_log_tarball_on_a_full_disk_is_nolocalspace(self) -> None:
        workdir = self.base / "pilot"
        await mount_small_tmpfs(self, workdir, "8m")
        # fills the file system (head fails at ENOSPC; the payload itself succeeds)
        (panda_id,) = await self.server.submit(bash_job(QUEUE, "-c 'head -c 64M /dev/zero > fill; true'"))
        service = pilot_service(
            self.server,
            QUEUE,
            workdir,
            getjob_requests=1,
            log_file=self.base / "pilotlog.json",  # the log and summary must not fill up too
            summary_file=self.base / "summary.json",
            monitor=MonitorSettings(min_free_start=1 << 20, min_free_running=1),
        )
        await run_to_end(service)
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.NOLOCALSPACE, view.get("pilotErrorDiag"))
        self.assertEqual(service.summaries[0].final_update, "delivered")
        self.assertEqual(service.exit_code, ExitCode.OK, "the pilot went on")
