"""The wall clock steps forward 3 h, or back 1 h, while the payload runs.

The pilot's clock is a ``JumpingClock`` (``clock.py``) over the real reactor: a step
reschedules every pending timer as a step of the system clock does for the reactor
(which reads ``time.time``).  The payload takes 3 s of real time whatever the clock
says; the job must end ``finished`` with one final update and its output: a step of
the clock is not the payload looping, nor its wall time running out.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred

from ..events import file_ready
from ..harness import run_to_end
from .clock import JumpingClock
from .scenario import FaultCase

reactor: Any = _reactor


class ClockJumpTests(FaultCase):
    queue = "CLOCK_FAULTS"
    group = "clock"

    async def jump_during_the_payload(self, seconds: float, notes: str = "") -> None:
        script = f"echo $$ >> {self.marks}/payload; sleep 3; echo result > out.dat"
        (panda_id,) = await self.server.submit(self.job(script))
        clock = JumpingClock(reactor)
        service = self.pilot(clock=clock, heartbeat_period=1.0)
        running = Deferred.fromCoroutine(run_to_end(service))
        await file_ready(self.marks / "payload")
        stepped = datetime.datetime.now(datetime.UTC)
        clock.jump(seconds)
        await running
        view: Any = await self.server.job(panda_id)
        beats = [
            u
            for u in view["updates"]
            if u["state"] == "running" and datetime.datetime.fromisoformat(u["time"]) > stepped
        ]
        await self.verdict(
            panda_id,
            state="finished",
            outputs={"out.dat": b"result\n", "job.log.tgz": None},
            notes=f"heartbeats (every 1 s) in the 3 s after the step: {len(beats)}{notes}",
        )

    async def test_forward_during_the_payload(self) -> None:
        self.scenario(
            "clock steps forward 3 h during the payload",
            "wall clock +3 h (timers due in between fire at once)",
            "payload",
            "finished; 1 final update; output stored once",
        )
        await self.jump_during_the_payload(3 * 3600.0)

    async def test_back_during_the_payload(self) -> None:
        self.scenario(
            "clock steps back 1 h during the payload",
            "wall clock -1 h (pending timers wait 1 h longer)",
            "payload",
            "finished; 1 final update; output stored once",
        )
        await self.jump_during_the_payload(
            -3600.0,
            " (the reactor's timers follow the wall clock: no heartbeat until it has caught up, 1 h)",
        )
