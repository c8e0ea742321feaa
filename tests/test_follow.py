"""Checksumming an input while it is written (``pilot.staging.follow``).

The follower is an optimisation: whatever the writer does (in order, out of order,
replace, truncate, never create), its result is either the file's true checksum or
None.  ``FollowerTests`` run writers and followers in real threads, so the
interleavings are real ones; ``StepTests`` check on a Clock, with a runner the test
drives by hand, that no thread is held while the follower waits and that abandoning
stops it at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.staging.follow import ChecksumFollower, _data_end, checksum_file
from pilot.util.checksum import file_facts
from pilot.util.threads import WorkerPool

from .fakes import ManualRunner, run_sync

reactor: Any = _reactor

BLOCK = 1 << 20


class FollowerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "input.bin"
        self.checksums = WorkerPool(reactor, 2, "test-checksum")
        self.writers = WorkerPool(reactor, 1, "test-writer")
        for pool in (self.checksums, self.writers):
            pool.start()
            self.addCleanup(pool.stop)

    async def follow_while(self, write: Callable[[], object], *, md5: bool = False) -> ChecksumFollower:
        """Run ``write()`` in a thread while a follower follows ``self.path``; then finish it."""
        follower = ChecksumFollower(self.path, reactor, self.checksums.runner, md5=md5, poll=0.001)
        follower.start()
        await self.writers.run(write)
        result = await follower.finish()
        self.assertEqual(result, follower.result)
        return follower

    async def test_sequential_writer(self) -> None:
        blocks = [os.urandom(BLOCK) for _ in range(24)]

        def write() -> None:
            with self.path.open("wb") as handle:
                for block in blocks:
                    handle.write(block)
                    handle.flush()

        follower = await self.follow_while(write, md5=True)
        self.assertEqual(follower.result, file_facts(self.path, md5=True))

    async def test_out_of_order_writer_is_never_wrong(self) -> None:
        blocks = [os.urandom(BLOCK) for _ in range(16)]
        order = [i ^ 1 for i in range(16)]  # 1, 0, 3, 2, ...: every second block arrives early

        def write() -> None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for i in order:
                    os.pwrite(fd, blocks[i], i * BLOCK)
            finally:
                os.close(fd)

        for _ in range(5):
            follower = await self.follow_while(write)
            if follower.result is not None:
                self.assertEqual(follower.result, file_facts(self.path))
            self.path.unlink()

    def test_data_ends_at_the_first_hole(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        os.pwrite(fd, b"x" * 4096, 0)
        os.pwrite(fd, b"y" * 4096, 4 * BLOCK)
        self.assertLess(_data_end(fd, 0), 4 * BLOCK, "the unwritten middle is not data")
        self.assertEqual(_data_end(fd, os.fstat(fd).st_size), os.fstat(fd).st_size)

    async def test_replaced_file_gives_no_result(self) -> None:
        def write() -> None:
            self.path.write_bytes(os.urandom(BLOCK))
            replacement = self.dir / "tmp"
            replacement.write_bytes(os.urandom(BLOCK))
            os.replace(replacement, self.path)

        follower = await self.follow_while(write)
        if follower.result is not None:  # only if it opened the replacement in the first place
            self.assertEqual(follower.result, file_facts(self.path))

    async def test_truncated_file_gives_no_wrong_result(self) -> None:
        def write() -> None:
            with self.path.open("wb") as handle:
                handle.write(os.urandom(4 * BLOCK))
                handle.flush()
                handle.truncate(0)
                handle.seek(0)
                handle.write(b"short")

        follower = await self.follow_while(write)
        if follower.result is not None:
            self.assertEqual(follower.result, file_facts(self.path))

    async def test_file_that_never_appears(self) -> None:
        follower = await self.follow_while(lambda: None)
        self.assertIsNone(follower.result)

    async def test_many_followers_share_a_small_pool(self) -> None:
        """Sixteen followers on a two-thread pool: each holds a thread only for a step."""
        paths = [self.dir / f"in{i}" for i in range(16)]
        blocks = [os.urandom(BLOCK // 4) for _ in range(8)]
        followers = [ChecksumFollower(p, reactor, self.checksums.runner, poll=0.001) for p in paths]
        for follower in followers:
            follower.start()

        def write() -> None:
            handles = [p.open("wb") for p in paths]
            for block in blocks:
                for handle in handles:
                    handle.write(block)
                    handle.flush()
            for handle in handles:
                handle.close()

        await self.writers.run(write)
        results = [await f.finish() for f in followers]
        self.assertEqual(results, [file_facts(p) for p in paths])

    async def test_checksum_file_reads_a_finished_file_in_steps(self) -> None:
        self.path.write_bytes(os.urandom(3 * BLOCK + 17))
        facts = await checksum_file(self.path, reactor, self.checksums.runner, md5=True)
        self.assertEqual(facts, file_facts(self.path, md5=True))
        self.assertIsNone(await checksum_file(self.dir / "absent", reactor, self.checksums.runner))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class StepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = ManualRunner()
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.follower = ChecksumFollower(self.path, self.clock, self.runner, poll=0.5, chunk=1024)

    def test_no_thread_is_held_while_waiting(self) -> None:
        self.follower.start()
        self.assertEqual(self.runner.calls, 0, "the first step comes at the first tick")
        self.clock.advance(0.5)
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.run_one()  # the file does not exist yet: nothing to read
        self.assertEqual(self.runner.queue, [])
        self.assertFalse(self.follower.reading, "between ticks nothing is submitted, nothing held")
        self.clock.advance(0.4)
        self.assertEqual(self.runner.calls, 1)
        self.path.write_bytes(b"x" * 2500)
        self.clock.advance(0.1)
        for expected in (1024, 2048, 2500):  # at most one chunk per step, back to back
            self.runner.run_one()
            self.assertEqual(self.follower.size, expected)
        self.runner.run_one()  # nothing more for now
        self.assertFalse(self.follower.reading)
        done = self.follower.finish()
        self.assertEqual(self.clock.getDelayedCalls(), [], "finishing stops the ticks")
        self.runner.run_one()
        self.assertEqual(self.successResultOf(done), file_facts(self.path))

    def test_a_busy_follower_skips_ticks(self) -> None:
        self.path.write_bytes(b"x" * 10)
        self.follower.start()
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.assertEqual(len(self.runner.queue), 1, "one step at a time, however slow the pool")

    def test_abandon_stops_at_once_and_closes_after_the_step(self) -> None:
        self.path.write_bytes(b"x" * 4096)
        before = _open_fds()
        self.follower.start()
        self.clock.advance(0.5)
        self.runner.run_one()  # opened, read one chunk; the next step is queued
        self.assertEqual(len(self.runner.queue), 1)
        self.follower.abandon()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.follower.result)
        self.assertEqual(_open_fds(), before + 1, "the step in flight still uses the descriptor")
        self.runner.run_one()
        self.assertEqual(self.runner.queue, [], "no step after the one in flight")
        self.assertEqual(_open_fds(), before)
        self.assertIsNone(self.follower.result)
        self.assertIsNone(self.successResultOf(self.follower.finish()))

    def test_cancelling_finish_abandons_with_cancelled_error(self) -> None:
        self.path.write_bytes(b"x" * 4096)
        done = self.follower.finish()
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.runner.run_one()
        self.assertEqual(self.runner.queue, [])
        self.assertIsNone(self.follower.result)

    def test_synchronous_runner(self) -> None:
        """With a runner that runs at once (tests elsewhere), finishing reads everything iteratively."""
        self.path.write_bytes(os.urandom(1 << 20))
        follower = ChecksumFollower(self.path, self.clock, run_sync, chunk=1024)
        follower.start()
        self.assertEqual(self.successResultOf(follower.finish()), file_facts(self.path))
        self.assertEqual(self.clock.getDelayedCalls(), [])
