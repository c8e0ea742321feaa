"""``pilot.hpc.raydriver``: one event-service payload whose workers are Ray actors on many nodes.

Real processes throughout: the pilot's own ``RangeChannel`` feeds the driver, which runs
on a real Ray cluster of two raylets on this machine (``tests/raycluster.py``) or on a
local Ray it starts itself (``--local``); the end-to-end test runs a whole pilot against
the dev server.  The driver's outputs are checked byte for byte against the reference
payload's (``tests/es_payload.py``): to the pilot, the two are the same payload.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.eventservice.channel import RangeChannel, Ranges
from pilot.eventservice.messages import RangeDone, RangeFailed
from pilot.hpc import channel as hpc_channel
from pilot.hpc import rayworker

from . import es_payload
from .harness import run_to_end
from .raycluster import (
    NODE_IP,
    RayCluster,
    end_sessions,
    ray_environment,
    require_ray,
    session_members,
    sessions_mentioning,
)
from .test_es_e2e import EventServiceSite
from .test_es_payload import Feeder, Payload, expected_content, make_range

reactor: Any = _reactor


class HoldingFeeder(Feeder):
    """A ``Feeder`` that also tracks how many ranges each worker holds (handed, not reported)."""

    def __init__(self, batches: Sequence[Sequence[dict[str, Any]]]) -> None:
        super().__init__(batches)
        self.holding: defaultdict[str, int] = defaultdict(int)
        self.most_held: defaultdict[str, int] = defaultdict(int)

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        answer = super().next_ranges(worker)
        answer.addCallback(self._held, worker)
        return answer

    def _held(self, batch: Ranges | None, worker: str) -> Ranges | None:
        self.holding[worker] += len(batch or ())
        self.most_held[worker] = max(self.most_held[worker], self.holding[worker])
        return batch

    def range_done(self, worker: str, message: RangeDone) -> None:
        self.holding[worker] -= 1
        super().range_done(worker, message)

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        self.holding[worker] -= 1
        super().range_failed(worker, message)


def batches_of(ranges: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(ranges[at : at + size]) for at in range(0, len(ranges), size)]


class DriverTestCase(TestCase):
    """Starts the pilot's channel and the driver (in its own session, ended in a cleanup)."""

    timeout = 150

    def setUp(self) -> None:
        require_ray()
        self.short = Path(os.environ.get("TMPDIR", "/tmp")) / f"txr-{os.getpid()}-{id(self) % 100000}"
        self.short.mkdir()  # a socket path must be short: trial's temp paths are not
        self.addCleanup(shutil.rmtree, self.short, ignore_errors=True)

    async def channel(self, feeder: Feeder) -> RangeChannel:
        channel = RangeChannel(reactor, self.short / "es.sock", feeder)
        await channel.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(channel.close()))
        return channel

    def outdir(self) -> Path:
        path = Path(self.mktemp()).absolute()
        path.mkdir()
        return path

    def driver(self, channel: RangeChannel, *args: str) -> Payload:
        protocol = Payload()
        setsid = shutil.which("setsid")
        assert setsid is not None
        argv = [setsid, sys.executable, "-m", "pilot.hpc.raydriver", "--channel", str(channel.path), *args]
        transport = reactor.spawnProcess(protocol, setsid, argv, env=ray_environment())
        session = transport.pid
        self.addCleanup(lambda: Deferred.fromCoroutine(end_sessions(reactor, [session])))
        protocol.session = session  # type: ignore[attr-defined]
        return protocol

    async def finish(self, payload: Payload, feeder: Feeder, workers: int, timeout: float = 45) -> int | None:
        """The driver's exit code, once it exited and the channel saw all its workers go."""
        code, sig = await payload.ended(timeout)
        self.assertIsNone(sig, payload.err.decode(errors="replace")[-3000:])
        await feeder.when(lambda: len(feeder.gone) == workers)
        return code

    def assertOutputs(self, outdir: Path, ranges: Sequence[dict[str, Any]], size: int = 256) -> None:
        """Exactly these ranges' outputs, each the reference payload's bytes, nothing half-written."""
        names = {es_payload.output_name(r["eventRangeID"]): r for r in ranges}
        self.assertEqual(sorted(p.name for p in outdir.iterdir()), sorted(names))
        for name, item in names.items():
            self.assertEqual((outdir / name).read_bytes(), expected_content(item, size), name)

    def assertEachReportedOnce(self, feeder: Feeder, ranges: Sequence[dict[str, Any]]) -> None:
        reported = Counter(m.range_id for _, m in feeder.done) + Counter(m.range_id for _, m in feeder.failed)
        self.assertEqual(reported, Counter(r["eventRangeID"] for r in ranges), "each range exactly once")
        reports: list[tuple[str, RangeDone | RangeFailed]] = [*feeder.done, *feeder.failed]
        for worker, message in reports:
            self.assertEqual(worker, feeder.handed[message.range_id], "reported by the worker it went to")
        self.assertEqual(feeder.bad, [])


class ClusterTests(DriverTestCase):
    """The driver on a Ray cluster of two nodes (two raylets, two CPUs each)."""

    async def cluster(self) -> RayCluster:
        cluster = RayCluster(reactor, Path(self.mktemp()).absolute() / "ray")
        self.addCleanup(lambda: Deferred.fromCoroutine(cluster.stop()))
        await cluster.start()
        return cluster

    def actors(self, pids_file: Path) -> list[tuple[int, int, str]]:
        """(actor, pid, node id) per started actor, from ``--pids-file``."""
        rows = [line.split() for line in pids_file.read_text().splitlines()]
        return [(int(number), int(pid), node) for number, pid, _, node in rows]

    async def test_four_actors_process_two_thousand_ranges(self) -> None:
        cluster = await self.cluster()
        ranges = [make_range(i, events=2) for i in range(2000)]
        feeder = HoldingFeeder(batches_of(ranges, 1))
        channel = await self.channel(feeder)
        outdir, pids = self.outdir(), self.short / "pids"
        args = ("--address", cluster.address, "--workers", "4", "--output-dir", str(outdir))
        driver = self.driver(channel, *args, "--pids-file", str(pids))
        self.assertEqual(await self.finish(driver, feeder, 4), 0, driver.err[-3000:])
        self.assertEachReportedOnce(feeder, ranges)
        self.assertEqual(feeder.failed, [])
        self.assertOutputs(outdir, ranges)
        for _, message in feeder.done:
            self.assertEqual(message.output, str(outdir / es_payload.output_name(message.range_id)))
        actors = self.actors(pids)
        self.assertEqual(len(actors), 4)
        self.assertEqual(
            Counter(Counter(node for _, _, node in actors).values()), {2: 2}, "SPREAD: 2 per node"
        )
        self.assertEqual(
            sorted(feeder.most_held), [f"worker-{n}" for n in range(1, 5)], "one connection each"
        )
        self.assertEqual(set(feeder.most_held.values()), {2}, "pipelined, and never more than 2 batches")
        self.assertTrue(cluster.members(), "the cluster outlives its driver")

    async def test_a_killed_actor_loses_only_the_ranges_in_its_hands(self) -> None:
        batch = 2
        cluster = await self.cluster()
        ranges = [make_range(i) for i in range(1200)]
        feeder = HoldingFeeder(batches_of(ranges, batch))
        channel = await self.channel(feeder)
        outdir, pids = self.outdir(), self.short / "pids"
        # found as the README's Slurm recipe finds it: "auto" in the directory of `ray start`
        args = ("--temp-dir", str(cluster.temp_dir), "--workers", "4", "--output-dir", str(outdir))
        driver = self.driver(channel, *args, "--pids-file", str(pids), "--event-seconds", "0.003")
        await feeder.when(lambda: len(feeder.done) >= 200, timeout=90)
        number, victim, _ = self.actors(pids)[0]
        os.kill(victim, signal.SIGKILL)
        self.assertEqual(await self.finish(driver, feeder, 4), 0, driver.err[-3000:])
        self.assertEachReportedOnce(feeder, ranges)
        lost = [(worker, message) for worker, message in feeder.failed]
        self.assertTrue(lost, "the victim held ranges when it died")
        self.assertEqual({worker for worker, _ in lost}, {f"worker-{number}"}, "only the victim's ranges")
        self.assertLessEqual(len(lost), 2 * batch, "at most its two batches in flight")
        for _, message in lost:
            self.assertEqual(message.code, "ERR_TE_FATAL")
            self.assertTrue(message.text.startswith("ray worker lost: "), message.text)
        victim_ranges = [r for r, w in feeder.handed.items() if w == f"worker-{number}"]
        self.assertEqual({m.range_id for _, m in lost}, set(victim_ranges[-len(lost) :]), "its last ones")
        self.assertEqual(feeder.gone[0], f"worker-{number}", "its connection closed first")
        done = {m.range_id for _, m in feeder.done}
        self.assertOutputs(outdir, [r for r in ranges if r["eventRangeID"] in done])
        self.assertIn(b"actor %d lost" % number, driver.out)

    async def test_a_lost_node_loses_only_the_ranges_its_actors_held(self) -> None:
        cluster = await self.cluster()
        ranges = [make_range(i) for i in range(1500)]
        feeder = HoldingFeeder(batches_of(ranges, 1))
        channel = await self.channel(feeder)
        outdir, pids = self.outdir(), self.short / "pids"
        args = ("--address", cluster.address, "--workers", "4", "--output-dir", str(outdir))
        driver = self.driver(channel, *args, "--pids-file", str(pids), "--event-seconds", "0.003")
        await feeder.when(lambda: len(feeder.done) >= 200, timeout=90)
        # the node the driver is not attached to (its raylet is the driver's link to Ray, as
        # the head node's is in an allocation): every process of it killed at once
        [driver_node] = re.findall(rb"driver on node (\w+)", driver.out)
        victims = [
            (n, pid) for n, pid, node in self.actors(pids) if not node.startswith(driver_node.decode())
        ]
        self.assertEqual(len(victims), 2, "SPREAD: two actors on each node")
        await end_sessions(reactor, {os.getsid(pid) for _, pid in victims}, grace=0)
        self.assertEqual(await self.finish(driver, feeder, 4), 0, driver.err[-3000:])
        self.assertEachReportedOnce(feeder, ranges)
        lost = Counter(worker for worker, _ in feeder.failed)
        self.assertEqual(set(lost), {f"worker-{n}" for n, _ in victims}, "only the lost node's actors")
        self.assertLessEqual(max(lost.values()), 2, "at most two batches each")
        self.assertTrue(all(m.text.startswith("ray worker lost: ") for _, m in feeder.failed))
        self.assertEqual(set(feeder.gone[:2]), set(lost), "their connections closed first")
        done = {m.range_id for _, m in feeder.done}
        self.assertOutputs(outdir, [r for r in ranges if r["eventRangeID"] in done])


class LocalRayTests(DriverTestCase):
    """The driver with ``--local``: it starts Ray itself, and shuts it down."""

    def local(self, channel: RangeChannel, workers: int, *args: str) -> Payload:
        return self.driver(
            channel,
            "--local",
            str(workers),
            "--temp-dir",
            str(self.short / "ray"),
            "--node-ip-address",
            NODE_IP,
            *args,
        )

    async def test_a_command_template_runs_per_range_with_quoted_fields(self) -> None:
        ranges = [make_range(i, events=3) for i in range(6)]
        ranges[2]["LFN"] = "evil'; touch pwned; echo '.root"  # a field is a word, never shell code
        ranges[4]["eventRangeID"] = "fail-4"
        feeder = Feeder(batches_of(ranges, 3))
        channel = await self.channel(feeder)
        outdir = self.outdir()
        command = (
            'case {id} in fail-*) echo "no luck for {id}" >&2; exit 7;; esac;'
            ' printf "%s|%s|%s|%s|%s|%s" {id} {start} {last} {lfn} {guid} {scope} > {output}'
        )
        driver = self.local(channel, 2, "--workers", "2", "--output-dir", str(outdir), "--command", command)
        self.assertEqual(await self.finish(driver, feeder, 2), 0, driver.err[-3000:])
        self.assertEachReportedOnce(feeder, ranges)
        [(_, failed)] = feeder.failed
        self.assertEqual((failed.range_id, failed.code), ("fail-4", "ERR_TE_FATAL"))
        self.assertEqual(failed.text, "the command exited with status 7: no luck for fail-4")
        for _, message in feeder.done:
            item = next(r for r in ranges if r["eventRangeID"] == message.range_id)
            fields = [item[k] for k in ("eventRangeID", "startEvent", "lastEvent", "LFN", "GUID", "scope")]
            self.assertEqual(Path(message.output).read_text(), "|".join(map(str, fields)))
        self.assertFalse(any(Path(self.short).rglob("pwned")) or (outdir / "pwned").exists())
        self.assertEqual(session_members([driver.session]), [], "ray.shutdown() ended local Ray")  # type: ignore[attr-defined]

    async def test_sigterm_reports_nothing_more_and_exits_143(self) -> None:
        ranges = [make_range(i, events=5) for i in range(400)]
        feeder = Feeder(batches_of(ranges, 1))
        channel = await self.channel(feeder)
        driver = self.local(
            channel, 2, "--workers", "2", "--event-seconds", "0.01", "--output-dir", str(self.outdir())
        )
        await feeder.when(lambda: len(feeder.done) >= 10, timeout=90)
        assert driver.transport is not None
        driver.transport.signalProcess("TERM")
        self.assertEqual(await self.finish(driver, feeder, 2), 128 + signal.SIGTERM, driver.err[-3000:])
        self.assertLess(len(feeder.done), len(ranges))
        self.assertEqual(feeder.failed, [], "nothing reported failed on the way out")
        self.assertEqual(session_members([driver.session]), [], "ray.shutdown() ended local Ray")  # type: ignore[attr-defined]

    async def test_no_actor_that_can_start_exits_1(self) -> None:
        # a Ray whose only node has no CPU for an actor: nothing starts by the timeout
        feeder = Feeder([[make_range(1)]])
        channel = await self.channel(feeder)
        driver = self.local(channel, 0, "--start-timeout", "2", "--output-dir", str(self.outdir()))
        code, _ = await driver.ended(timeout=45)
        self.assertEqual(code, 1, driver.err[-3000:])
        self.assertIn(b"no ray worker started", driver.out)
        self.assertEqual(
            (feeder.asked, channel.workers), ([], []), "no connection for an actor that never ran"
        )


class RayEndToEndTests(EventServiceSite):
    """A real pilot runs an ES job whose payload is the Ray driver (``--local 4 --workers 4``)."""

    async def test_pilot_job_with_the_ray_driver_as_payload(self) -> None:
        require_ray()
        temp = Path(os.environ.get("TMPDIR", "/tmp")) / f"txr-e2e-{os.getpid()}"
        temp.mkdir()
        self.addCleanup(shutil.rmtree, temp, ignore_errors=True)
        # whatever happens to the pilot, no Ray process of this test outlives it
        self.addCleanup(lambda: Deferred.fromCoroutine(end_sessions(reactor, sessions_mentioning(str(temp)))))
        driver = (
            f"exec {sys.executable} -m pilot.hpc.raydriver --local 4 --workers 4"
            f" --channel PILOT_EVENTRANGECHANNEL --temp-dir {temp} --node-ip-address {NODE_IP}"
        )
        job = self.job(600)
        job["jobPars"] = f"-c '{driver}'"
        (panda_id,) = await self.server.submit(job)
        service = self.pilot()
        await run_to_end(service)
        summary = service.summaries[0]
        record: Any = await self.server.job(panda_id)
        self.assertEqual(record["jobStatus"], "finished", summary.pilot_error_diag)
        view = await self.check_no_finished_range_without_its_output(panda_id)
        self.assertEqual(view["counts"], {"finished": 600})
        for item in view["ranges"]:
            self.assertEqual(item["reported"], {"finished": 1}, item["eventRangeID"])
        self.assertEqual(summary.event_service["workers"], 4)
        self.assertEqual(sessions_mentioning(str(temp)), set(), "the driver shut its Ray down")


class GrammarTests(SynchronousTestCase):
    """The driver's files and messages are the reference payload's (no Ray needed)."""

    def test_output_names_are_the_reference_payloads(self) -> None:
        for range_id in ("1-2-3-4-5", "a/b", "a_b", "..", ".", "x" * 300, "é"):
            self.assertEqual(hpc_channel.output_name(range_id), es_payload.output_name(range_id))

    def test_output_content_is_the_reference_payloads(self) -> None:
        for item in (make_range(7, events=4), make_range(8, events=1) | {"scope": "", "GUID": ""}):
            spec = hpc_channel.range_spec(item)
            assert not isinstance(spec, str)
            for size in (0, 3, 256, 5000):
                self.assertEqual(rayworker.output_content(spec, size), expected_content(item, size))

    def test_command_fields_are_shell_quoted(self) -> None:
        spec = ("id-1", 1, 2, "a file; rm -rf /", "g'uid", "")
        line = rayworker.command_line("x {id} {lfn} {guid} {scope} {output} ${HOME} {other}", spec, "/t/o")
        self.assertEqual(line, "x id-1 'a file; rm -rf /' 'g'\"'\"'uid' '' /t/o ${HOME} {other}")

    def test_answers_are_parsed_like_the_reference_payload(self) -> None:
        self.assertEqual(hpc_channel.parse_answer("No more events"), (None, []))
        specs, errors = hpc_channel.parse_answer('[{"eventRangeID": "bad-1", "startEvent": 1}]')
        self.assertEqual(specs, [])
        self.assertEqual(
            errors,
            [
                'ERR_ATHENAMP_PARSE {"eventRangeID":"bad-1","startEvent":1}:'
                " Wrong format (missing lastEvent, LFN)"
            ],
        )
        specs, errors = hpc_channel.parse_answer("not json")
        self.assertEqual(specs, [])
        self.assertTrue(errors[0].startswith("ERR_ATHENAMP_PARSE not json: Wrong format (not JSON"))
        self.assertEqual(hpc_channel.parse_answer(None)[1][0].split(":")[0], "ERR_ATHENAMP_PARSE an answer")

    def test_failed_messages_are_one_bounded_line(self) -> None:
        message = hpc_channel.failed_message("r-1", "line one\nline two  " + "x" * 1000)
        self.assertEqual(message[:40], "ERR_TE_FATAL r-1: line one line two xxxx")
        self.assertNotIn("\n", message)
        self.assertEqual(len(message), len("ERR_TE_FATAL r-1: ") + hpc_channel.MAX_ERROR_TEXT)

    def test_the_driver_imports_without_ray(self) -> None:
        """It runs in the payload's environment: Ray is imported only once it is used."""
        import importlib

        names = ("pilot.hpc", "pilot.hpc.raydriver", "pilot.hpc.channel", "pilot.hpc.rayworker")
        saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
        saved_ray = sys.modules.get("ray")
        sys.modules["ray"] = None  # type: ignore[assignment]  # "import ray" now fails
        try:
            driver = importlib.import_module("pilot.hpc.raydriver")
            self.assertEqual(
                driver.parse_options(["--channel", "/c"]).address, os.environ.get("RAY_ADDRESS", "auto")
            )
        finally:
            for name in names:
                sys.modules.pop(name, None)
            sys.modules.update(saved)
            if saved_ray is None:
                del sys.modules["ray"]
            else:
                sys.modules["ray"] = saved_ray
