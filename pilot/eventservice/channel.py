"""The event-range channel: a Unix-domain socket the payload's workers connect to.

The pilot listens on a ``SOCK_STREAM`` socket (mode 0600: only the pilot's uid may
connect) and exports its path to the payload as ``PILOT_EVENTRANGECHANNEL``.  Each
connection is one payload worker, fed on its own: a ``Ready for events`` is answered
with the ranges the ``RangeFeeder`` gives for that worker, or ``No more events`` once it
has none.  Answers go out in the order the requests came, however long the feeder takes
(the feeder's prefetch buffer usually answers at once).  Everything is event-driven on
the reactor: no polling, unlike the yampl loop of the reference pilot.

A worker's bad line (unknown, overlong, not UTF-8) is reported to the feeder, which
decides what it means for the job; the channel keeps reading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.eventservice.messages import (
    NO_MORE_EVENTS,
    ChannelMessageError,
    LineSplitter,
    RangeDone,
    RangeFailed,
    ReadyForEvents,
    parse_payload_message,
    ranges_message,
)
from pilot.logs import pilot_observer

#: Bytes ``sun_path`` holds on Linux, the terminating NUL included.
UNIX_PATH_MAX = 108

Ranges = Sequence[Mapping[str, Any]]


class RangeFeeder(Protocol):
    """What the channel asks and tells about the ranges; ``worker`` names a connection."""

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        """Ranges for ``worker`` (a non-empty list), or None: no more events."""

    def range_done(self, worker: str, message: RangeDone) -> None: ...

    def range_failed(self, worker: str, message: RangeFailed) -> None: ...

    def bad_message(self, worker: str, error: ChannelMessageError) -> None: ...

    def worker_gone(self, worker: str) -> None: ...


class WorkerConnection(TwistedProtocol):
    """One payload worker's connection: lines in, answers out in request order."""

    log = Logger(observer=pilot_observer)

    def __init__(self, worker: str, feeder: RangeFeeder, channel: RangeChannel) -> None:
        self.worker = worker
        self._feeder = feeder
        self._channel = channel
        self._splitter = LineSplitter()
        self._answering: Deferred[None] = succeed(None)
        self._in_flight: Deferred[Ranges | None] | None = None
        self._exhausted = False

    def connectionMade(self) -> None:
        self._channel._connected(self)
        self.log.info("event-range worker {worker} connected", worker=self.worker, event="es.worker")

    def dataReceived(self, data: bytes) -> None:
        for line in self._splitter.feed(data):
            if isinstance(line, ChannelMessageError):
                self._feeder.bad_message(self.worker, line)
            else:
                self._line(line)

    def _line(self, line: str) -> None:
        try:
            message = parse_payload_message(line)
        except ChannelMessageError as exc:
            self._feeder.bad_message(self.worker, exc)
            return
        if isinstance(message, ReadyForEvents):
            self._answering.addCallback(lambda _: self._answer())
        elif isinstance(message, RangeDone):
            self._feeder.range_done(self.worker, message)
        else:
            self._feeder.range_failed(self.worker, message)

    def _answer(self) -> Deferred[None] | None:
        if not self.connected:
            return None  # gone before its turn: ask no ranges for it
        if self._exhausted:
            self._send(NO_MORE_EVENTS)
            return None
        asking = maybeDeferred(self._feeder.next_ranges, self.worker)
        self._in_flight = asking
        answered: Deferred[None] = asking.addCallback(self._send_ranges)
        answered.addErrback(self._not_answered)
        return answered

    def _send_ranges(self, ranges: Ranges | None) -> None:
        self._in_flight = None
        if not ranges:
            self._exhausted = True
            self._send(NO_MORE_EVENTS)
        else:
            self._send(ranges_message(ranges))

    def _not_answered(self, failure: Failure) -> None:
        self._in_flight = None
        if failure.check(CancelledError):
            return  # the worker went away while the feeder looked for ranges
        # the feeder could not give ranges (the server failed): the worker is told to finish
        self.log.failure("no ranges for worker {worker}", failure, worker=self.worker)
        self._exhausted = True
        self._send(NO_MORE_EVENTS)

    def _send(self, line: str) -> None:
        if self.transport is not None and self.connected:
            self.transport.write(line.encode("utf-8") + b"\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._in_flight is not None:
            self._in_flight.cancel()
        self._channel._disconnected(self)
        self._feeder.worker_gone(self.worker)


class RangeChannel(Factory):
    """Listens at ``path`` for payload workers; ``listen()`` then ``close()``."""

    def __init__(self, reactor: IReactorUNIX, path: Path, feeder: RangeFeeder) -> None:
        if len(os.fsencode(path)) >= UNIX_PATH_MAX:
            raise ValueError(
                f"the event-range channel path {path} is longer than a Unix socket allows"
                f" ({UNIX_PATH_MAX - 1} bytes)"
            )
        self.path = path
        self._reactor = reactor
        self._feeder = feeder
        self._port: IListeningPort | None = None
        self._workers: list[WorkerConnection] = []
        self._count = 0

    @property
    def workers(self) -> Sequence[str]:
        """The names of the workers connected now."""
        return [w.worker for w in self._workers]

    def buildProtocol(self, addr: Any) -> WorkerConnection:
        self._count += 1
        return WorkerConnection(f"worker-{self._count}", self._feeder, self)

    async def listen(self) -> None:
        endpoint = UNIXServerEndpoint(  # type: ignore[no-untyped-call]
            self._reactor, str(self.path), mode=0o600, wantPID=False
        )
        self._port = await endpoint.listen(self)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Stop listening, drop every worker, remove the socket file."""
        if self._port is not None:
            port, self._port = self._port, None
            stopping = port.stopListening()
            if stopping is not None:
                await stopping
        for worker in list(self._workers):
            if worker.transport is not None:
                worker.transport.loseConnection()
        self.path.unlink(missing_ok=True)

    def _connected(self, worker: WorkerConnection) -> None:
        self._workers.append(worker)

    def _disconnected(self, worker: WorkerConnection) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
