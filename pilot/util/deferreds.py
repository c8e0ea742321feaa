"""Small Deferred helpers: one fresh Deferred per waiter, never a shared one."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class OneShot(Generic[T]):
    """A result that arrives once; every ``wait()`` gets its own Deferred for it.

    Sharing one Deferred between waiters lets one waiter's callbacks change what the
    next one sees (STYLE: one Deferred per waiter).  A waiter cancelling its own
    Deferred affects nobody else.
    """

    def __init__(self) -> None:
        self._result: T | Failure | None = None
        self._fired = False
        self._waiters: list[Deferred[T]] = []

    @property
    def fired(self) -> bool:
        return self._fired

    def fire(self, result: T | Failure) -> None:
        if self._fired:
            return
        self._fired, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)

    def wait(self) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        if self._fired:
            self._deliver(waiter)
        else:
            self._waiters.append(waiter)
        return waiter

    def _deliver(self, waiter: Deferred[T]) -> None:
        if waiter.called:  # cancelled by its owner
            return
        result = self._result
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)  # type: ignore[arg-type]

    def follow(self, source: Deferred[T]) -> Deferred[T]:
        """Fire with ``source``'s result; ``source`` is passed on unchanged."""

        def passed(result: T | Failure) -> T | Failure:
            self.fire(result)
            return result

        return source.addBoth(passed)
