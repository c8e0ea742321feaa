"""The job heartbeat: a ``running`` update every period, on the injected clock.

The period is 1800 s, or 60 s while the server has the job in debug mode; switching
restarts the timer with the new period.  A beat that finds another update still in
flight is skipped (the server heard from us anyway).  A failing beat is logged and
the heartbeat goes on: ``LoopingCall`` would otherwise stop for good.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pilot.logs import pilot_observer


class Heartbeat:
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        clock: IReactorTime,
        period: float,
        debug_period: float,
        beat: Callable[[], Awaitable[None]],
        *,
        debug: bool = False,
    ) -> None:
        self._clock = clock
        self._period = period
        self._debug_period = debug_period
        self._beat = beat
        self._debug = debug
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None

    @property
    def interval(self) -> float:
        return self._debug_period if self._debug else self._period

    @property
    def debug(self) -> bool:
        return self._debug

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        """Start beating; the first beat comes one interval from now."""
        if self.running:
            return
        loop = LoopingCall(lambda: Deferred.fromCoroutine(self._tick()))
        loop.clock = self._clock
        self._loop = loop
        self._loop_done = loop.start(self.interval, now=False)
        self._loop_done.addErrback(lambda f: self.log.failure("heartbeat loop stopped", f))

    def set_debug(self, on: bool) -> None:
        """Switch between the normal and the debug period (restarting the timer)."""
        if on == self._debug:
            return
        self._debug = on
        self.log.info(
            "heartbeat period now {interval} s", interval=self.interval, event="job.heartbeat_period"
        )
        if self.running:
            assert self._loop is not None
            self._loop.stop()
            self._loop = None
            self.start()

    async def stop(self) -> None:
        """Stop beating; waits for a beat in progress to finish."""
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is not None and loop.running:
            loop.stop()
        if done is not None:
            await done

    async def _tick(self) -> None:
        try:
            await self._beat()
        except Exception:  # noqa: BLE001 - a heartbeat must never stop the loop
            self.log.failure("heartbeat failed")
