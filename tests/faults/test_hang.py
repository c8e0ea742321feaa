"""A copytool that never returns, at stage-in and at stage-out.

The transfer time-out is 400 s plus a second per MB; to keep the suite short the
pilot runs on a ``JumpingClock`` (``clock.py``) and the clock is stepped 401 s
forward once the hanging copytool has started: the pilot's time-out fires as it
would after 400 real seconds.  The copytool is a real process that only sleeps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor

from pilot.errorcodes import ErrorCode

from ..events import file_ready
from .clock import JumpingClock
from .scenario import FaultCase, alive

reactor: Any = _reactor

#: The transfer time-out for small files (``pilot.staging.transfer.timeout_for``), and a second.
PAST_TIMEOUT = 401.0


class HangingCopytoolTests(FaultCase):
    queue = "HANG_FAULTS"
    group = "copytool"
    copytools = {"pr": "lsm", "pw": "lsm", "pl": "cp"}

    async def hang(self, definition: dict[str, Any], tool: str, *, state: str, error: ErrorCode) -> None:
        self.tool(tool, hang=True)
        (panda_id,) = await self.server.submit(definition)
        clock = JumpingClock(reactor)
        service = self.pilot(clock=clock)
        service.startService()
        self.addCleanup(service.stopService)
        await file_ready(self.marks / f"{tool}.started")
        clock.jump(PAST_TIMEOUT)
        await service.when_finished()
        await service.stopService()
        left = [pid for pid in self.pids(f"{tool}.started") if alive(pid)]
        await self.verdict(
            panda_id,
            state=state,
            error=error,
            outputs={"job.log.tgz": None},
            checks=[(left == [], f"the hanging {tool} is still there: {left}")],
        )

    async def test_at_stage_in(self) -> None:
        self.scenario(
            "copytool hangs at stage-in",
            "lsm-get never returns (clock stepped past the 400 s time-out)",
            "stage-in",
            "failed STAGEINTIMEOUT; tool killed; log stored once; 1 final update",
        )
        fields = self.place_input("in.dat", b"input\n")
        definition = self.job("cp in.dat out.dat", **fields)
        await self.hang(definition, "lsm-get", state="failed", error=ErrorCode.STAGEINTIMEOUT)

    async def test_at_stage_out(self) -> None:
        self.scenario(
            "copytool hangs at stage-out",
            "lsm-put never returns (clock stepped past the 400 s time-out)",
            "stage-out",
            "failed STAGEOUTTIMEOUT (not holding: the server keeps no report of a holding"
            " update); tool killed; output not stored; log stored once and reported; 1 final update",
        )
        definition = self.job("echo result > out.dat")
        await self.hang(definition, "lsm-put", state="failed", error=ErrorCode.STAGEOUTTIMEOUT)
