"""A supervised helper process beside the payload: restarted when it crashes, stopped on request.

Utilities (a memory monitor, an experiment's helper) start before or with the payload
and are restarted up to their limit when they crash (non-zero exit or a signal); a
utility that exits 0 has finished its work.  ``stop`` ends one for good with its own
stop signal, then SIGKILL after the grace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.errors import PilotError
from pilot.logs import pilot_observer
from pilot.model.processes import PAYLOAD_PID, ProcessRecord, UtilitySpec
from pilot.process.runner import ManagedProcess
from pilot.util.records import record

log = Logger(observer=pilot_observer)


@record
class Utility:
    """A running utility: restarted when it dies, up to ``spec.max_restarts`` times."""

    spec: UtilitySpec
    start_process: Callable[[list[str]], ManagedProcess]
    clock: IReactorTime
    record: ProcessRecord
    restart_delay: float = 1.0
    payload_pid: int | None = None
    process: ManagedProcess | None = None
    _stopping: bool = False
    _restart_call: IDelayedCall | None = None
    _watching: Deferred[None] | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        pid = str(self.payload_pid) if self.payload_pid is not None else ""
        return [part.replace(PAYLOAD_PID, pid) for part in self.spec.argv]

    def start(self) -> None:
        try:
            self.process = self.start_process(self.argv())
        except PilotError as exc:
            log.warn("utility {name} could not start: {diag}", name=self.spec.name, diag=exc.diag)
            return
        except CancelledError:
            # the job is being stopped: a utility (or its restart) must not start now
            log.info("utility {name} not started: the job is stopping", name=self.spec.name)
            return
        if self.record.started is None:
            self.record.started = self.clock.seconds()
        self._watching = Deferred.fromCoroutine(self._watch(self.process))

    async def _watch(self, process: ManagedProcess) -> None:
        outcome = await process.wait()
        self.record.finish(outcome)
        if self._stopping or self.spec.when == "after":
            return
        if outcome.exit_code == 0 and outcome.signal is None:
            return  # ended on its own terms (prmon does when the payload has gone): not a crash
        if self.record.restarts >= self.spec.max_restarts:
            log.warn(
                "utility {name} ended ({exit}, signal {sig}) and was restarted {n} times: giving up",
                name=self.spec.name, exit=outcome.exit_code, sig=outcome.signal, n=self.record.restarts,
            )  # fmt: skip
            return
        self.record.restarts += 1
        log.info(
            "utility {name} ended (exit {exit}, signal {sig}): restart {n} of {limit}",
            name=self.spec.name, exit=outcome.exit_code, sig=outcome.signal,
            n=self.record.restarts, limit=self.spec.max_restarts, event="job.utility_restart",
        )  # fmt: skip
        self._restart_call = self.clock.callLater(self.restart_delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        if not self._stopping:
            self.start()

    async def stop(self) -> None:
        """Stop for good (``stop_signal``, then SIGKILL after the grace)."""
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        if self.process is not None and self.process.running:
            await self.process.terminate(
                f"utility {self.spec.name} no longer needed", signum=self.spec.stop_signal
            )
        if self._watching is not None:
            await self._watching
