"""``pilot.eventservice.channel``: payload workers on a real Unix-domain socket."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pilot.eventservice.channel import RangeChannel, Ranges
from pilot.eventservice.messages import ChannelMessageError, RangeDone, RangeFailed

reactor: Any = _reactor


class Feeder:
    """Hands out ``batches`` in order, then None; records what the workers said."""

    def __init__(self, batches: list[list[dict[str, Any]]], *, hold: bool = False) -> None:
        self.batches = batches
        self.hold = hold
        self.held: list[Deferred[Ranges | None]] = []
        self.asked: list[str] = []
        self.done: list[tuple[str, RangeDone]] = []
        self.failed: list[tuple[str, RangeFailed]] = []
        self.bad: list[tuple[str, str]] = []
        self.gone: Deferred[str] = Deferred()
        self.cancelled: list[str] = []
        self._waiters: list[tuple[Any, Deferred[None]]] = []

    def when(self, check: Any) -> Deferred[None]:
        """Fires once ``check()`` holds: checked whenever the channel calls the feeder."""
        d: Deferred[None] = Deferred()
        self._waiters.append((check, d))
        self._wake()
        return d.addTimeout(10, reactor)

    def _wake(self) -> None:
        for check, d in list(self._waiters):
            if check():
                self._waiters.remove((check, d))
                d.callback(None)

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        self.asked.append(worker)
        try:
            if self.hold:
                d: Deferred[Ranges | None] = Deferred(lambda _: self.cancelled.append(worker))
                self.held.append(d)
                return d
            return succeed(self.batches.pop(0) if self.batches else None)
        finally:
            self._wake()

    def range_done(self, worker: str, message: RangeDone) -> None:
        self.done.append((worker, message))
        self._wake()

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        self.failed.append((worker, message))

    def bad_message(self, worker: str, error: ChannelMessageError) -> None:
        self.bad.append((worker, str(error)))

    def worker_gone(self, worker: str) -> None:
        if not self.gone.called:
            self.gone.callback(worker)


class Client(Protocol):
    """A payload worker: sends lines, collects answer lines."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: list[tuple[int, Deferred[list[str]]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        lines = self.buffer.decode().splitlines()
        for count, d in list(self.waiting):
            if len(lines) >= count:
                self.waiting.remove((count, d))
                d.callback(lines[:count])

    def lines(self, count: int) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.waiting.append((count, d))
        self.dataReceived(b"")
        return d

    def send(self, *lines: str) -> None:
        assert self.transport is not None
        self.transport.write("".join(line + "\n" for line in lines).encode())


RANGE = {
    "eventRangeID": "1-2-3-4-5",
    "startEvent": 1,
    "lastEvent": 1,
    "LFN": "EVNT.01",
    "GUID": "g",
    "scope": "s",
}


class ChannelTests(TestCase):
    timeout = 30

    async def start(self, feeder: Feeder) -> RangeChannel:
        # trial's temp paths are longer than a socket path may be; so are many job directories
        directory = Path(tempfile.mkdtemp(prefix="es-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        channel = RangeChannel(reactor, directory / "es.sock", feeder)
        await channel.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(channel.close()))
        return channel

    async def connect(self, channel: RangeChannel) -> Client:
        client = Client()
        await connectProtocol(UNIXClientEndpoint(reactor, str(channel.path)), client)
        self.addCleanup(lambda: client.transport.loseConnection() if client.transport else None)
        return client

    async def test_ready_done_failed_and_no_more(self) -> None:
        feeder = Feeder([[RANGE]])
        channel = await self.start(feeder)
        self.assertEqual(stat.S_IMODE(os.stat(channel.path).st_mode), 0o600)
        client = await self.connect(channel)
        client.send("Ready for events", "Ready for events")
        answers = await client.lines(2)
        self.assertEqual(answers[1], "No more events")
        self.assertIn('"eventRangeID":"1-2-3-4-5"', answers[0])
        client.send("/w/out.root,ID:1-2-3-4-5,CPU:1.5,WALL:2", "ERR_ATHENAMP_PROCESS 9-9: broken", "nonsense")
        client.send("Ready for events")
        self.assertEqual((await client.lines(3))[2], "No more events")
        self.assertEqual(feeder.asked, ["worker-1", "worker-1"], "asked no more once exhausted")
        self.assertEqual(feeder.done[0][1].range_id, "1-2-3-4-5")
        self.assertEqual(feeder.failed[0][1].code, "ERR_ATHENAMP_PROCESS")
        self.assertIn("unknown message", feeder.bad[0][1])

    async def test_workers_are_fed_independently(self) -> None:
        feeder = Feeder([[RANGE], [dict(RANGE, eventRangeID="b")]])
        channel = await self.start(feeder)
        first, second = await self.connect(channel), await self.connect(channel)
        first.send("Ready for events")
        await first.lines(1)
        second.send("Ready for events")
        answer = (await second.lines(1))[0]
        self.assertIn('"b"', answer)
        self.assertEqual(feeder.asked, ["worker-1", "worker-2"])
        self.assertEqual(sorted(channel.workers), ["worker-1", "worker-2"])

    async def test_answers_keep_request_order(self) -> None:
        feeder = Feeder([], hold=True)
        channel = await self.start(feeder)
        client = await self.connect(channel)
        client.send("Ready for events", "Ready for events")
        await feeder.when(lambda: len(feeder.held) == 1)
        feeder.held[0].callback([dict(RANGE, eventRangeID="first")])
        await feeder.when(lambda: len(feeder.held) == 2)
        feeder.held[1].callback([dict(RANGE, eventRangeID="second")])
        lines = await client.lines(2)
        self.assertIn('"first"', lines[0])
        self.assertIn('"second"', lines[1])

    async def test_a_gone_worker_cancels_its_request(self) -> None:
        feeder = Feeder([], hold=True)
        channel = await self.start(feeder)
        client = await self.connect(channel)
        client.send("Ready for events")
        await feeder.when(lambda: len(feeder.held) == 1)
        assert client.transport is not None
        client.transport.loseConnection()
        self.assertEqual(await feeder.gone, "worker-1")
        self.assertEqual(feeder.cancelled, ["worker-1"])

    async def test_feeder_failure_tells_the_worker_to_finish(self) -> None:
        feeder = Feeder([], hold=True)
        channel = await self.start(feeder)
        client = await self.connect(channel)
        client.send("Ready for events")
        await feeder.when(lambda: len(feeder.held) == 1)
        feeder.held[0].errback(RuntimeError("server unreachable"))
        self.assertEqual(await client.lines(1), ["No more events"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_overlong_and_binary_lines_are_reported(self) -> None:
        feeder = Feeder([[RANGE]])
        channel = await self.start(feeder)
        client = await self.connect(channel)
        assert client.transport is not None
        client.transport.write(b"\xff\xfe\n" + b"x" * 70_000 + b"\nReady for events\n")
        self.assertIn("1-2-3-4-5", (await client.lines(1))[0])
        self.assertEqual(
            [why for _, why in feeder.bad], ["a line that is not UTF-8", "a line longer than 65536 bytes"]
        )

    async def test_a_real_process_speaks_the_grammar(self) -> None:
        feeder = Feeder([[RANGE]])
        channel = await self.start(feeder)
        script = (
            "import json, os, socket\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(os.environ['PILOT_EVENTRANGECHANNEL'])\n"
            "f = s.makefile('rw')\n"
            "while True:\n"
            "    f.write('Ready for events\\n'); f.flush()\n"
            "    answer = f.readline().strip()\n"
            "    if answer == 'No more events': break\n"
            "    for r in json.loads(answer):\n"
            "        f.write(f\"/w/{r['eventRangeID']}.out,ID:{r['eventRangeID']},CPU:0.1,WALL:0.2\\n\")\n"
        )
        env = {"PILOT_EVENTRANGECHANNEL": str(channel.path), "PATH": os.environ.get("PATH", "")}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", script], env=env, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        await feeder.when(lambda: len(feeder.done) == 1)
        self.assertEqual(feeder.done[0][1].output, "/w/1-2-3-4-5.out")

    def test_too_long_a_path_is_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            RangeChannel(reactor, Path("/" + "d" * 120) / "es.sock", Feeder([]))
        self.assertIn("longer than a Unix socket allows", str(caught.exception))
