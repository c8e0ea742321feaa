"""The pilot's private copies of its proxy and tokens, kept fresh while it runs.

Sites renew proxies and tokens in place (HTCondor, Harvester); the pilot's clients use
private copies (``pilot.util.private``), so the copies are refreshed on the clock, in a
worker thread, and removed when the pilot stops, after the last final update.  A copy
that cannot be refreshed is kept (it may still be valid) and the failure logged once
per occurrence.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.util.private import PrivateAreaError, PrivateCredentials
from pilot.util.threads import ThreadRunner

#: Seconds between looks at the site's credential files.
REFRESH_INTERVAL = 300.0


class CredentialRefresh(Service):
    """See the module docstring."""

    name = "credentials"
    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        private: PrivateCredentials,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        *,
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.private = private
        self._clock = clock
        self._in_thread = in_thread
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._running: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        loop = LoopingCall(lambda: Deferred.fromCoroutine(self._refresh()))
        loop.clock = self._clock
        self._loop = loop
        self._running = loop.start(self._interval, now=False)
        self._running.addErrback(lambda f: self.log.failure("credential refresh stopped", f))

    async def _refresh(self) -> None:
        try:
            copied = await self._in_thread(self.private.refresh)
        except (OSError, PrivateAreaError) as exc:
            self.log.warn("cannot refresh the pilot's credential copies: {error}", error=str(exc))
            return
        if copied:
            self.log.info(
                "renewed credentials copied: {names}", names=", ".join(copied), event="pilot.credentials"
            )

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running is not None:
            await self._running
        await self._in_thread(self.private.remove)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())
