"""A full disk during stage-in, while the payload writes its output, and at the log tarball.

The pilot's work directory is a small tmpfs (``harness.mount_small_tmpfs``: root
only, as in CI), so the file system really fills up; the pilot's JSON log and
summary live elsewhere.  The start-of-job free-space check is lowered so that the
job gets going on the small file system.
"""

from __future__ import annotations

from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.monitor.settings import MonitorSettings

from ..events import file_ready
from ..harness import mount_small_tmpfs, run_to_end
from .scenario import FaultCase

SMALL_DISK = MonitorSettings(min_free_start=1 << 20, min_free_running=1)


class FullDiskTests(FaultCase):
    queue = "DISK_FAULTS"
    group = "disk"
    copytools = {"pr": "lsm", "pw": "cp", "pl": "cp"}

    async def test_during_stage_in(self) -> None:
        self.scenario(
            "disk full during stage-in",
            "another process fills the work directory's 4 MB file system mid-copy",
            "stage-in",
            "failed NOLOCALSPACE; no partial input; log stored once; 1 final update",
        )
        await mount_small_tmpfs(self, self.workdir, "4m")
        self.tool("lsm-get", delay=0.5)
        fields = self.place_input("in.dat", b"x" * (3 << 20))
        (panda_id,) = await self.server.submit(self.job("cp in.dat out.dat", **fields))
        service = self.pilot(monitor=SMALL_DISK)
        service.startService()
        self.addCleanup(service.stopService)
        await file_ready(self.marks / "lsm-get.started")
        (self.workdir / "filler").write_bytes(b"\0" * (2 << 20))  # before the copy starts
        await service.when_finished()
        await service.stopService()
        partial = [p for p in self.workdir.rglob("in.dat*")]
        await self.verdict(
            panda_id,
            state="failed",
            error=ErrorCode.NOLOCALSPACE,
            outputs={"job.log.tgz": None},
            checks=[(partial == [], f"partial input left: {partial}")],
        )

    async def test_while_the_payload_writes_its_output(self) -> None:
        self.scenario(
            "disk full while the payload writes its output",
            "payload writes 64 MB into an 8 MB file system",
            "payload",
            "failed NOLOCALSPACE; no partial output stored; 1 final update",
        )
        await mount_small_tmpfs(self, self.workdir, "8m")
        (panda_id,) = await self.server.submit(self.job("head -c 64M /dev/zero > out.dat"))
        service = self.pilot(monitor=SMALL_DISK)
        await run_to_end(service)
        await self.verdict(panda_id, state="failed", error=ErrorCode.NOLOCALSPACE, outputs=self.stored_logs())

    async def test_at_log_tarball_creation(self) -> None:
        self.scenario(
            "disk full at log tarball creation",
            "payload leaves its 8 MB file system full (and succeeds)",
            "log creation",
            "failed NOLOCALSPACE; output stored once; 1 final update",
        )
        await mount_small_tmpfs(self, self.workdir, "8m")
        script = "echo result > out.dat; head -c 64M /dev/zero > fill; true"
        (panda_id,) = await self.server.submit(self.job(script))
        service = self.pilot(monitor=SMALL_DISK)
        await run_to_end(service)
        await self.verdict(
            panda_id, state="failed", error=ErrorCode.NOLOCALSPACE, outputs={"out.dat": b"result\n"}
        )

    def stored_logs(self) -> dict[str, Any]:
        """The log tarball, if the pilot managed to make one (it may: the output is removed)."""
        return {"job.log.tgz": None} if any(self.storage_dir.rglob("job.log.tgz")) else {}
