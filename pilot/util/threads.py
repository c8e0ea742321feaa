"""Running blocking functions off the reactor thread.

``ThreadRunner`` is the one shape every blocking helper takes: a callable that runs
``f(*args, **kwargs)`` in a worker thread and returns a Deferred of its result
(``deferToThreadPool`` bound to a pool).  Code below the service layer never
chooses a pool itself; the service owns the pools and hands runners down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


class ThreadRunner(Protocol):
    """Runs a blocking function in a worker thread (``deferToThreadPool`` bound to a pool)."""

    def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]: ...
