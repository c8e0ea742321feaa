"""A clock over the real reactor whose time can jump, as the wall clock a reactor reads can.

Twisted's reactor reads ``time.time()``: when the system clock is stepped (NTP, a VM
restored, an operator), every delayed call due before the new time fires at once
(a forward jump), or every pending one waits the extra time (a backward jump).  This
machine's clock cannot be stepped in a test, so the pilot gets this clock instead
(as ``clock`` and ``wall``): it runs at the reactor's pace, and ``jump(seconds)``
moves its time and reschedules every pending call just as a step of the system
clock reschedules the reactor's.  Processes and sockets stay real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer


@implementer(IDelayedCall)
class JumpingCall:
    def __init__(
        self, clock: JumpingClock, when: float, f: Callable[..., object], args: Any, kw: Any
    ) -> None:
        self._clock = clock
        self.time = when
        self._f = f
        self._args = args
        self._kw = kw
        self._called = False
        self._cancelled = False
        self._real = clock.reactor.callLater(max(0.0, when - clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._called = True
        self._clock.forget(self)
        self._f(*self._args, **self._kw)

    def reschedule(self) -> None:
        if self.active():
            self._real.reset(max(0.0, self.time - self._clock.seconds()))

    def getTime(self) -> float:
        return self.time

    def cancel(self) -> None:
        self._real.cancel()
        self._cancelled = True
        self._clock.forget(self)

    def delay(self, secondsLater: float) -> None:
        self.time += secondsLater
        self.reschedule()

    def reset(self, secondsFromNow: float) -> None:
        self.time = self._clock.seconds() + secondsFromNow
        self.reschedule()

    def active(self) -> bool:
        return not (self._called or self._cancelled)


@implementer(IReactorTime)
class JumpingClock:
    """See the module docstring."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.offset = 0.0
        self._calls: list[JumpingCall] = []

    def seconds(self) -> float:
        return float(self.reactor.seconds()) + self.offset

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> JumpingCall:
        call = JumpingCall(self, self.seconds() + delay, callable, args, kw)
        self._calls.append(call)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [call for call in self._calls if call.active()]

    def forget(self, call: JumpingCall) -> None:
        if call in self._calls:
            self._calls.remove(call)

    def jump(self, seconds: float) -> None:
        """Step the clock by ``seconds`` (negative: back); due calls fire in time order."""
        self.offset += seconds
        for call in sorted(self._calls, key=lambda c: c.time):
            call.reschedule()
