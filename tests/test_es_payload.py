"""``tests/es_payload.py``, the reference event-service payload, as real processes on a real channel."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.eventservice.channel import RangeChannel, Ranges
from pilot.eventservice.messages import ChannelMessageError, RangeDone, RangeFailed, parse_payload_message
from tests import es_payload

reactor: Any = _reactor

PAYLOAD = Path(__file__).with_name("es_payload.py")


def make_range(number: int, *, events: int = 1) -> dict[str, Any]:
    """A range as the server sends it (the shape of pilot3's eventservice_job.txt)."""
    return {
        "eventRangeID": f"12164365-3616045203-10980024041-{number}-8",
        "startEvent": number * 10,
        "lastEvent": number * 10 + events - 1,
        "LFN": "EVNT.12458444._000048.pool.root.1",
        "GUID": "63A015D3-789D-E74D-BAA9-9F95DB068EE9",
        "scope": "mc15_13TeV",
    }


def expected_content(item: dict[str, Any], size: int) -> bytes:
    return es_payload.output_content(es_payload.parse_range(item), size)


class Feeder:
    """The pilot's side of the ranges: hands out ``batches`` in order, then None; records the rest."""

    def __init__(self, batches: Sequence[Sequence[dict[str, Any]]], *, hold: bool = False) -> None:
        self.batches = [list(batch) for batch in batches]
        self.hold = hold  # never answer (the request is cancelled when its worker goes)
        self.asked: list[str] = []
        self.handed: dict[str, str] = {}
        self.done: list[tuple[str, RangeDone]] = []
        self.failed: list[tuple[str, RangeFailed]] = []
        self.bad: list[tuple[str, str]] = []
        self.gone: list[str] = []
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def when(self, check: Callable[[], bool], timeout: float = 10) -> Deferred[None]:
        """Fires once ``check()`` holds: checked whenever the channel calls the feeder."""
        d: Deferred[None] = Deferred()
        self._waiters.append((check, d))
        self._wake()
        return d.addTimeout(timeout, reactor)

    def _wake(self) -> None:
        for check, d in list(self._waiters):
            if check():
                self._waiters.remove((check, d))
                d.callback(None)

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        self.asked.append(worker)
        if self.hold:
            self._wake()
            return Deferred(lambda d: None)
        batch = self.batches.pop(0) if self.batches else None
        for item in batch or ():
            self.handed[item["eventRangeID"]] = worker
        self._wake()
        return succeed(batch)

    def range_done(self, worker: str, message: RangeDone) -> None:
        self.done.append((worker, message))
        self._wake()

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        self.failed.append((worker, message))
        self._wake()

    def bad_message(self, worker: str, error: ChannelMessageError) -> None:
        self.bad.append((worker, str(error)))
        self._wake()

    def worker_gone(self, worker: str) -> None:
        self.gone.append(worker)
        self._wake()


class Payload(ProcessProtocol):
    """The payload process: its output lines as they come, and how it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ending: tuple[int | None, int | None] | None = None
        self._ended: list[Deferred[tuple[int | None, int | None]]] = []
        self._waiters: list[tuple[Callable[[list[str]], bool], Deferred[None]]] = []

    @property
    def lines(self) -> list[str]:
        return self.out.decode(errors="replace").splitlines()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for check, d in list(self._waiters):
            if check(self.lines):
                self._waiters.remove((check, d))
                d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def printed(self, check: Callable[[list[str]], bool], timeout: float = 10) -> Deferred[None]:
        """Fires once ``check(lines printed so far)`` holds."""
        d: Deferred[None] = Deferred()
        self._waiters.append((check, d))
        self.outReceived(b"")
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ending = (value.exitCode, value.signal)
        for d in self._ended:
            d.callback(self.ending)
        self._ended.clear()

    def ended(self, timeout: float = 10) -> Deferred[tuple[int | None, int | None]]:
        """(exit code, signal) once the payload has ended; a fresh Deferred per caller."""
        if self.ending is not None:
            return succeed(self.ending)
        d: Deferred[tuple[int | None, int | None]] = Deferred()
        self._ended.append(d)
        return d.addTimeout(timeout, reactor)


class Scripted(Protocol):
    """A channel end that answers ``Ready for events`` from a script (None: close instead)."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers = answers
        self.received: list[str] = []
        self._buffer = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode()
            self.received.append(line)
            if line == es_payload.READY_FOR_EVENTS and self.transport is not None:
                answer = self.answers.pop(0)
                if answer is None:
                    self.transport.loseConnection()
                else:
                    self.transport.write(answer.encode() + b"\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class PayloadTests(TestCase):
    timeout = 30

    def socket_dir(self) -> Path:
        # trial's temp paths are longer than a socket path may be
        directory = Path(tempfile.mkdtemp(prefix="es-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    async def channel(self, feeder: Feeder) -> RangeChannel:
        channel = RangeChannel(reactor, self.socket_dir() / "es.sock", feeder)
        await channel.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(channel.close()))
        return channel

    async def scripted(self, protocol: Scripted) -> Path:
        path = self.socket_dir() / "es.sock"
        factory = Factory.forProtocol(lambda: protocol)
        port = await UNIXServerEndpoint(reactor, str(path)).listen(factory)
        self.addCleanup(port.stopListening)
        return path

    def outdir(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        return path

    def start(self, channel: Path | None, *args: str, cwd: Path | None = None) -> Payload:
        """The payload in its own session (pgid == pid), the channel in its environment."""
        protocol = Payload()
        setsid = shutil.which("setsid")
        assert setsid is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if channel is not None:
            env["PILOT_EVENTRANGECHANNEL"] = str(channel)
        argv = [setsid, sys.executable, "-I", str(PAYLOAD), *args]
        transport = reactor.spawnProcess(
            protocol, setsid, argv, env=env, path=None if cwd is None else str(cwd)
        )
        pid = transport.pid

        async def stop() -> None:
            if protocol.ending is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await protocol.ended()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return protocol

    async def finish(self, payload: Payload, feeder: Feeder, workers: int) -> tuple[int | None, int | None]:
        """How the payload ended, once it has and the channel has seen all its workers go."""
        ending = await payload.ended()
        await feeder.when(lambda: len(feeder.gone) == workers)
        return ending

    def assertOutputs(self, outdir: Path, ranges: Sequence[dict[str, Any]], size: int) -> None:
        """``outdir`` holds exactly the outputs of ``ranges``, each with its expected content."""
        names = {es_payload.output_name(r["eventRangeID"]): r for r in ranges}
        self.assertEqual(sorted(p.name for p in outdir.iterdir()), sorted(names), "no temporary files left")
        for name, item in names.items():
            self.assertEqual((outdir / name).read_bytes(), expected_content(item, size))

    async def test_one_worker_consumes_twenty_ranges(self) -> None:
        ranges = [make_range(i, events=3) for i in range(20)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        payload = self.start(channel.path, "--output-bytes", "1000", cwd=outdir)  # default: the cwd
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        self.assertEqual([m.range_id for _, m in feeder.done], [r["eventRangeID"] for r in ranges])
        for (_, message), item in zip(feeder.done, ranges, strict=True):
            self.assertEqual(message.output, str(outdir.resolve() / f"{item['eventRangeID']}.pool.root"))
            self.assertGreaterEqual(message.wall_s, 0)
        self.assertOutputs(outdir, ranges, 1000)
        self.assertEqual(feeder.asked, ["worker-1"] * 21)
        self.assertEqual((feeder.failed, feeder.bad, feeder.gone), ([], [], ["worker-1"]))

    async def test_four_workers_share_two_hundred_ranges(self) -> None:
        ranges = [make_range(i) for i in range(200)]
        batches: list[list[dict[str, Any]]] = []
        at = 0
        while at < len(ranges):  # answers of 1, 2 and 3 ranges, as a pilot with a cache gives
            size = 1 + len(batches) % 3
            batches.append(ranges[at : at + size])
            at += size
        feeder = Feeder(batches)
        channel = await self.channel(feeder)
        outdir = self.outdir()
        payload = self.start(channel.path, "--workers", "4", "--output-dir", str(outdir))
        self.assertEqual(await self.finish(payload, feeder, 4), (0, None), payload.err)
        answered = Counter(m.range_id for _, m in feeder.done)
        self.assertEqual(answered, Counter(r["eventRangeID"] for r in ranges), "each range exactly once")
        for worker, message in feeder.done:
            self.assertEqual(worker, feeder.handed[message.range_id], "reported by the worker it went to")
        self.assertEqual(sorted(set(feeder.asked)), [f"worker-{n}" for n in range(1, 5)])
        self.assertEqual((feeder.failed, feeder.bad), ([], []))
        self.assertOutputs(outdir, ranges, 256)

    async def test_fail_ranges_fails_every_kth_range(self) -> None:
        ranges = [make_range(i) for i in range(10)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        payload = self.start(channel.path, "--fail-ranges", "3", "--output-dir", str(outdir))
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        failing = [ranges[2], ranges[5], ranges[8]]
        self.assertEqual([m.range_id for _, m in feeder.failed], [r["eventRangeID"] for r in failing])
        self.assertEqual({m.code for _, m in feeder.failed}, {"ERR_TE_FATAL"})
        self.assertIn("failing range 3 of this worker", feeder.failed[0][1].text)
        done = [r for r in ranges if r not in failing]
        self.assertEqual([m.range_id for _, m in feeder.done], [r["eventRangeID"] for r in done])
        self.assertOutputs(outdir, done, 256)

    async def test_fail_ids_fails_those_ranges(self) -> None:
        ranges = [make_range(i) for i in range(5)]
        feeder = Feeder([ranges[:3], ranges[3:]])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        failing = f"{ranges[1]['eventRangeID']},{ranges[4]['eventRangeID']}"
        payload = self.start(channel.path, "--fail-ids", failing, "--output-dir", str(outdir))
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        self.assertEqual(",".join(m.range_id for _, m in feeder.failed), failing)
        self.assertOutputs(outdir, [ranges[0], ranges[2], ranges[3]], 256)

    async def test_crash_after_kills_the_worker_with_its_range_in_hand(self) -> None:
        ranges = [make_range(i) for i in range(10)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        payload = self.start(channel.path, "--crash-after", "3", "--output-dir", str(outdir))
        self.assertEqual(await self.finish(payload, feeder, 1), (128 + signal.SIGKILL, None), payload.err)
        in_flight = ranges[2]["eventRangeID"]
        self.assertEqual(feeder.handed[in_flight], "worker-1")
        self.assertEqual([m.range_id for _, m in feeder.done], [r["eventRangeID"] for r in ranges[:2]])
        self.assertEqual((feeder.failed, feeder.bad), ([], []), "no message for the range in hand")
        self.assertEqual((feeder.gone, channel.workers), (["worker-1"], []))
        self.assertOutputs(outdir, ranges[:2], 256)

    async def test_crash_exit_exits_with_that_status(self) -> None:
        ranges = [make_range(i) for i in range(4)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        args = ("--crash-after", "2", "--crash-exit", "65", "--output-dir", str(outdir))
        payload = self.start(channel.path, *args)
        self.assertEqual(await self.finish(payload, feeder, 1), (65, None), payload.err)
        self.assertEqual([m.range_id for _, m in feeder.done], [ranges[0]["eventRangeID"]])
        self.assertEqual(list(feeder.handed), [r["eventRangeID"] for r in ranges[:2]])
        self.assertEqual((feeder.failed, feeder.gone), ([], ["worker-1"]))

    async def test_sigterm_finishes_the_ranges_in_hand_and_exits_0(self) -> None:
        ranges = [make_range(i, events=3) for i in range(10)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        args = ("--workers", "2", "--event-seconds", "0.15", "--output-dir", str(outdir))
        payload = self.start(channel.path, *args)
        await payload.printed(lambda lines: sum(" started " in line for line in lines) == 2)
        assert payload.transport is not None
        payload.transport.signalProcess("TERM")  # the parent alone: it passes SIGTERM on
        self.assertEqual(await self.finish(payload, feeder, 2), (0, None), payload.err)
        self.assertEqual(sorted(feeder.asked), ["worker-1", "worker-2"], "nobody asked again")
        self.assertEqual(sorted(m.range_id for _, m in feeder.done), sorted(feeder.handed))
        self.assertEqual(len(feeder.done), 2)
        self.assertTrue(all(m.wall_s >= 0.4 for _, m in feeder.done), "each range ran to its end")
        self.assertOutputs(outdir, ranges[:2], 256)

    async def test_sigterm_without_a_range_in_hand_exits_0_at_once(self) -> None:
        feeder = Feeder([], hold=True)
        channel = await self.channel(feeder)
        payload = self.start(channel.path, "--output-dir", str(self.outdir()))
        await feeder.when(lambda: feeder.asked == ["worker-1"])
        assert payload.transport is not None
        payload.transport.signalProcess("TERM")
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        self.assertIn("stopping on SIGTERM", payload.lines[-1])

    async def test_ignore_sigterm_carries_on(self) -> None:
        ranges = [make_range(i, events=2) for i in range(3)]
        feeder = Feeder([[r] for r in ranges])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        args = ("--ignore-sigterm", "--event-seconds", "0.05", "--output-dir", str(outdir))
        payload = self.start(channel.path, *args)
        await payload.printed(lambda lines: any(" started " in line for line in lines))
        os.killpg(payload.transport.pid, signal.SIGTERM)  # type: ignore[union-attr]
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        self.assertEqual(len(feeder.done), 3)

    async def test_a_malformed_range_gets_a_parse_error_naming_it(self) -> None:
        good = make_range(1)
        feeder = Feeder([[{"eventRangeID": "bad-1", "startEvent": 1}, good]])
        channel = await self.channel(feeder)
        outdir = self.outdir()
        payload = self.start(channel.path, "--output-dir", str(outdir))
        self.assertEqual(await self.finish(payload, feeder, 1), (0, None), payload.err)
        [(_, failed)] = feeder.failed
        self.assertEqual((failed.range_id, failed.code), ("bad-1", "ERR_ATHENAMP_PARSE"))
        self.assertIn("missing lastEvent, LFN", failed.text)
        self.assertEqual([m.range_id for _, m in feeder.done], [good["eventRangeID"]])

    async def test_an_answer_that_is_not_a_json_list_gets_a_parse_error(self) -> None:
        server = Scripted(["this is not json", '{"eventRangeID":"x"}', "No more events"])
        path = await self.scripted(server)
        payload = self.start(None, "--channel", str(path), "--output-dir", str(self.outdir()))
        self.assertEqual(await payload.ended(), (0, None), payload.err)
        await server.closed
        ready, parse1, ready2, parse2, ready3 = server.received
        self.assertEqual({ready, ready2, ready3}, {"Ready for events"})
        self.assertTrue(
            parse1.startswith("ERR_ATHENAMP_PARSE this is not json: Wrong format (not JSON"), parse1
        )
        self.assertEqual(
            parse2,
            'ERR_ATHENAMP_PARSE {"eventRangeID":"x"}: Wrong format (not a non-empty JSON list of ranges)',
        )
        message = parse_payload_message(parse2)
        assert isinstance(message, RangeFailed)
        self.assertEqual(message.range_id, "x")

    async def test_an_overlong_answer_gets_a_parse_error(self) -> None:
        server = Scripted(["[" + " " * es_payload.MAX_ANSWER_BYTES + "]", "No more events"])
        path = await self.scripted(server)
        payload = self.start(None, "--channel", str(path), "--output-dir", str(self.outdir()))
        self.assertEqual(await payload.ended(), (0, None), payload.err)
        await server.closed
        self.assertEqual(
            server.received[1],
            f"ERR_ATHENAMP_PARSE an answer: Wrong format (longer than {es_payload.MAX_ANSWER_BYTES} bytes)",
        )
        self.assertEqual(len(server.received), 3)

    async def test_the_channel_closing_exits_3(self) -> None:
        server = Scripted([None])
        path = await self.scripted(server)
        payload = self.start(None, "--channel", str(path), "--output-dir", str(self.outdir()))
        self.assertEqual(await payload.ended(), (es_payload.EXIT_CHANNEL_CLOSED, None))
        self.assertIn(b"the pilot closed the channel", payload.err)

    async def test_no_channel_is_a_usage_error(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-I", str(PAYLOAD)], env={}, reactor=reactor
        )
        self.assertEqual(code, es_payload.EXIT_USAGE)
        self.assertIn(b"PILOT_EVENTRANGECHANNEL", err)


class OutputNameTests(SynchronousTestCase):
    def test_a_plain_id_is_kept(self) -> None:
        self.assertEqual(es_payload.output_name("1-2-3-4-5"), "1-2-3-4-5.pool.root")

    def test_unsafe_ids_are_mapped_without_collisions(self) -> None:
        names = {es_payload.output_name(i) for i in ("a/b", "a_b", "a\\b", "..", ".", "x" * 300)}
        self.assertEqual(len(names), 6)
        for name in names:
            self.assertRegex(name, r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.pool\.root$")
            self.assertLess(len(name), 255)

    def test_content_is_deterministic_and_sized(self) -> None:
        item = es_payload.parse_range(make_range(7, events=4))
        self.assertEqual(es_payload.output_content(item, 5000), es_payload.output_content(item, 5000))
        self.assertEqual(len(es_payload.output_content(item, 5000)), 5000)
        self.assertEqual(len(es_payload.output_content(item, 3)), 3)
        other = es_payload.parse_range(make_range(8, events=4))
        self.assertNotEqual(es_payload.output_content(item, 100), es_payload.output_content(other, 100))
