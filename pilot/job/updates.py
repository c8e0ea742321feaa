"""One job's updates: in order, one at a time, the final one for sure.

Updates of a job are serialised: a heartbeat never overtakes the ``running`` update,
and the final update waits for anything in flight, so the server always sees the
states in the order the pilot went through them.

Non-final updates get the reporter's transport retries and nothing more (the next
heartbeat will follow).  The final update is retried, with backoff on the clock,
until the server accepts it or the deadline (the end of the pilot's lifetime, or the
shutdown grace) passes: it is never silently dropped.  Where the updates go is an
``IJobReporter`` (the PanDA server, or files for Harvester): this module does not know.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pilot.interfaces import IJobReporter
from pilot.logs import pilot_observer
from pilot.model.states import ServerState
from pilot.monitor.redact import redact
from pilot.server.client import JobUpdate, RetryPolicy, ServerError, StatusCode, UpdateResult
from pilot.util.records import record
from pilot.util.secrets import SecretValues

T = TypeVar("T")

#: Statuses for which repeating the same final update cannot help.
_HOPELESS = frozenset({StatusCode.INVALID, StatusCode.ROLE, StatusCode.PERMISSION})


#: Backoff between attempts of a final update (bounded by the deadline, not a count).
FINAL_UPDATE_RETRY = RetryPolicy(attempts=1_000_000, initial=5.0, maximum=300.0)

#: Longest single attempt of a final update (shorter when the deadline is nearer).
FINAL_ATTEMPT_TIMEOUT = 120.0


@record(frozen=True)
class PilotIdentity:
    """Who is reporting: the fields every update carries."""

    site_name: str
    node: str
    pilot_id: str
    batch_id: str = ""
    scheduler_id: str = ""


#: Update fields that carry free text (payload output, diagnostics, the job report): the
#: secrets the pilot knows and what looks like a secret are removed before they leave.
FREE_TEXT_FIELDS = ("stdout", "pilot_error_diag", "exe_error_diag", "meta_data", "pilot_log")


def redacted(update: JobUpdate, secrets: SecretValues | None) -> JobUpdate:
    """``update`` with its free-text fields redacted (the same object when nothing changed)."""
    changed: dict[str, Any] = {}
    for name in FREE_TEXT_FIELDS:
        text = getattr(update, name)
        if isinstance(text, str) and text:
            clean = redact(text, secrets)
            if clean != text:
                changed[name] = clean
    return replace(update, **changed) if changed else update


class FinalUpdateLost(Exception):
    """The final update could not be delivered before the deadline."""


class JobUpdates:
    """The update channel of one job; see the module docstring."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        reporter: IJobReporter,
        clock: IReactorTime,
        panda_id: int,
        attempt_nr: int | None,
        identity: PilotIdentity,
        *,
        final_retry: RetryPolicy = FINAL_UPDATE_RETRY,
        secrets: SecretValues | None = None,
    ) -> None:
        self._reporter = reporter
        self._clock = clock
        self._panda_id = panda_id
        self._attempt_nr = attempt_nr
        self._identity = identity
        self._final_retry = final_retry
        self._secrets = secrets
        self._lock = DeferredLock()
        self._waiting: Deferred[Any] | None = None
        self.sent: list[str] = []

    @property
    def busy(self) -> bool:
        """An update is in flight."""
        return self._lock.locked

    def _update(self, state: ServerState, fields: JobUpdate | None) -> JobUpdate:
        base = redacted(fields or JobUpdate(job_id=self._panda_id, state=state.value), self._secrets)
        identity = self._identity
        return replace(
            base,
            job_id=self._panda_id,
            state=state.value,
            attempt_nr=self._attempt_nr,
            timestamp=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
            site_name=identity.site_name,
            node=identity.node,
            pilot_id=identity.pilot_id,
            batch_id=identity.batch_id or None,
            scheduler_id=identity.scheduler_id or None,
        )

    async def send(self, state: ServerState, fields: JobUpdate | None = None) -> UpdateResult | None:
        """A non-final update; None if it could not be delivered (already logged)."""
        async with self._lock:
            try:
                result = await self._reporter.update_job(
                    self._update(state, fields), final=False, timeout=None
                )
            except ServerError as exc:
                self.log.warn(
                    "job {pandaid}: {state} update not delivered: {error}",
                    pandaid=self._panda_id,
                    state=state.value,
                    error=str(exc),
                    event="job.update_failed",
                )
                return None
            self._note(state, result)
            return result

    def hurry(self) -> None:
        """The deadline just moved closer (a signal): stop waiting and look at it again."""
        waiting = self._waiting
        if waiting is not None and not waiting.called:
            waiting.cancel()

    async def _interruptible(self, waiting: Deferred[T]) -> T:
        self._waiting = waiting
        try:
            return await waiting
        finally:
            self._waiting = None

    async def send_final(
        self, state: ServerState, fields: JobUpdate, deadline: Callable[[], float]
    ) -> UpdateResult:
        """The final update, retried until accepted; FinalUpdateLost once ``deadline()`` has passed.

        ``deadline`` is asked again before every attempt, so a signal that shortens
        it takes effect at once (``hurry`` interrupts the wait in progress).
        """
        update = self._update(state, fields)
        failures = 0
        async with self._lock:
            while True:
                remaining = deadline() - self._clock.seconds()
                if remaining <= 0:
                    raise FinalUpdateLost(
                        f"job {self._panda_id}: final update not accepted before the deadline"
                    )
                try:
                    call = self._reporter.update_job(
                        update, final=True, timeout=min(FINAL_ATTEMPT_TIMEOUT, max(remaining, 1.0))
                    )
                    result = await self._interruptible(call)
                except CancelledError:
                    continue
                except ServerError as exc:
                    reason = str(exc)
                else:
                    if result.status is StatusCode.SUCCESS:
                        self._note(state, result)
                        return result
                    if result.status in _HOPELESS:
                        raise FinalUpdateLost(
                            f"job {self._panda_id}: server refused the final update "
                            f"(StatusCode {int(result.status)}: {result.message})"
                        )
                    reason = f"StatusCode {int(result.status)} {result.message}".strip()
                failures += 1
                delay = min(self._final_retry.delay(failures), max(0.0, deadline() - self._clock.seconds()))
                self.log.warn(
                    "job {pandaid}: final update not accepted ({reason}); retrying in {delay:.0f} s",
                    pandaid=self._panda_id,
                    reason=reason,
                    delay=delay,
                    event="job.final_update_retry",
                )
                try:
                    await self._interruptible(deferLater(self._clock, delay, lambda: None))
                except CancelledError:
                    continue

    def _note(self, state: ServerState, result: UpdateResult) -> None:
        self.sent.append(state.value)
        self.log.info(
            "job {pandaid}: server accepted {state} (StatusCode {status}, commands {commands})",
            pandaid=self._panda_id,
            state=state.value,
            status=int(result.status),
            commands=",".join(result.commands) or "none",
            event="job.update",
        )
