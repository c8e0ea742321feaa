"""The staging engine on a simulated clock, with scripted copytools.

Real tools against real servers are in ``test_copytools.py``; here the logic:
replica fallback, verification, time-outs, parallelism, progress, the record.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum
from pilot.staging.credentials import Credentials
from pilot.staging.engine import MAX_PARALLEL, StagingEngine
from pilot.staging.follow import ChecksumFollower
from pilot.staging.interfaces import IBulkCopyTool, ICopyTool
from pilot.staging.plan import FileTransfer
from pilot.staging.record import TransferRecord
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.transfer import Attempt, CopyRequest, CopyResult, Direction, TransferError, timeout_for

from .fakes import run_sync


def adler(data: bytes) -> Checksum:
    return Checksum("adler32", f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


@implementer(ICopyTool)
class ScriptedTool:
    """Serves stage-in from a dict of remote → bytes; remotes in ``hang`` never finish."""

    resolves_replicas = False
    schemes = frozenset({"fake"})

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.files: dict[str, bytes] = {}
        self.hang: set[str] = set()
        self.calls: list[str] = []
        self.running = 0
        self.most = 0
        self.pending: list[Deferred[CopyResult]] = []
        self.remote_checksum: dict[str, Checksum] = {}
        self.stored: dict[str, bytes] = {}

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        self.calls.append(request.remote)
        if request.remote in self.hang:
            request.local.write_bytes(b"partial")
            if request.progress:
                request.progress(7)
            return self._held()
        if request.remote not in self.files:
            return fail(
                TransferError(ErrorCode.MISSINGINPUTFILE, f"{request.remote}: No such file", missing=True)
            )
        request.local.write_bytes(self.files[request.remote])
        return succeed(CopyResult(remote_url=request.remote))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        self.calls.append(request.remote)
        if request.remote in self.hang:
            return self._held()
        self.stored[request.remote] = request.local.read_bytes()
        checksum = self.remote_checksum.get(request.remote, request.checksum)
        return succeed(
            CopyResult(remote_checksum=checksum, remote_url=request.remote, verified_remotely=True)
        )

    def _held(self) -> Deferred[CopyResult]:
        self.running += 1
        self.most = max(self.most, self.running)

        def cancelled(_: object) -> None:
            self.running -= 1

        d: Deferred[CopyResult] = Deferred(cancelled)
        self.pending.append(d)
        return d

    def release(self, index: int = 0) -> None:
        d = self.pending.pop(index)
        self.running -= 1
        d.callback(CopyResult())


class EngineHarness:
    def __init__(self, test: SynchronousTestCase, **engine: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.workdir = Path(test.mktemp())
        self.workdir.mkdir()
        self.tool = ScriptedTool()
        self.registry = CopytoolRegistry({"fake": self.tool})
        self.context = ToolContext(
            spawner=None,  # type: ignore[arg-type]
            clock=self.clock,
            in_thread=run_sync,
            env={},
            logdir=self.workdir / "logs",
            credentials=Credentials({}),
        )
        engine.setdefault("follow_threshold", 0)  # every verified input is followed (no thread is held)
        self.engine = StagingEngine(self.registry, self.context, **engine)

    def inbound(self, lfn: str, data: bytes, remotes: list[str], *, size: int | None = -1) -> FileTransfer:
        return FileTransfer(
            direction=Direction.IN,
            lfn=lfn,
            scope="s",
            guid="g",
            local=self.workdir / lfn,
            size=len(data) if size == -1 else size,
            checksum=adler(data),
            activity="pr",
            attempts=[Attempt("fake", r, r.split(":")[0]) for r in remotes],
        )

    def hanging(self, n: int, data: bytes = b"x") -> list[FileTransfer]:
        """``n`` inbound transfers whose copies never finish by themselves."""
        transfers = []
        for i in range(n):
            self.tool.hang.add(f"A:f{i}")
            transfers.append(self.inbound(f"f{i}", data, [f"A:f{i}"]))
        return transfers

    def run(self, transfers: list[FileTransfer], **kw: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self.engine.run(transfers, **kw))


class StageInTests(SynchronousTestCase):
    def test_tool_provides_the_interface(self) -> None:
        verifyObject(ICopyTool, ScriptedTool())

    def test_next_replica_when_the_first_is_missing(self) -> None:
        h = EngineHarness(self)
        h.tool.files["B:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1", "B:f1"])
        self.successResultOf(h.run([t]))
        self.assertTrue(t.done)
        self.assertEqual((t.tries, t.used.endpoint if t.used else None), (2, "B"))
        self.assertEqual((h.workdir / "f1").read_bytes(), b"data")

    def test_corrupt_replica_is_deleted_and_the_next_used(self) -> None:
        h = EngineHarness(self)
        h.tool.files["A:f1"] = b"dat4"
        h.tool.files["B:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1", "B:f1"])
        self.successResultOf(h.run([t]))
        self.assertTrue(t.done)
        self.assertEqual(t.used.endpoint if t.used else None, "B")

    def test_checksum_mismatch_everywhere(self) -> None:
        h = EngineHarness(self)
        h.tool.files["A:f1"] = b"dat4"
        t = h.inbound("f1", b"data", ["A:f1"])
        self.successResultOf(h.run([t]))
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.GETADMISMATCH)
        self.assertFalse((h.workdir / "f1").exists(), "the bad copy is removed")

    def test_md5_checksums(self) -> None:
        h = EngineHarness(self)
        h.tool.files["A:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1"])
        t.checksum = Checksum("md5", "0" * 32)
        self.successResultOf(h.run([t]))
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.GETMD5MISMATCH)

    def test_size_mismatch(self) -> None:
        h = EngineHarness(self)
        h.tool.files["A:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1"], size=5)
        self.successResultOf(h.run([t]))
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.STAGEINFAILED)
        self.assertIn("size 4 != expected 5", t.error.detail)

    def test_missing_everywhere(self) -> None:
        h = EngineHarness(self)
        several = h.inbound("f1", b"x", ["A:f1", "B:f1"])
        single = h.inbound("f2", b"x", ["A:f2"])
        self.successResultOf(h.run([several, single]))
        assert several.error is not None and single.error is not None
        self.assertEqual(several.error.code, ErrorCode.REPLICANOTFOUND)
        self.assertEqual(single.error.code, ErrorCode.MISSINGINPUTFILE)

    def test_timeout_on_the_clock_removes_the_partial_file(self) -> None:
        h = EngineHarness(self, timeout_base=100.0, timeout_rate=1e6)
        h.tool.hang.add("A:f1")
        t = h.inbound("f1", b"x" * 50_000_000, ["A:f1"])
        d = h.run([t])
        self.assertTrue((h.workdir / "f1").exists())
        h.clock.advance(149.9)
        self.assertNoResult(d)
        h.clock.advance(0.1)
        self.successResultOf(d)
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.STAGEINTIMEOUT)
        self.assertFalse((h.workdir / "f1").exists())
        self.assertEqual(h.tool.running, 0, "the tool's work was cancelled")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_timeout_grows_with_size(self) -> None:
        self.assertEqual(timeout_for(0), 400.0)
        self.assertEqual(timeout_for(1_000_000_000), 1400.0)
        self.assertEqual(timeout_for(10**13), 3 * 3600.0)

    def test_parallel_limit(self) -> None:
        h = EngineHarness(self, parallel=2)
        transfers = h.hanging(5, b"partial")
        d = h.run(transfers)
        self.assertEqual(h.tool.running, 2)
        for _ in range(5):
            h.tool.release()
            self.assertLessEqual(h.tool.running, 2)
        self.successResultOf(d)
        self.assertEqual(h.tool.most, 2)
        self.assertTrue(all(t.done for t in transfers))

    def test_progress_is_logged_at_the_interval(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        h = EngineHarness(self, progress_interval=30.0)
        h.tool.hang.add("A:big")
        t = h.inbound("big", b"partial", ["A:big"], size=1_000_000)
        d = h.run([t])
        h.clock.advance(29)
        self.assertEqual([e for e in events if e.get("event") == "transfer.progress"], [])
        h.clock.advance(1)
        (first,) = [e for e in events if e.get("event") == "transfer.progress"]
        self.assertEqual((first["bytes"], first["total"]), (7, 1_000_000))
        self.assertAlmostEqual(first["rate"], 7 / 30)
        self.assertGreater(first["eta"], 0)
        h.clock.advance(30)
        self.assertEqual(len([e for e in events if e.get("event") == "transfer.progress"]), 2)
        h.tool.release()
        self.successResultOf(d)

    def test_stop_on_failure_cancels_the_rest(self) -> None:
        h = EngineHarness(self, parallel=1)
        h.tool.hang.add("A:f2")
        first = h.inbound("f1", b"x", ["A:f1"])
        second = h.inbound("f2", b"x", ["A:f2"])
        self.successResultOf(h.run([first, second], stop_on_failure=True))
        self.assertEqual(h.tool.calls, ["A:f1"])
        assert second.error is not None
        self.assertIn("cancelled", second.error.detail)

    def test_cancelling_the_run_raises_cancelled_error(self) -> None:
        """A cancelled stage-in is a cancellation, never STAGEINFAILED for the job."""
        h = EngineHarness(self, parallel=2)
        d = h.run(h.hanging(3))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(h.tool.running, 0)
        self.assertEqual(h.tool.calls, ["A:f0", "A:f1"], "the third is never started")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_record_lets_a_restarted_pilot_skip_done_files(self) -> None:
        h = EngineHarness(self)
        record = TransferRecord(h.workdir.parent / "records" / "job.jsonl", run_sync)
        h.engine.record = record
        h.tool.files["A:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1"])
        self.successResultOf(h.run([t]))
        (line,) = record.path.read_text().splitlines()
        self.assertEqual(json.loads(line)["lfn"], "f1")
        again = EngineHarness(self)
        again.engine.record = record
        moved = again.inbound("f1", b"data", ["A:f1"])
        self.successResultOf(again.run([moved]))
        self.assertTrue(moved.done and moved.from_record)
        self.assertEqual(again.tool.calls, [], "nothing copied again")
        self.assertEqual((again.workdir / "f1").read_bytes(), b"data", "linked into the new work directory")

    def test_record_ignores_changed_files(self) -> None:
        h = EngineHarness(self)
        record = TransferRecord(h.workdir.parent / "records2" / "job.jsonl", run_sync)
        h.engine.record = record
        h.tool.files["A:f1"] = b"data"
        self.successResultOf(h.run([h.inbound("f1", b"data", ["A:f1"])]))
        (h.workdir / "f1").write_bytes(b"dat4")
        record.path.write_text(record.path.read_text() + '{"torn": ')
        again = EngineHarness(self)
        again.engine.record = record
        again.tool.files["A:f1"] = b"data"
        moved = again.inbound("f1", b"data", ["A:f1"])
        self.successResultOf(again.run([moved]))
        self.assertFalse(moved.from_record)
        self.assertEqual(again.tool.calls, ["A:f1"])


@implementer(ICopyTool, IBulkCopyTool)
class BulkTool(ScriptedTool):
    """ScriptedTool that also takes batches; a batch in ``hang`` never finishes."""

    def __init__(self) -> None:
        super().__init__("bulk")
        self.batches: list[list[str]] = []

    def copy_in_bulk(
        self, requests: Sequence[CopyRequest], context: ToolContext
    ) -> Deferred[list[CopyResult | TransferError]]:
        self.batches.append([r.remote for r in requests])
        if any(r.remote in self.hang for r in requests):
            return self._held()  # type: ignore[return-value]
        results: list[CopyResult | TransferError] = []
        for r in requests:
            if r.remote in self.files:
                r.local.write_bytes(self.files[r.remote])
                results.append(CopyResult(remote_url=r.remote))
            else:
                results.append(TransferError(ErrorCode.MISSINGINPUTFILE, "No such file", missing=True))
        return succeed(results)


class BulkTests(SynchronousTestCase):
    def harness(self, **engine: Any) -> tuple[EngineHarness, BulkTool]:
        h = EngineHarness(self, **engine)
        tool = BulkTool()
        h.registry.register(tool)
        return h, tool

    def transfers(
        self, h: EngineHarness, tool: BulkTool, n: int, missing_at_a: frozenset[int] = frozenset()
    ) -> list[FileTransfer]:
        result = []
        for i in range(n):
            data = f"file {i}".encode()
            tool.files[f"B/f{i}"] = data
            if i not in missing_at_a:
                tool.files[f"A/f{i}"] = data
            t = h.inbound(f"f{i}", data, [])
            t.attempts = [Attempt("bulk", f"A/f{i}", "A"), Attempt("bulk", f"B/f{i}", "B")]
            result.append(t)
        return result

    def test_batches_and_fallback(self) -> None:
        h, tool = self.harness(bulk_size=4, parallel=2)
        transfers = self.transfers(h, tool, 10, missing_at_a=frozenset({5}))
        self.successResultOf(h.run(transfers))
        self.assertTrue(all(t.done for t in transfers))
        self.assertEqual([len(b) for b in tool.batches], [4, 4, 2])
        self.assertEqual(tool.calls, ["B/f5"], "the one missing at A came from B, alone")
        self.assertEqual(transfers[5].tries, 2)

    def test_batch_timeout(self) -> None:
        h, tool = self.harness(bulk_size=8, timeout_base=100.0)
        transfers = self.transfers(h, tool, 3)
        tool.hang.add("A/f0")
        tool.hang.add("B/f0")
        d = h.run(transfers)
        h.clock.advance(100.001)
        self.assertEqual(
            tool.running, 1, "the batch was cancelled; f0's fallback hangs too; f1, f2 came from B"
        )
        h.clock.advance(400)
        self.successResultOf(d)
        self.assertEqual([t.done for t in transfers], [False, True, True])
        assert transfers[0].error is not None
        self.assertEqual(transfers[0].error.code, ErrorCode.STAGEINTIMEOUT)


class StepLog:
    """A synchronous checksum runner that notes which followers read (and how often)."""

    def __init__(self) -> None:
        self.calls = 0
        self.followers: list[ChecksumFollower] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        owner = getattr(f, "__self__", None)
        if isinstance(owner, ChecksumFollower) and owner not in self.followers:
            self.followers.append(owner)
        return run_sync(f, *args, **kwargs)


class FollowerUseTests(SynchronousTestCase):
    """The engine's checksum followers, on the Clock, with a synchronous checksum runner."""

    def test_input_is_checksummed_while_written_and_not_read_again(self) -> None:
        steps = StepLog()
        h = EngineHarness(self, checksum_runner=steps)
        h.tool.hang.add("A:f1")  # writes b"partial", then waits for release
        data = b"partial" + bytes(range(256)) * 40
        t = h.inbound("f1", data, ["A:f1"])
        d = h.run([t])
        h.clock.advance(0.05)
        (follower,) = steps.followers
        self.assertEqual(follower.size, 7, "read what was there while the tool still ran")
        with (h.workdir / "f1").open("ab") as handle:
            handle.write(data[7:])
        h.tool.release()
        self.successResultOf(d)
        self.assertTrue(t.done, t.error)
        self.assertEqual(steps.followers, [follower], "the followed checksum was used: no second read")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_bad_copy_is_caught_by_the_follower(self) -> None:
        h = EngineHarness(self, checksum_runner=StepLog())
        h.tool.files["A:f1"] = b"dat4"
        h.tool.files["B:f1"] = b"data"
        t = h.inbound("f1", b"data", ["A:f1", "B:f1"])
        self.successResultOf(h.run([t]))
        self.assertEqual((t.done, t.tries), (True, 2))

    def test_cancelled_transfer_stops_its_follower(self) -> None:
        steps = StepLog()
        h = EngineHarness(self, checksum_runner=steps, parallel=1)
        h.tool.hang.add("A:f2")
        first = h.inbound("f1", b"x", ["A:f1"])  # missing everywhere: fails for good
        second = h.inbound("f2", b"x", ["A:f2"])
        h.tool.files["A:f0"] = b"y"
        d = h.run([h.inbound("f0", b"y", ["A:f0"]), second, first], stop_on_failure=False)
        h.clock.advance(0.05)
        calls = steps.calls
        self.assertGreater(calls, 0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(10)
        self.assertEqual(steps.calls, calls, "no step after the cancellation")

    def test_parallelism_is_clamped(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.assertEqual(EngineHarness(self, parallel=10_000).engine.parallel, MAX_PARALLEL)
        self.assertEqual(EngineHarness(self, parallel=0).engine.parallel, 1)
        self.assertEqual(EngineHarness(self, parallel=16).engine.parallel, 16)
        clamped = [e for e in events if e.get("event") == "transfer.parallelism_clamped"]
        self.assertEqual([(e["asked"], e["used"]) for e in clamped], [(10_000, MAX_PARALLEL), (0, 1)])


class StageOutTests(SynchronousTestCase):
    def outbound(self, h: EngineHarness, remotes: list[str]) -> FileTransfer:
        path = h.workdir / "out.root"
        path.write_bytes(b"result")
        return FileTransfer(
            direction=Direction.OUT,
            lfn="out.root",
            scope="s",
            guid="g",
            local=path,
            size=6,
            checksum=adler(b"result"),
            activity="pw",
            attempts=[Attempt("fake", r, r.split(":")[0]) for r in remotes],
        )

    def test_remote_checksum_mismatch_tries_the_alternative(self) -> None:
        h = EngineHarness(self)
        h.tool.remote_checksum["A:out"] = Checksum("adler32", "deadbeef")
        t = self.outbound(h, ["A:out", "B:out"])
        self.successResultOf(h.run([t]))
        self.assertTrue(t.done and t.verified_remotely)
        self.assertEqual(t.remote_url, "B:out")
        self.assertEqual(h.tool.stored["B:out"], b"result")

    def test_remote_checksum_mismatch_everywhere(self) -> None:
        h = EngineHarness(self)
        h.tool.remote_checksum["A:out"] = Checksum("adler32", "deadbeef")
        t = self.outbound(h, ["A:out"])
        self.successResultOf(h.run([t]))
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.PUTADMISMATCH)
        self.assertTrue((h.workdir / "out.root").exists(), "outputs are never deleted locally")

    def test_stage_out_timeout(self) -> None:
        h = EngineHarness(self)
        h.tool.hang.add("A:out")
        t = self.outbound(h, ["A:out"])
        d = h.run([t])
        h.clock.advance(401.0)
        self.successResultOf(d)
        assert t.error is not None
        self.assertEqual(t.error.code, ErrorCode.STAGEOUTTIMEOUT)
